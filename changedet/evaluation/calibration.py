"""Calibration of the change probability: expected calibration error (ECE).

Binary ECE with ``bins`` equal-width bins of the predicted change probability ``p``:
``ECE = sum_b n_b / N * |mean(y in b) - mean(p in b)|`` — the gap between how often pixels of a bin
really changed and how confident the model was, weighted by the share of pixels in the bin.
"""

from __future__ import annotations

import numpy as np

from changedet.metrics import ProbabilityHistogram

DEFAULT_ECE_BINS = 15


def _ece(positives: np.ndarray, confidence: np.ndarray, total: float) -> float:
    """``sum_b |positives_b - confidence_b| / total`` (per-bin count of changes and sum of ``p``)."""
    return float(np.abs(positives - confidence).sum() / total) if total else float("nan")


def expected_calibration_error(
    prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None, bins: int = DEFAULT_ECE_BINS
) -> float:
    """ECE of probabilities ``prob`` against boolean ``target`` (pixels where ``valid``); NaN without pixels."""
    p = np.asarray(prob, np.float64)
    y = np.asarray(target, bool)
    if valid is not None:
        p, y = p[valid], y[valid]
    idx = np.clip(np.floor(p * bins), 0, bins - 1).astype(np.int64)
    return _ece(np.bincount(idx, y, bins), np.bincount(idx, p, bins), p.size)


def histogram_ece(hist: ProbabilityHistogram, bins: int = DEFAULT_ECE_BINS) -> float:
    """ECE from a :class:`~changedet.metrics.ProbabilityHistogram` (what full-scene evaluation keeps).

    Each fine bin stands for its centre probability, so the result is within ``0.5 / hist.bins``
    of :func:`expected_calibration_error` on the pixels themselves.
    """
    centres = (np.arange(hist.bins) + 0.5) / hist.bins
    idx = np.clip(np.floor(centres * bins), 0, bins - 1).astype(np.int64)
    count = (hist.pos + hist.neg).astype(np.float64)
    return _ece(np.bincount(idx, hist.pos.astype(np.float64), bins), np.bincount(idx, count * centres, bins), count.sum())
