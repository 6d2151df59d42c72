"""Paired augmentation of bi-temporal patches.

Geometry (dihedral flips/rotations, random crop) is drawn once and applied identically to both
dates, the label and the valid mask, so pixels stay co-registered. Photometry (per-band gain,
offset and Gaussian noise) is drawn independently per date: acquisitions differ in illumination
and atmosphere, and the model should not read that as change. An optional date swap exchanges
t1 and t2 (the label of a symmetric change map does not change).

All arrays are numpy, channels first: ``x1 (C1, H, W)``, ``x2 (C2, H, W)``, ``label (H, W)``,
``valid (H, W)`` (``label`` may carry extra leading axes: any array whose last two axes are the
patch is transformed the same way). Photometric jitter is meant for *normalised* values (zero mean, unit std per
band): ``x' = g * x + o + n`` with ``g ~ U(1 - gain, 1 + gain)`` and ``o ~ U(-offset, offset)``
per band and ``n ~ N(0, noise^2)`` per pixel, i.e. in raw units a gain about the band mean and
an offset/noise in band standard deviations. Invalid pixels are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """One draw of the paired geometric transform (applied by :meth:`apply`)."""

    rot90: int = 0
    hflip: bool = False
    vflip: bool = False
    crop: tuple[int, int, int, int] | None = None  # row, col, height, width

    def apply(self, a: np.ndarray) -> np.ndarray:
        """Transform the last two axes of ``a`` (crop, then rotate, then flip); returns a copy."""
        if self.crop is not None:
            r, c, h, w = self.crop
            a = a[..., r : r + h, c : c + w]
        if self.rot90:
            a = np.rot90(a, self.rot90, axes=(-2, -1))
        if self.hflip:
            a = a[..., :, ::-1]
        if self.vflip:
            a = a[..., ::-1, :]
        return np.ascontiguousarray(a)


@dataclass(frozen=True)
class PairedAugment:
    """Random paired augmentation; ``__call__(x1, x2, label, valid, rng)`` returns the four arrays.

    Attributes:
        hflip, vflip: random horizontal / vertical flips (p = 0.5 each).
        rot90: random multiple of 90° (square patches only).
        crop: random crop to ``crop × crop`` pixels (None: keep the patch size).
        gain, offset, noise: per-date photometric jitter amplitudes (0 disables).
        swap: probability of exchanging the two dates (needs the same bands on both dates).
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    crop: int | None = None
    gain: float = 0.1
    offset: float = 0.1
    noise: float = 0.02
    swap: float = 0.0

    def draw_geometry(self, shape: tuple[int, int], rng: np.random.Generator) -> Geometry:
        """A random :class:`Geometry` for a patch of ``shape``."""
        h, w = shape
        crop = None
        if self.crop is not None and (self.crop < h or self.crop < w):
            ch, cw = min(self.crop, h), min(self.crop, w)
            crop = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
            h, w = ch, cw
        k = int(rng.integers(0, 4)) if self.rot90 and h == w else 0
        return Geometry(k, bool(self.hflip and rng.random() < 0.5), bool(self.vflip and rng.random() < 0.5), crop)

    def jitter(self, x: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Per-band gain/offset and per-pixel noise of one date (valid pixels only)."""
        if not (self.gain or self.offset or self.noise):
            return x
        c = x.shape[0]
        g = rng.uniform(1 - self.gain, 1 + self.gain, size=(c, 1, 1)).astype(np.float32)
        o = rng.uniform(-self.offset, self.offset, size=(c, 1, 1)).astype(np.float32)
        out = x * g + o
        if self.noise:
            out = out + rng.normal(0.0, self.noise, size=x.shape).astype(np.float32)
        return np.where(valid[None], out, x).astype(np.float32)

    def __call__(
        self,
        x1: np.ndarray,
        x2: np.ndarray,
        label: np.ndarray,
        valid: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        geometry = self.draw_geometry(tuple(x1.shape[-2:]), rng)
        x1, x2, label, valid = (geometry.apply(a) for a in (x1, x2, label, valid))
        x1 = self.jitter(x1, valid, rng)
        x2 = self.jitter(x2, valid, rng)
        if self.swap and rng.random() < self.swap:
            if x1.shape[0] != x2.shape[0]:
                raise ValueError("date swap needs the same number of bands on both dates")
            x1, x2 = x2, x1
        return x1, x2, label, valid
