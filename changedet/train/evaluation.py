"""Validation on FULL scenes: sliding-window inference, blended mosaic, metrics and threshold tuning.

Every validation scene is tiled with :func:`changedet.tiling.plan_tiles` exactly as ``changedet
detect`` tiles it, predicted batch by batch, blended with :class:`changedet.mosaic.StreamingMosaic`
and compared row block by row block with the label. Instead of one confusion matrix, each scene
keeps two histograms of the change probability (of change and of no-change pixels, ``bins`` bins
over [0, 1]); the confusion matrix at any threshold ``k / bins`` follows exactly, so the
threshold can be tuned on the validation scenes afterwards without predicting again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from changedet.data.scenes import IGNORE, ChangeScene
from changedet.data.stats import scene_normalization_arrays
from changedet.metrics import Confusion
from changedet.models import ChangeModel
from changedet.mosaic import StreamingMosaic
from changedet.tiling import plan_tiles

DEFAULT_BINS = 1000

#: ``forward(x1, x2, valid, label) -> prob``: one batch of raw tiles ``(B, C, h, w)``, valid masks and
#: labels ``(B, h, w)`` to change probabilities ``(B, h, w)`` (see :func:`predict_scene`).
TileForward = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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

    def metrics(self, threshold: float) -> dict[str, Any]:
        """``{"threshold", "pooled": {...}, "per_scene": {name: {...}}, "mean_f1"}`` at ``threshold``.

        Each entry holds precision, recall, f1, iou, oa, kappa and tp/fp/fn/tn (undefined ratios
        are None, JSON-safe). ``mean_f1`` averages the per-scene F1 of scenes with changes.
        """
        per_scene = {name: _clean(h.confusion(threshold).metrics()) for name, h in self.scenes.items()}
        f1s = [m["f1"] for m in per_scene.values() if m["f1"] is not None and (m["tp"] + m["fn"]) > 0]
        return {
            "threshold": float(threshold),
            "pooled": _clean(self.pooled.confusion(threshold).metrics()),
            "per_scene": per_scene,
            "mean_f1": float(np.mean(f1s)) if f1s else None,
        }


def predict_scene(
    model: ChangeModel,
    scene: ChangeScene,
    normalization: dict[str, Any],
    sink: Callable[[int, np.ndarray, np.ndarray], None],
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: bool = False,
    blend: str = "cosine",
    forward: TileForward | None = None,
) -> None:
    """Sliding-window prediction of a whole scene; ``sink(row_off, prob (n, W), valid (n, W))`` gets rows in order.

    Tiles are normalised as :class:`changedet.predictor.TilePredictor` does (``(x - mean) / std``,
    invalid pixels 0) and blended as ``changedet detect`` blends them. ``forward`` replaces the
    normalise-and-predict step of each batch (e.g. an adversarial attack per tile); it gets the raw
    tiles and their labels.
    """
    (m1, s1), (m2, s2) = scene_normalization_arrays(normalization, scene)
    h, w = scene.shape
    tiles = plan_tiles(h, w, tile, overlap)
    device = torch.device(device)

    def rows(row_off: int, values: np.ndarray, valid: np.ndarray) -> None:
        sink(row_off, values[0], valid)

    mosaic = StreamingMosaic((h, w), tiles, 1, rows, overlap, blend)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(tiles), batch_size):
            batch = tiles[start : start + batch_size]
            reads = [scene.read(t.window) for t in batch]
            live = [(t, r) for t, r in zip(batch, reads) if r[2].any()]
            for t, r in zip(batch, reads):
                if not r[2].any():
                    mosaic.skip(t)
            if not live:
                continue
            if forward is not None:
                x1, x2, valid = (np.stack([r[k] for _, r in live]) for k in range(3))
                prob = forward(x1, x2, valid, np.stack([scene.label_window(t.window) for t, _ in live]))
            else:
                z1 = np.stack([np.where(r[2][None], (r[0] - m1) / s1, 0) for _, r in live]).astype(np.float32)
                z2 = np.stack([np.where(r[2][None], (r[1] - m2) / s2, 0) for _, r in live]).astype(np.float32)
                t1 = torch.from_numpy(z1).to(device)
                t2 = torch.from_numpy(z2).to(device)
                with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                    prob = torch.sigmoid(model(t1, t2).logits.float())[:, 0].cpu().numpy()
            for i, (t, r) in enumerate(live):
                mosaic.add(t, prob[i][None], r[2])
    finally:
        model.train(was_training)


def evaluate_scenes(
    model: ChangeModel,
    scenes: Sequence[ChangeScene],
    normalization: dict[str, Any],
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: bool = False,
    bins: int = DEFAULT_BINS,
    progress: Callable[[str], None] | None = None,
    forward: TileForward | None = None,
) -> ValidationResult:
    """Predict every labelled scene whole and collect per-scene probability histograms.

    Pixels count where the data are valid on both dates and the label is known; ``forward`` as in
    :func:`predict_scene`.
    """
    out: dict[str, ProbabilityHistogram] = {}
    for scene in scenes:
        hist = ProbabilityHistogram(bins)
        label = scene.label

        def sink(row_off: int, prob: np.ndarray, valid: np.ndarray, label=label, hist=hist) -> None:
            rows = label[row_off : row_off + prob.shape[0]]
            hist.update(np.nan_to_num(prob, nan=0.0), rows == 1, valid & (rows != IGNORE))

        predict_scene(model, scene, normalization, sink, tile, overlap, batch_size, device, amp, forward=forward)
        out[scene.name] = hist
        if progress:
            progress(scene.name)
    return ValidationResult(out, bins)
