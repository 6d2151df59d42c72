"""Binary change metrics from a streamed confusion matrix (change = positive class)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Confusion:
    """Pixel counts: true/false positives/negatives of the change class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> Confusion:
        """Add boolean ``pred``/``target`` pixels (only where ``valid``); returns self."""
        pred, target = np.asarray(pred, bool), np.asarray(target, bool)
        if valid is not None:
            pred, target = pred[valid], target[valid]
        self.tp += int(np.count_nonzero(pred & target))
        self.fp += int(np.count_nonzero(pred & ~target))
        self.fn += int(np.count_nonzero(~pred & target))
        self.tn += int(np.count_nonzero(~pred & ~target))
        return self

    @classmethod
    def from_metrics(cls, metrics: dict) -> Confusion:
        """The counts back from a :meth:`metrics` dict (e.g. one stored in checkpoint metadata)."""
        return cls(int(metrics["tp"]), int(metrics["fp"]), int(metrics["fn"]), int(metrics["tn"]))

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def total(self) -> int:
        """Number of evaluated pixels."""
        return self.tp + self.fp + self.fn + self.tn

    def metrics(self) -> dict[str, float]:
        """precision, recall, f1, iou, oa, kappa (NaN where a ratio is undefined) and the counts."""
        return {**change_metrics(self.tp, self.fp, self.fn, self.tn), **asdict(self)}


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def change_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Precision, recall, F1, IoU, overall accuracy and Cohen's kappa of the change class."""
    n = tp + fp + fn + tn
    oa = _ratio(tp + tn, n)
    expected = _ratio((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn), float(n) * n)
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "oa": oa,
        "kappa": _ratio(oa - expected, 1 - expected) if n else float("nan"),
    }


def classification_metrics(pred: np.ndarray, target: np.ndarray, n_classes: int | None = None) -> dict[str, float]:
    """Multi-class overall accuracy, average (per-class) accuracy and Cohen's kappa of integer labels."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    n = int(max(pred.max(initial=0), target.max(initial=0)) + 1) if n_classes is None else n_classes
    confusion = np.bincount(target * n + pred, minlength=n * n).reshape(n, n).astype(np.float64)
    total = confusion.sum()
    oa = _ratio(np.trace(confusion), total)
    expected = _ratio(float(confusion.sum(0) @ confusion.sum(1)), total * total)
    present = confusion.sum(1) > 0
    aa = float(np.mean(np.diag(confusion)[present] / confusion.sum(1)[present])) if present.any() else float("nan")
    return {"oa": oa, "aa": aa, "kappa": _ratio(oa - expected, 1 - expected)}
