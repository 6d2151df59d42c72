"""Radiometric harmonisation: a per-band monotone map of one date's values onto another's distribution.

:class:`QuantileMap` is histogram matching fitted once on a whole scene (quantiles of samples of
both dates) and then applied tile by tile, so every tile of a scene gets the same map. ``changedet
detect --harmonize histogram`` maps t2 onto t1 before normalisation; the domain-shift stage's
``histmatch`` baseline (:func:`changedet.evaluation.adaptation.match_histograms`) uses the same map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from changedet.normalization import Normalization

QUANTILES = 1024  # quantile levels of a fitted map


def sample_quantiles(samples: np.ndarray, n: int = QUANTILES) -> np.ndarray:
    """``(C, n)`` quantiles (levels ``linspace(0, 1, n)``) of valid pixel samples ``(N, C)``."""
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"quantiles need valid pixel samples (N, C), got shape {samples.shape}")
    return np.quantile(samples.astype(np.float64), np.linspace(0.0, 1.0, n), axis=0).T


def band_quantiles(x: np.ndarray, valid: np.ndarray, n: int = QUANTILES) -> np.ndarray:
    """``(C, n)`` quantiles of each band of ``x (C, H, W)`` over the pixels where ``valid``."""
    return sample_quantiles(x[:, valid].T, n)


@dataclass(frozen=True, eq=False)
class QuantileMap:
    """Maps each band's ``source (C, n)`` quantiles onto ``target (C, n)`` quantiles, piecewise
    linearly in between (values beyond the source range map to the target's extremes). Ties in
    the source quantiles (flat histograms, 8-bit data) map to the middle of their rank range."""

    source: np.ndarray
    target: np.ndarray

    def __post_init__(self) -> None:
        if self.source.shape != self.target.shape or self.source.ndim != 2:
            raise ValueError(f"source {self.source.shape} and target {self.target.shape} quantiles must both be (C, n)")

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, n: int = QUANTILES) -> "QuantileMap":
        """The map of valid pixel samples ``source (N, C)`` onto ``target (M, C)`` (same bands)."""
        if source.shape[1] != target.shape[1]:
            raise ValueError(f"harmonisation needs the same bands on both dates, got {source.shape[1]} and {target.shape[1]}")
        return cls(sample_quantiles(source, n), sample_quantiles(target, n))

    @property
    def bands(self) -> int:
        """Number of bands the map takes."""
        return self.source.shape[0]

    def apply(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``x (…, C, H, W)`` mapped band by band as float32; pixels where ``valid (…, H, W)`` is False are kept."""
        if x.shape[-3] != self.bands:
            raise ValueError(f"the map has {self.bands} bands, the image {x.shape[-3]}")
        levels = np.linspace(0.0, 1.0, self.source.shape[1])
        out = x.astype(np.float32, copy=True)
        for b in range(self.bands):
            band = out[..., b, :, :]
            values = x[..., b, :, :][valid].astype(np.float64)
            rank = (np.interp(values, self.source[b], levels) + np.interp(-values, -self.source[b][::-1], levels[::-1])) / 2
            band[valid] = np.interp(rank, levels, self.target[b])
        return out


def harmonized_normalization(normalization: Normalization) -> Normalization:
    """The statistics to apply once t2 is mapped onto t1: t1's for both dates."""
    return Normalization((normalization.dates[0], normalization.dates[0])) if normalization.dates is not None else normalization
