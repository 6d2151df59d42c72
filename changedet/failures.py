"""One ``error: <reason>`` line and a documented exit status for every failure of a command line.

Every entry point (``changedet …``, ``python flows/*.py …``) runs its work through
:func:`run_command`, and parses its arguments with :class:`ErrorLineParser`, so a user sees exactly
one line on stderr that starts with ``error: `` and no traceback unless ``--debug`` is given.

Exit status (README, "Errors and exit status"):

* 0 success;
* 1 system error: disk full, file too large, permission denied, read-only or failing storage, out of memory;
* 2 bad input or option (including invalid configs and checkpoints);
* 3 internal error (a bug: rerun with ``--debug`` and report the traceback);
* 75 busy: another run holds the output folder (retry later);
* 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from typing import Callable, NoReturn, Sequence

from changedet.errors import BusyError, ChangeDetError

EXIT_SYSTEM = 1
EXIT_INPUT = 2
EXIT_INTERNAL = 3
EXIT_BUSY = 75
EXIT_INTERRUPTED = 130
DEBUG_HINT = "rerun with --debug for the traceback"


class ErrorLineParser(argparse.ArgumentParser):
    """``argparse`` that reports a bad command line as one ``error: <reason>`` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``error: <prog>: <message>`` and exit with status 2."""
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _validation_reason(exc: Exception) -> str:
    """A pydantic ``ValidationError`` as ``invalid <field>: <message>; …``."""
    errors = exc.errors()  # type: ignore[attr-defined]
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or 'value'}: {e.get('msg', '')}" for e in errors[:3]]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"invalid parameters: {'; '.join(parts)}{more}"


def os_reason(exc: OSError) -> str:
    """``<strerror>: <file>`` for system errors such as a full disk or a read-only folder."""
    reason = exc.strerror or _first_line(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


def failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line reason for ``exc``."""
    from pydantic import ValidationError
    from rasterio.errors import RasterioError
    from yaml import YAMLError

    if isinstance(exc, BusyError):
        return EXIT_BUSY, str(exc)
    if isinstance(exc, ChangeDetError):
        return EXIT_INPUT, _first_line(exc)
    if isinstance(exc, ValidationError):
        return EXIT_INPUT, _validation_reason(exc)
    if isinstance(exc, YAMLError):
        return EXIT_INPUT, f"invalid YAML: {_first_line(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (run the same command again to resume from the tiles already predicted)"
    if isinstance(exc, OSError):  # before RasterioError: RasterioIOError is both
        if isinstance(exc, RasterioError) and not exc.errno:
            return EXIT_INPUT, _first_line(exc)
        return EXIT_SYSTEM, os_reason(exc)
    if isinstance(exc, RasterioError):
        return EXIT_INPUT, _first_line(exc)
    if isinstance(exc, MemoryError):
        return EXIT_SYSTEM, "out of memory (use a smaller --tile or --batch-size)"
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {_first_line(exc)} ({DEBUG_HINT})"


def run_command(work: Callable[[], int], debug: bool = False) -> int:
    """Run ``work`` and turn any failure into one ``error:`` line and its exit status."""
    try:
        return work()
    except SystemExit as exc:  # argparse inside work, or an explicit exit
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT
    except BaseException as exc:  # noqa: BLE001 - the single place where every failure is reported
        status, reason = failure(exc)
        if debug:
            traceback.print_exc(file=sys.stderr)
        print(f"error: {reason}", file=sys.stderr)
        return status


def command_main(argv: Sequence[str] | None, work: Callable[[list[str]], int], loggers: Sequence[str] = ()) -> int:
    """Run a command line's ``work(argv)``: ``--debug`` (anywhere) is taken out of ``argv`` and turns
    tracebacks on; otherwise log records of ``loggers`` (and the root logger) lose their tracebacks.
    Warnings print as one ``warning: <message>`` line."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not debug:
        drop_tracebacks(list(loggers))
        # zarr writes chunks in asyncio tasks: when one fails (a full disk), its siblings' failures are
        # logged as "Task exception was never retrieved" after our error line has said it all
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    return run_command(lambda: work(args), debug)


class DropTracebacks(logging.Filter):
    """A logging filter that keeps a record's message but drops its traceback (unless ``--debug``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Strip ``exc_info``/``exc_text``/``stack_info`` and any traceback text in the message."""
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        message = record.getMessage()
        if "Traceback (most recent call last)" in message:
            record.msg, record.args = message.split("Traceback (most recent call last)")[0].rstrip(), None
        return True


def drop_tracebacks(logger_names: list[str]) -> None:
    """Install :class:`DropTracebacks` on the handlers of these loggers and of the root logger."""
    names = [*logger_names, ""]
    for name in names:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not any(isinstance(f, DropTracebacks) for f in handler.filters):
                handler.addFilter(DropTracebacks())
