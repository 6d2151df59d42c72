"""Checkpoint metadata and the files a :class:`~changedet.train.trainer.Trainer` run keeps in ``out_dir``.

* ``best.safetensors`` — the model of the best validation F1 (pooled over the validation
  scenes, at the threshold tuned on them), with JSON metadata (:func:`checkpoint_metadata`):
  model name and builder config, bands, normalisation, threshold, metrics (pooled and per
  scene), data split, training settings. ``changedet detect --model best.safetensors`` uses it.
* ``last.safetensors`` — the latest epoch (same metadata layout);
* ``last.ema.safetensors`` — with ``ema_decay``: the exponential moving average of the weights
  (updated every step, buffers included). Validation then scores the average, and
  ``best.safetensors`` holds the average of the best epoch;
* ``last.optim.pt`` — optimizer / LR scheduler / AMP scaler state and the objective's own state
  (plain tensors and numbers, read back with ``torch.load(weights_only=True)``);
* ``trainer_state.json`` — epoch, best score, early-stopping counter and the history.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from changedet.checkpoint import load_state_dict, read_metadata, save_checkpoint
from changedet.data.stats import checkpoint_normalization
from changedet.errors import ModelError
from changedet.io.writers import write_text
from changedet.normalization import Normalization

BEST = "best.safetensors"
LAST = "last.safetensors"
OPTIM = "last.optim.pt"
EMA = "last.ema.safetensors"
STATE = "trainer_state.json"


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, paths as strings and NumPy scalars as Python numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def checkpoint_metadata(
    model_name: str,
    model_config: dict[str, Any],
    bands: tuple[Sequence[str], Sequence[str]] | None,
    normalization: Normalization | dict[str, Any],
    threshold: float,
    metrics: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata in the layout :mod:`changedet.pipeline.predictor` reads, plus provenance.

    ``model``/``config``/``bands``/``normalization``/``threshold`` drive inference; ``stats``
    (pixel counts, scenes, pooled or per date), ``metrics``, ``split`` and ``training`` document
    the run. ``bands`` None (sources with different band names, per-scene statistics): the model
    takes any scene with ``input_channels`` bands, in the order the user selects. ``stats`` come from
    the :func:`~changedet.data.stats.compute_normalization` dict (a :class:`Normalization` has none).
    """
    provenance = normalization if isinstance(normalization, dict) else {}
    meta = {
        "model": model_name,
        "config": {k: v for k, v in model_config.items() if k != "in_channels"},
        "bands": None if bands is None else {"t1": list(bands[0]), "t2": list(bands[1])},
        "normalization": checkpoint_normalization(normalization),
        "stats": {k: list(v) if k == "scenes" else v for k, v in provenance.items() if k in ("pixels", "scenes", "shared")},
        "threshold": float(threshold),
        "metrics": metrics,
        "split": split,
        "training": training,
        **extra,
    }
    return json_safe(meta)


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through a temporary sibling, so a crash never leaves half a file."""
    tmp = path.with_name(f"{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


@dataclass
class SavedRun:
    """What a previous run left in ``out_dir``: counters, last-epoch metadata and optimiser state."""

    out_dir: Path
    state: dict[str, Any]
    metadata: dict[str, Any]
    optim: dict[str, Any]

    def load_weights(self, model: torch.nn.Module, ema: torch.optim.swa_utils.AveragedModel | None) -> None:
        """Last-epoch weights into ``model`` (and the weight average into ``ema``); :class:`ModelError` if they do not fit."""
        last = self.out_dir / LAST
        try:
            model.load_state_dict(load_state_dict(last))
            if ema is not None:
                ema.module.load_state_dict(load_state_dict(self.out_dir / EMA))
                ema.n_averaged.fill_(1)  # > 0: the next update averages instead of copying
        except RuntimeError as exc:
            raise ModelError(f"cannot resume from {last}: {str(exc).splitlines()[0]}") from None


def load_run(out_dir: Path, with_ema: bool) -> SavedRun | None:
    """The run saved in ``out_dir`` (None if there is none); ``with_ema``: the weight average must be there too."""
    state, last, optim = out_dir / STATE, out_dir / LAST, out_dir / OPTIM
    if not (state.is_file() and last.is_file() and optim.is_file()):
        return None
    if with_ema and not (out_dir / EMA).is_file():
        raise ModelError(f"{out_dir} has no {EMA} to resume the weight average from: use resume: false")
    return SavedRun(
        out_dir, json.loads(state.read_text()), read_metadata(last), torch.load(optim, map_location="cpu", weights_only=True)
    )


def save_best(out_dir: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """``best.safetensors``."""
    save_checkpoint(out_dir / BEST, model, metadata)


def save_last(
    out_dir: Path,
    model: torch.nn.Module,
    ema: torch.optim.swa_utils.AveragedModel | None,
    metadata: dict[str, Any],
    optim: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Everything a resumed run needs: last (and averaged) weights, optimiser state, counters."""
    save_checkpoint(out_dir / LAST, model, metadata)
    if ema is not None:
        save_checkpoint(out_dir / EMA, ema.module, metadata)
    _replace(out_dir / OPTIM, lambda tmp: torch.save(optim, tmp))
    _replace(out_dir / STATE, lambda tmp: write_text(tmp, json.dumps(json_safe(state), indent=2)))


def load_weights(model: torch.nn.Module, checkpoint: str | Path, prefixes: list[str] | None = None, what: str = "model") -> list[str]:
    """Copy the weights of ``checkpoint`` whose names start with one of ``prefixes`` (all: None) into
    ``model``; returns their names. :class:`ModelError` when one is missing or of another shape."""
    state = load_state_dict(checkpoint)
    own = model.state_dict()
    wanted = [k for k in own if prefixes is None or any(k.startswith(p) for p in prefixes)]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ModelError(f"checkpoint {checkpoint} lacks {what} weights ({len(missing)} missing, e.g. {missing[0]})")
    bad = [k for k in wanted if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(
            f"checkpoint {checkpoint} has an incompatible {what}: {bad[0]} is {tuple(state[bad[0]].shape)}, "
            f"the model expects {tuple(own[bad[0]].shape)}"
        )
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k])
    return wanted
