"""What a training run produced (:class:`TrainResult`) and the one-line log of an epoch (:func:`epoch_summary`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    threshold: float
    best_epoch: int
    best_score: float | None
    metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    epochs_completed: int
    stopped_early: bool
    resumed_from: int | None = None
    pretraining: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None
    split: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        out = asdict(self)
        for key in ("out_dir", "best_checkpoint", "last_checkpoint"):
            out[key] = None if out[key] is None else str(out[key])
        return out


def epoch_summary(entry: dict[str, Any], epochs: int) -> str:
    """One log line of a history entry: loss (and parts), lr, time, and the validation metrics if it has them."""
    loss = entry.get("train_loss")
    line = f"epoch {entry['epoch']}/{epochs}: loss {loss:.4f}" if loss is not None else f"epoch {entry['epoch']}: no step"
    if entry.get("loss_parts"):
        line += " (" + ", ".join(f"{k} {v:.4f}" for k, v in entry["loss_parts"].items()) + ")"
    line += f", lr {entry['lr']:.2e}, {entry['train_seconds']:.1f}s"
    val = entry.get("val")
    if val:
        f1 = val["f1"] if val["f1"] is not None else float("nan")
        f05 = val["f1_at_0.5"] if val["f1_at_0.5"] is not None else float("nan")
        line += (
            f" | val F1 {f1:.4f} @ {val['threshold']:.3f} (F1@0.5 {f05:.4f}), IoU {val['iou'] or 0:.4f}, "
            f"kappa {val['kappa'] or 0:.4f}, {val['seconds']:.1f}s" + (" *best*" if entry.get("best") else "")
        )
    return line
