"""From a blended change probability to the change mask: the threshold rule and small-region removal.

The same functions serve ``changedet detect`` (:mod:`changedet.pipeline.outputs`) and the selection
benchmarks that measure them (``benchmarks/select_oscd.py``), so what is measured is what is written.
"""

from __future__ import annotations

import numpy as np

from changedet.metrics import ProbabilityHistogram

CONNECTIVITY = np.ones((3, 3), bool)  # 8-connected regions, as the polygons are


def scene_threshold(rule: str, fixed: float, histogram: ProbabilityHistogram | None = None) -> float:
    """The threshold of one scene: ``fixed`` for the fixed rule; for ``otsu``, Otsu's threshold of the
    scene's probability ``histogram`` (every valid pixel, no label)."""
    if rule == "fixed":
        return float(fixed)
    if rule == "otsu":
        if histogram is None:
            raise ValueError("the otsu rule needs the scene's probability histogram")
        return histogram.otsu_threshold()
    raise ValueError(f"unknown threshold rule {rule!r}")


def drop_small_regions(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, int]:
    """``mask (H, W)`` bool without its 8-connected regions of fewer than ``min_pixels`` pixels, and
    how many regions were dropped (the whole mask is held in memory: about 5 bytes per pixel)."""
    if min_pixels <= 1 or not mask.any():
        return mask, 0
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = sizes < min_pixels
    small[0] = False
    return mask & ~small[labels], int(small.sum())
