"""Model weights shipped inside the package (safetensors + JSON metadata, see ``README.md`` here)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
BUNDLED = {"oscd-s2": "oscd-s2-fc-siam-diff.safetensors", "oscd-s2-robust": "oscd-s2-robust-fc-siam-diff.safetensors",
           "rgb": "rgb-fc-siam-diff.safetensors",
           "hetero": "hetero-structure-refined.safetensors"}


def bundled_checkpoint(name: str) -> Path | None:
    """Path of the bundled checkpoint called ``name``, or None if there is none by that name."""
    file = BUNDLED.get(name)
    return _HERE / file if file and (_HERE / file).is_file() else None
