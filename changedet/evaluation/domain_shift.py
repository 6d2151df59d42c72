"""Realistic domain shifts applied to t2 (or both dates), with a severity scale, and their evaluation.

Every shift in :data:`SHIFTS` maps reflectance ``r = raw / sensor.scale`` of one date ``(C, H, W)``
to shifted reflectance; its amplitude grows linearly with ``severity`` (0 = identity, 1–5 are the
reported levels, floats allowed). :func:`apply_shift` converts units, keeps the result in the
sensor range (:class:`~changedet.evaluation.sensor.Sensor`) and leaves invalid pixels untouched.
Random parameters (which band, which direction, noise) come from ``seed``.

=================  ===========================================================================
``gain_offset``    per-band gain ``1 ± 0.04 s`` and offset ``± 0.005 s`` (calibration drift)
``gamma``          per-band gamma ``exp(± 0.06 s)`` (non-linear radiometry)
``haze``           ``r (1 - t) + t A_λ``, ``t = 0.04 s``, airlight ``A`` stronger in the blue
``gaussian_noise`` additive noise, σ = ``0.004 s`` reflectance
``speckle``        multiplicative noise ``r (1 + 0.04 s n)``
``blur``           Gaussian blur, σ = ``0.4 s`` px (coarser resolution)
``band_dropout``   ``ceil(s C / 10)`` random bands read 0 (failed detector)
``misregistration`` the image moved by ``s`` px in a random direction (co-registration error)
``seasonal``       brightness ``1 - 0.02 s`` and a red-edge gain ``± 0.05 s`` (phenology)
``jpeg``           8×8 block DCT with quantisation step ``0.002 s (1 + i + j)`` (lossy compression)
=================  ===========================================================================
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from changedet.data.scenes import ChangeScene
from changedet.errors import ChangeDetError
from changedet.evaluation.adaptation import adabn, match_scene
from changedet.evaluation.sensor import SENTINEL2_L1C, Sensor, scene_sensor
from changedet.models import ChangeModel
from changedet.metrics import ValidationResult
from changedet.normalization import Normalization
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE
from changedet.pipeline.validation import evaluate_scenes

SEVERITIES = (1, 2, 3, 4, 5)
ADAPTATIONS = ("none", "adabn", "histmatch")
#: centre wavelengths (µm) of Sentinel-2 MSI bands
WAVELENGTHS = {
    "B01": 0.443, "B02": 0.490, "B03": 0.560, "B04": 0.665, "B05": 0.705, "B06": 0.740, "B07": 0.783,
    "B08": 0.842, "B8A": 0.865, "B09": 0.945, "B10": 1.375, "B11": 1.610, "B12": 2.190,
}  # fmt: skip

#: ``fn(r (C, H, W) float64 reflectance, valid (H, W), severity, rng, band names) -> shifted r``
ShiftFn = Callable[[np.ndarray, np.ndarray, float, np.random.Generator, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Shift:
    """A registered shift."""

    name: str
    fn: ShiftFn
    description: str


SHIFTS: dict[str, Shift] = {}


def register_shift(name: str, description: str) -> Callable[[ShiftFn], ShiftFn]:
    """Decorator adding a shift to :data:`SHIFTS`."""

    def add(fn: ShiftFn) -> ShiftFn:
        SHIFTS[name] = Shift(name, fn, description)
        return fn

    return add


def _wavelengths(bands: Sequence[str], count: int) -> np.ndarray | None:
    lam = [WAVELENGTHS.get(b.upper()) for b in bands]
    return np.asarray(lam) if len(lam) == count and None not in lam else None


def _per_band(values: np.ndarray) -> np.ndarray:
    return values[:, None, None]


def _filled(r: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``r`` with invalid pixels replaced by the band mean of valid pixels (for spatial filters)."""
    if valid.all() or not valid.any():
        return r
    means = r[:, valid].mean(axis=1)
    return np.where(valid[None], r, _per_band(means))


