"""Exceptions with one-line, user-facing reasons."""


class ChangeDetError(Exception):
    """Base class: anything the CLI reports as ``error: <reason>`` with a non-zero exit."""


class InputError(ChangeDetError):
    """An input raster/scene cannot be used (missing, unreadable, wrong bands, no overlap...)."""


class GridError(ChangeDetError):
    """Two scenes cannot be put on a common grid (CRS missing on one side, no overlap...)."""


class ModelError(ChangeDetError):
    """Unknown model, bad checkpoint, or a scene that does not match what the model expects."""


class OutputError(ChangeDetError):
    """Outputs cannot be written (directory exists without --overwrite, not writable...)."""


class BusyError(ChangeDetError):
    """Another live run holds the output folder (exit status 75: retry later)."""


class CloudyError(InputError):
    """A date is cloudier than ``--max-cloud`` allows (the inbox flow skips such a pair and says so)."""
