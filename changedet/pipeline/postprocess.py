"""From a blended change probability to the change mask: the threshold rule and small-region removal.

The same functions serve ``changedet detect`` (:mod:`changedet.pipeline.outputs`) and the selection
benchmarks that measure them (``benchmarks/select_oscd.py``), so what is measured is what is written.
"""

from __future__ import annotations

import numpy as np

from changedet.metrics import ProbabilityHistogram

CONNECTIVITY = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)  # 4-connected regions, as the polygons are
#: the ``otsu`` rule never goes below this: a scene without change has one population, whose noise Otsu would
#: split (the bundled model gives a date against itself at most 0.08; per-city Otsu thresholds in its CV: 0.17-0.41)
OTSU_FLOOR = 0.15


def scene_threshold(rule: str, fixed: float, histogram: ProbabilityHistogram | None = None) -> float:
    """The threshold of one scene: ``fixed`` for the fixed rule; for ``otsu``, Otsu's threshold of the
    scene's probability ``histogram`` (every valid pixel, no label), at least :data:`OTSU_FLOOR`."""
    if rule == "fixed":
        return float(fixed)
    if rule == "otsu":
        if histogram is None:
            raise ValueError("the otsu rule needs the scene's probability histogram")
        return max(histogram.otsu_threshold(), OTSU_FLOOR)
    raise ValueError(f"unknown threshold rule {rule!r}")


def drop_small_regions(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, int]:
    """``mask (H, W)`` bool without its 4-connected regions of fewer than ``min_pixels`` pixels, and
    how many regions were dropped (the whole mask is held in memory: about 5 bytes per pixel)."""
    if min_pixels <= 1 or not mask.any():
        return mask, 0
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes < min_pixels
    small[0] = False
    return mask & ~small[labels], int(small.sum())
