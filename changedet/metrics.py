"""Binary change metrics from a streamed confusion matrix (change = positive class), and per-scene
probability histograms from which the confusion at any threshold follows exactly.

Instead of one confusion matrix, full-scene validation keeps two histograms of the change
probability per scene (of change and of no-change pixels, ``bins`` bins over [0, 1]); the
confusion matrix at any threshold ``k / bins`` follows exactly, so the threshold can be tuned on the
validation scenes afterwards without predicting again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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


DEFAULT_BINS = 1000


def otsu_from_histogram(counts: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold of a histogram (``counts`` per bin between ``edges``): the bin edge that
    maximises the between-class variance (ties: the lowest such edge)."""
    counts = np.asarray(counts, np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


IGNORE = 255  # label value of pixels whose class is unknown: never scored, never trained on


@dataclass
class ProbabilityHistogram:
    """Counts of change (``pos``) and no-change (``neg``) pixels per probability bin."""

    bins: int = DEFAULT_BINS
    pos: np.ndarray = field(default=None)  # type: ignore[assignment]
    neg: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.pos is None:
            self.pos = np.zeros(self.bins, np.int64)
        if self.neg is None:
            self.neg = np.zeros(self.bins, np.int64)

    def update(self, prob: np.ndarray, target: np.ndarray, valid: np.ndarray) -> None:
        """Add pixels: ``prob`` in [0, 1], boolean ``target``, only where ``valid``."""
        p, t = prob[valid], target[valid]
        idx = np.clip(np.floor(p.astype(np.float64) * self.bins), 0, self.bins - 1).astype(np.int64)
        self.pos += np.bincount(idx[t], minlength=self.bins)
        self.neg += np.bincount(idx[~t], minlength=self.bins)

    def __add__(self, other: "ProbabilityHistogram") -> "ProbabilityHistogram":
        return ProbabilityHistogram(self.bins, self.pos + other.pos, self.neg + other.neg)

    def confusion(self, threshold: float) -> Confusion:
        """Confusion of ``prob >= threshold`` (threshold rounded down to a bin edge)."""
        k = int(np.clip(np.floor(threshold * self.bins + 1e-9), 0, self.bins))
        tp, fn = int(self.pos[k:].sum()), int(self.pos[:k].sum())
        fp, tn = int(self.neg[k:].sum()), int(self.neg[:k].sum())
        return Confusion(tp, fp, fn, tn)

    def f1_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Thresholds ``k / bins`` (k = 1 .. bins-1) and the F1 at each."""
        tp = np.cumsum(self.pos[::-1])[::-1]  # predicted change at threshold k/bins: bins >= k
        fp = np.cumsum(self.neg[::-1])[::-1]
        fn = self.pos.sum() - tp
        k = np.arange(1, self.bins)
        denom = 2 * tp[k] + fp[k] + fn[k]
        f1 = np.where(denom > 0, 2 * tp[k] / np.maximum(denom, 1), 0.0)
        return k / self.bins, f1

    def otsu_threshold(self) -> float:
        """Label-free: Otsu's threshold of the histogram of every counted pixel (change or not)."""
        return otsu_from_histogram(self.pos + self.neg, np.linspace(0.0, 1.0, self.bins + 1))

    def best_threshold(self) -> float:
        """Threshold maximising F1 (ties: the one closest to 0.5)."""
        thresholds, f1 = self.f1_curve()
        best = f1.max()
        candidates = thresholds[f1 >= best - 1e-12]
        return float(candidates[np.argmin(np.abs(candidates - 0.5))])


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}


@dataclass
class ValidationResult:
    """Per-scene probability histograms with metrics at any threshold."""

    scenes: dict[str, ProbabilityHistogram]
    bins: int = DEFAULT_BINS

    @property
    def pooled(self) -> ProbabilityHistogram:
        """All scenes together (pixel-pooled)."""
        total = ProbabilityHistogram(self.bins)
        for h in self.scenes.values():
            total = total + h
        return total

    def tune_threshold(self) -> float:
        """The threshold maximising pooled F1."""
        return self.pooled.best_threshold()

    def metrics(self, threshold: float | dict[str, float]) -> dict[str, Any]:
        """``{"threshold", "pooled": {...}, "per_scene": {name: {...}}, "mean_f1"}`` at ``threshold``
        (one for every scene, or one per scene: the pooled counts are then the sum of each scene's).

        Each entry holds precision, recall, f1, iou, oa, kappa and tp/fp/fn/tn (undefined ratios
        are None, JSON-safe). ``mean_f1`` averages the per-scene F1 of scenes with changes.
        """
        at = threshold if isinstance(threshold, dict) else dict.fromkeys(self.scenes, threshold)
        confusions = {name: h.confusion(at[name]) for name, h in self.scenes.items()}
        per_scene = {name: _clean(c.metrics()) for name, c in confusions.items()}
        f1s = [m["f1"] for m in per_scene.values() if m["f1"] is not None and (m["tp"] + m["fn"]) > 0]
        pooled = sum(confusions.values(), Confusion()) if isinstance(threshold, dict) else self.pooled.confusion(threshold)
        return {
            "threshold": {k: float(v) for k, v in threshold.items()} if isinstance(threshold, dict) else float(threshold),
            "pooled": _clean(pooled.metrics()),
            "per_scene": per_scene,
            "mean_f1": float(np.mean(f1s)) if f1s else None,
        }