@register_shift("gain_offset", "per-band gain and offset (calibration drift)")
def _gain_offset(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    c = r.shape[0]
    return r * _per_band(1 + 0.04 * s * rng.uniform(-1, 1, c)) + _per_band(0.005 * s * rng.uniform(-1, 1, c))


@register_shift("gamma", "per-band gamma (non-linear radiometry)")
def _gamma(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    return np.maximum(r, 0.0) ** _per_band(np.exp(0.06 * s * rng.uniform(-1, 1, r.shape[0])))


@register_shift("haze", "haze / atmospheric path radiance, stronger at short wavelengths")
def _haze(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    lam = _wavelengths(bands, r.shape[0])
    airlight = 0.3 * (0.49 / lam) if lam is not None else np.full(r.shape[0], 0.3)
    t = 0.04 * s
    return r * (1 - t) + t * _per_band(airlight)


@register_shift("gaussian_noise", "additive Gaussian noise")
def _gaussian_noise(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    return r + 0.004 * s * rng.standard_normal(r.shape)


@register_shift("speckle", "multiplicative (speckle-like) noise")
def _speckle(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    return r * (1 + 0.04 * s * rng.standard_normal(r.shape))


@register_shift("blur", "Gaussian blur (coarser resolution)")
def _blur(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    from scipy import ndimage  # scipy only when the shift runs (the CLI imports this module for its options)

    return ndimage.gaussian_filter(_filled(r, valid), sigma=(0, 0.4 * s, 0.4 * s), mode="nearest")


@register_shift("band_dropout", "random bands read 0 (failed detector)")
def _band_dropout(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    c = r.shape[0]
    dropped = rng.permutation(c)[: min(c - 1, math.ceil(s * c / 10))]
    out = r.copy()
    out[dropped] = 0.0
    return out


@register_shift("misregistration", "co-registration error of s pixels in a random direction")
def _misregistration(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = round(s * np.sin(angle)), round(s * np.cos(angle))
    if dy == 0 and dx == 0:
        return r
    h, w = r.shape[1:]
    pad = max(abs(dy), abs(dx))
    padded = np.pad(_filled(r, valid), ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    return padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w]


@register_shift("seasonal", "seasonal colour shift: darker scene, red-edge (vegetation) gain")
def _seasonal(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    c = r.shape[0]
    lam = _wavelengths(bands, c)
    profile = np.tanh((lam - 0.72) / 0.05) if lam is not None else np.linspace(-1, 1, c)
    return r * _per_band((1 - 0.02 * s) * (1 + 0.05 * s * rng.choice([-1.0, 1.0]) * profile))


@register_shift("jpeg", "JPEG-like 8x8 block DCT quantisation")
def _jpeg(r: np.ndarray, valid: np.ndarray, s: float, rng: np.random.Generator, bands: Sequence[str]) -> np.ndarray:
    if s == 0:
        return r
    c, h, w = r.shape
    ph, pw = -h % 8, -w % 8
    x = np.pad(_filled(r, valid), ((0, 0), (0, ph), (0, pw)), mode="edge")
    blocks = x.reshape(c, (h + ph) // 8, 8, (w + pw) // 8, 8).transpose(0, 1, 3, 2, 4)
    from scipy import fft

    coef = fft.dctn(blocks, axes=(-2, -1), norm="ortho")
    step = 0.002 * s * (1 + np.add.outer(np.arange(8), np.arange(8)))
    rec = fft.idctn(np.round(coef / step) * step, axes=(-2, -1), norm="ortho")
    return rec.transpose(0, 1, 3, 2, 4).reshape(c, h + ph, w + pw)[:, :h, :w]


def _check(name: str) -> Shift:
    if name not in SHIFTS:
        raise ChangeDetError(f"unknown domain shift {name!r}; choose one of {', '.join(SHIFTS)}")
    return SHIFTS[name]


def _seed(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def apply_shift(
    name: str,
    x: np.ndarray,
    valid: np.ndarray,
    severity: float,
    sensor: Sensor = SENTINEL2_L1C,
    bands: Sequence[str] = (),
    seed: int = 0,
) -> np.ndarray:
    """Shift ``x (C, H, W)`` raw values of one date; float32, in the sensor range, invalid pixels as they were."""
    shift = _check(name)
    if severity < 0:
        raise ChangeDetError(f"severity must be >= 0, got {severity}")
    r = x.astype(np.float64) / sensor.scale
    out = shift.fn(r, valid, float(severity), _seed(seed, name), tuple(bands)) * sensor.scale
    return np.where(valid[None], sensor.clip(out, x), x).astype(np.float32)


def shift_scene(
    scene: ChangeScene, name: str, severity: float, dates: str = "t2", sensor: Sensor | None = None, seed: int = 0
) -> ChangeScene:
    """An in-memory copy of ``scene`` with the shift applied to ``t2`` or ``both`` dates."""
    if dates not in ("t2", "both"):
        raise ChangeDetError(f"shift dates must be t2 or both, got {dates!r}")
    sensor = sensor or scene_sensor(scene)
    x1, x2, valid = scene.pixels()
    b1, b2 = scene.bands
    y1 = apply_shift(name, x1, valid, severity, sensor, b1, seed + 1) if dates == "both" else x1
    return scene.with_pixels(y1, apply_shift(name, x2, valid, severity, sensor, b2, seed))


def evaluate_shift(
    model: ChangeModel,
    scenes: Sequence[ChangeScene],
    normalization: Normalization | dict[str, Any],
    shift: str | None,
    severity: float,
    adaptation: str = "none",
    dates: str = "t2",
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> ValidationResult:
    """Shift each scene (``shift=None``: as it is), optionally adapt (``adabn`` on that scene, or
    ``histmatch`` t2 onto t1), then evaluate it whole; per-scene histograms as
    :func:`~changedet.pipeline.validation.evaluate_scenes`."""
    if adaptation not in ADAPTATIONS:
        raise ChangeDetError(f"unknown adaptation {adaptation!r}; choose one of {', '.join(ADAPTATIONS)}")
    out = {}
    for scene in scenes:
        target = scene if shift is None else shift_scene(scene, shift, severity, dates, seed=seed)
        if adaptation == "histmatch":
            target = match_scene(target)
        net = adabn(model, [target], normalization, tile, overlap, batch_size, device) if adaptation == "adabn" else model
        out.update(evaluate_scenes(net, [target], normalization, tile, overlap, batch_size, device).scenes)
    return ValidationResult(out)
