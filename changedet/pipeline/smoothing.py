"""Randomized smoothing for change maps: per-pixel certificates against L2 perturbations of the inputs.

The smoothed classifier (Cohen et al. 2019; for segmentation Fischer et al. 2021, "Scalable certified
segmentation via randomized smoothing") predicts, per pixel, the class the base classifier — the whole
detect path on a tile: normalisation, model, fixed threshold — returns most often when Gaussian noise
``N(0, σ²)`` (reflectance units) is added to every band of both dates:

* ``samples`` noisy passes per tile (noise on valid pixels only; seeded by the run's seed and the
  batch, so a rerun or a resumed run gives the same votes); the vote fraction ``k / n`` of "change"
  is what ``change_probability.tif`` holds;
* per pixel, the majority class ``A`` with ``n_A = max(k, n - k)`` votes, and a one-sided
  Clopper–Pearson lower bound ``p_A`` on its probability at level ``α / pixels`` (Bonferroni over every
  pixel of the grid: the whole map's certificates hold together with probability ``1 - α``);
* ``p_A > 1/2``: the pixel is certified, with L2 radius ``R = σ Φ⁻¹(p_A)`` (no perturbation of the
  inputs, all bands and both dates together, of L2 norm below ``R`` changes the smoothed prediction);
  otherwise the pixel **abstains** (:data:`ABSTAIN` in the mask, radius 0).

Tiles are blended with ``owner`` blending (each pixel from the one tile whose centre is nearest), so a
pixel's votes are exactly its owning tile's. Radii and σ are in 1/255 reflectance units, like attack
budgets. The certificate is for the model with the normalisation statistics (and any harmonisation)
fitted on the given inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from changedet.metrics import Confusion, ProbabilityHistogram

if TYPE_CHECKING:  # the noise comes from torch's generator (the certified figures were drawn with it)
    import torch

#: mask value of pixels where the smoothed classifier abstains
ABSTAIN = 2


@dataclass(frozen=True)
class Smoothing:
    """What a smoothed run needs on every worker.

    Attributes:
        sigma: noise standard deviation in 1/255 reflectance units.
        samples: noisy passes per tile.
        alpha: family-wise error of the map's certificates.
        threshold: the base classifier's fixed probability threshold.
        raw_per_reflectance: raw units of one reflectance unit (10000 for Sentinel-2 L1C).
        pixels: pixels of the grid (the Bonferroni count).
        seed: the run's seed.
    """

    sigma: float
    samples: int
    alpha: float
    threshold: float
    raw_per_reflectance: float
    pixels: int
    seed: int = 0

    @property
    def sigma_raw(self) -> float:
        """σ in raw input units."""
        return self.sigma / 255 * self.raw_per_reflectance

    @property
    def pixel_alpha(self) -> float:
        """The per-pixel level ``α / pixels``."""
        return self.alpha / max(self.pixels, 1)

    def generator(self, first_tile: int) -> torch.Generator:
        """The noise generator of the batch starting at ``first_tile``."""
        import torch

        return torch.Generator().manual_seed(self.seed * 1_000_003 + first_tile)

    def noisy(self, x: np.ndarray, valid: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """``x (B, C, h, w)`` raw plus Gaussian noise of σ on valid pixels."""
        import torch

        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).numpy() * np.float32(self.sigma_raw)
        return np.where(valid[:, None], x.astype(np.float32) + noise, x).astype(np.float32)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Mask value and certified radius for every vote count ``k = 0 … samples`` of "change"."""
        from scipy.stats import beta, norm  # scipy.stats takes ~0.5 s to import: only smoothed runs pay it

        k = np.arange(self.samples + 1)
        top = np.maximum(k, self.samples - k)
        lower = np.where(top > 0, beta.ppf(self.pixel_alpha, top, self.samples - top + 1), 0.0)
        certified = lower > 0.5
        radius = np.where(certified, self.sigma * norm.ppf(np.clip(lower, 0.5, 1.0)), 0.0).astype(np.float32)
        mask = np.where(certified, (k > self.samples - k).astype(np.uint8), np.uint8(ABSTAIN)).astype(np.uint8)
        return mask, radius

    def certify(self, fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel of a vote fraction ``k / n``: the mask (0, 1 or :data:`ABSTAIN`) and the certified
        radius (1/255 reflectance units, 0 where it abstains). A NaN fraction counts as no vote for
        change (callers mask invalid pixels)."""
        k = np.clip(np.rint(np.nan_to_num(fraction) * self.samples), 0, self.samples).astype(np.int64)
        mask, radius = self.tables()
        return mask[k], radius[k]

    @property
    def max_radius(self) -> float:
        """The largest radius this many samples can certify (every vote for one class)."""
        return float(self.tables()[1][-1])

    def describe(self) -> dict[str, float | int]:
        """``run.json``'s record of the smoothing."""
        return {"sigma_255": self.sigma, "samples": self.samples, "alpha": self.alpha, "pixel_alpha": self.pixel_alpha,
                "threshold": self.threshold, "max_radius_255": round(self.max_radius, 6)}  # fmt: skip


def certified_confusion(hist: ProbabilityHistogram, smoothing: Smoothing, radius: float) -> Confusion:
    """Worst-case confusion at L2 ``radius`` of a histogram of vote fractions (``samples <= bins / 2``,
    so every bin holds one vote count): a pixel counts as right only when its certified class is
    right with a radius of at least ``radius``; an abstaining or less certain pixel counts as wrong
    (a labelled change as a miss, a labelled no-change as a false alarm)."""
    mask, radii = smoothing.certify((np.arange(hist.bins) + 0.5) / hist.bins)
    sure = radii >= radius
    tp, tn = int(hist.pos[(mask == 1) & sure].sum()), int(hist.neg[(mask == 0) & sure].sum())
    return Confusion(tp, int(hist.neg.sum()) - tn, int(hist.pos.sum()) - tp, tn)


def abstained_fraction(hist: ProbabilityHistogram, smoothing: Smoothing) -> float:
    """Share of a vote-fraction histogram's pixels where the smoothed classifier abstains."""
    mask, _ = smoothing.certify((np.arange(hist.bins) + 0.5) / hist.bins)
    total = int(hist.pos.sum() + hist.neg.sum())
    return float((hist.pos + hist.neg)[mask == ABSTAIN].sum() / max(total, 1))
