"""``changedet prune``: a checkpoint with a share of every convolution's filters, ready for a fine-tune.

The pruned checkpoint keeps the source's bands, normalisation, threshold and test-time options; its
``config`` is the narrower architecture (:func:`changedet.models.pruning.pruned_config`) and its
``pruning`` record names the source (bytes digest), the share kept and the parameters before and
after. The source's measured figures (``metrics``, ``expected_f1_unseen``, ``sample_scene``) are
dropped: they are not the pruned model's. Fine-tune it with ``changedet train --init-weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from changedet.checkpoint import load_state_dict, save_checkpoint
from changedet.errors import InputError, ModelError
from changedet.models import create_model
from changedet.models.pruning import prune_model, pruned_config
from changedet.pipeline.predictor import resolve_model

MEASURED = ("metrics", "expected_f1_unseen", "sample_scene")  # figures of the source that a pruned model lacks
METHOD = "structured: filters of smallest L1 norm removed from every convolution (torch-pruning dependency graph)"


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_checkpoint(model: str, out: str | Path, keep: float) -> dict[str, Any]:
    """Write checkpoint ``model`` (path or bundled name) pruned to ``keep`` of its filters to ``out``
    (atomically); returns the ``pruning`` record."""
    if not 0 < keep < 1:
        raise InputError(f"--keep must lie strictly between 0 and 1, not {keep}")
    spec = resolve_model(model)
    if spec.checkpoint is None:
        raise ModelError(f"changedet prune needs a trained checkpoint; {model} is a registry name")
    meta = spec.metadata
    in_channels = tuple(meta.get("input_channels") or (len(spec.bands[0]), len(spec.bands[1])))
    source = create_model(meta["model"], in_channels=list(in_channels), **meta["config"])
    source.load_state_dict(load_state_dict(spec.checkpoint))
    before = _parameters(source)
    pruned = prune_model(source, meta["model"], meta["config"], in_channels, keep)
    record = {"source": str(spec.checkpoint), "source_digest": spec.digest, "keep": keep, "method": METHOD,
              "parameters_before": before, "parameters_after": _parameters(pruned)}  # fmt: skip
    metadata = {k: v for k, v in meta.items() if k not in MEASURED}
    metadata.update(config=pruned_config(meta["model"], meta["config"], keep), input_channels=list(in_channels), pruning=record)
    save_checkpoint(out, pruned, metadata)
    return record
