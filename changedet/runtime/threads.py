"""Intra-op threads of the model runtimes (torch and ONNX Runtime), without importing torch.

``--threads N`` (or a Dask worker's ``OMP_NUM_THREADS=1``) sizes both runtimes alike: a CPU detect
through ONNX Runtime never imports torch, so the count lives here, and torch is told when it is (or
gets) imported.
"""

from __future__ import annotations

import os
import sys

import psutil

_override: int | None = None


def set_threads(count: int) -> None:
    """Use ``count`` intra-op threads from now on (torch too, when it is imported)."""
    global _override
    _override = int(count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_override)


def num_threads() -> int:
    """Threads a model call uses: :func:`set_threads`'s count, else torch's (when imported), else
    ``OMP_NUM_THREADS`` (Dask workers set 1), else the physical cores available to this process."""
    if _override is not None:
        return _override
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, psutil.cpu_count(logical=False) or available))


def sync_torch_threads() -> None:
    """Give torch :func:`set_threads`'s count (call after importing torch for a model)."""
    if _override is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_override)
