"""Cloud and cloud-shadow masks of each date: masked pixels are invalid in every output.

``--cloud-mask``:

* ``s2cloudless`` — Sentinel-2 L1C: the s2cloudless LightGBM pixel classifier (Sentinel Hub; it
  ships its model) on the bands B01 B02 B04 B05 B08 B8A B09 B10 B11 B12 as top-of-atmosphere
  reflectance (digital numbers / 10000), run on a coarse grid of the 60 m bands' pixel size (the
  authors recommend coarse grids), probability above :data:`S2CLOUDLESS_THRESHOLD` after smoothing (disk
  of 4 coarse px), dilated (disk of 2);
* ``scl`` — Sentinel-2 L2A: the scene classification band (a band or asset named ``SCL``), classes
  3 cloud shadow, 8/9 cloud medium/high probability, 10 thin cirrus, read on its own 20 m lattice;
* ``auto`` — ``scl`` where the date has an SCL band, else ``s2cloudless`` where it has the ten
  bands, else no mask (said in ``run.json``'s warnings); ``none`` — no mask.

Shadows (s2cloudless only; SCL classifies them): the cloud mask projected away from the sun for
cloud heights of :data:`SHADOW_HEIGHTS_M` when the sun's azimuth and elevation are known (a STAC
Item's ``view:sun_azimuth`` / ``view:sun_elevation``), kept where the date is dark in B08; otherwise
the documented fallback, the cloud mask dilated by :data:`SHADOW_DILATION_M`.

A :class:`CloudMask` is the mask of one date on a coarse grid whose pixel is ``factor`` x ``factor``
pixels of the common grid, bit-packed (small enough to travel in a run plan to every worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

from changedet.errors import InputError
from changedet.pipeline.grid import Grid
from changedet.io.scene import Scene, open_scene
from changedet.io.stac import is_stac_item, load_item
from changedet.io.stac import sun_angles as item_sun_angles

if TYPE_CHECKING:
    from changedet.pipeline.align import AlignedPair

CLOUD_MASKS = ("none", "auto", "s2cloudless", "scl")
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
#: s2cloudless's probability threshold: its 0.4 default flags up to 10 % of a cloud-free OSCD date (bright roofs
#: of beihai, bercy); 0.65 flags at most 1.3 % (paris t2) of the 28 dates, 0 in 27 (benchmarks/clouds.py)
S2CLOUDLESS_THRESHOLD = 0.65
SCL_MASKED = (3, 8, 9, 10)  # cloud shadow, cloud medium / high probability, thin cirrus
SHADOW_HEIGHTS_M = (300.0, 3000.0)
SHADOW_DILATION_M = 240.0
DARK_QUANTILE = 0.25  # a shadow candidate is darker in B08 than this quantile of the date's clear pixels


@dataclass(frozen=True)
class CloudMask:
    """One date's cloud (and shadow) mask on a coarse grid: ``factor`` grid pixels per coarse pixel."""

    method: str
    shadow: str
    factor: int
    shape: tuple[int, int]
    bits: bytes
    fraction: float

    @cached_property
    def coarse(self) -> np.ndarray:
        """The mask ``(h, w)`` on the coarse grid (True: cloud or shadow), unpacked once per process."""
        flat = np.unpackbits(np.frombuffer(self.bits, np.uint8), count=self.shape[0] * self.shape[1])
        return flat.reshape(self.shape).astype(bool)

    def __getstate__(self) -> dict:
        """Pickled packed: without the unpacked mask."""
        return {k: v for k, v in self.__dict__.items() if k != "coarse"}

    def window(self, window: Window) -> np.ndarray:
        """The mask on one window of the common grid (each coarse pixel covers ``factor`` x ``factor``)."""
        rows = (int(window.row_off) + np.arange(int(window.height))) // self.factor
        cols = (int(window.col_off) + np.arange(int(window.width))) // self.factor
        return self.coarse[np.ix_(rows, cols)]

    def to_dict(self) -> dict:
        """``run.json``'s description (without the mask)."""
        return {"method": self.method, "shadow": self.shadow, "cloud_fraction": round(self.fraction, 4),
                "mask_pixel": f"{self.factor} x {self.factor} grid pixels"}  # fmt: skip


def _has_bands(spec: str, bands: tuple[str, ...]) -> Scene | None:
    try:
        return open_scene(spec, list(bands))
    except InputError:
        return None


def _method(spec: str, requested: str) -> tuple[str, Scene] | None:
    """The method and the scene of its bands for one date; None for ``auto`` without usable bands."""
    if requested in ("scl", "auto") and (scl := _has_bands(spec, ("SCL",))) is not None:
        return "scl", scl
    if requested in ("s2cloudless", "auto") and (bands := _has_bands(spec, S2CLOUDLESS_BANDS)) is not None:
        return "s2cloudless", bands
    if requested == "auto":
        return None
    needs = "an SCL band (Sentinel-2 L2A)" if requested == "scl" else f"the bands {' '.join(S2CLOUDLESS_BANDS)} (Sentinel-2 L1C)"
    raise InputError(f"--cloud-mask {requested} needs {needs}; {spec} has none of that: use --cloud-mask none or auto")


def coarse_grid(grid: Grid, scene: Scene) -> tuple[Grid, int]:
    """The coarse grid of ``scene``'s coarsest band pixel (a whole number of grid pixels) over ``grid``."""
    coarsest = max(scene.bands, key=lambda b: b.grid.pixel_area)
    west, south, east, north = coarsest.grid.bounds_in(grid.crs)
    native = ((east - west) / coarsest.grid.width) if grid.crs is not None else abs(coarsest.grid.transform.a)
    factor = max(1, int(round(native / abs(grid.transform.a))))
    return grid.coarsened(factor), factor


def s2cloudless_mask(values: np.ndarray, valid: np.ndarray, thresholds: tuple[float, ...] = (S2CLOUDLESS_THRESHOLD,)) -> list[np.ndarray]:
    """s2cloudless cloud masks of ``values`` (:data:`S2CLOUDLESS_BANDS` ``(10, h, w)``, digital numbers)
    at each probability threshold (the classifier runs once), invalid pixels never cloud."""
    from s2cloudless import S2PixelCloudDetector

    reflectance = np.where(valid, values, 0.0) / 10000.0
    masks = []
    for threshold in thresholds:
        detector = S2PixelCloudDetector(threshold=threshold, average_over=4, dilation_size=2, all_bands=False)
        if not masks:
            probability = detector.get_cloud_probability_maps(np.moveaxis(reflectance, 0, -1)[None])
            probability[0][~valid] = 0.0
        masks.append(detector.get_mask_from_prob(probability)[0].astype(bool) & valid)
    return masks


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(np.ceil(radius)))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius * radius + 1e-9


def project_shadow(cloud: np.ndarray, dark: np.ndarray, sun_azimuth: float, sun_elevation: float, pixel_m: float) -> np.ndarray:
    """Where clouds at :data:`SHADOW_HEIGHTS_M` cast their shadow on a north-up grid of ``pixel_m``
    metre pixels (sun azimuth clockwise from north, elevation above the horizon, degrees), kept where
    ``dark``: the union of the cloud mask moved away from the sun by ``h / tan(elevation)`` per height."""
    if not 0.0 < sun_elevation <= 90.0:
        raise InputError(f"sun elevation {sun_elevation:g} degrees: the scene is not lit; use --cloud-mask none")
    away = np.deg2rad(sun_azimuth + 180.0)
    dx, dy = np.sin(away), -np.cos(away)  # columns grow east, rows grow south
    from scipy import ndimage  # here: scipy.ndimage only where clouds are masked

    low, high = (h / np.tan(np.deg2rad(sun_elevation)) / pixel_m for h in SHADOW_HEIGHTS_M)
    shadow = np.zeros_like(cloud)
    for step in np.arange(low, high + 1.0, 1.0):
        shadow |= ndimage.shift(cloud.astype(np.uint8), (dy * step, dx * step), order=0, cval=0).astype(bool)
    return shadow & dark & ~cloud


def _shadow(cloud: np.ndarray, values: np.ndarray, valid: np.ndarray, grid: Grid, sun: tuple[float, float] | None) -> tuple[np.ndarray, str]:
    pixel_m = grid.pixel_metres
    if sun is None:
        from scipy import ndimage

        radius = SHADOW_DILATION_M / pixel_m
        return ndimage.binary_dilation(cloud, _disk(radius)) & valid, f"dilated {SHADOW_DILATION_M:g} m (no sun geometry)"
    nir = values[S2CLOUDLESS_BANDS.index("B08")]
    clear = valid & ~cloud
    dark = valid & (nir < np.quantile(nir[clear], DARK_QUANTILE)) if clear.any() else np.zeros_like(valid)
    return cloud | project_shadow(cloud, dark, sun[0], sun[1], pixel_m), "projected by sun geometry"


def cloud_mask(spec: str, pair: AlignedPair, date: int, requested: str, shift: tuple[float, float] | None = None,
               sun: tuple[float, float] | None = None) -> CloudMask | None:  # fmt: skip
    """The mask of date ``date`` (0: t1, 1: t2) of ``pair`` read from its input ``spec``; None when
    ``requested`` is ``auto`` and the date has no usable bands. ``shift``: the co-registration applied to
    t2 (the mask moves with it); ``sun``: (azimuth, elevation) in degrees when known."""
    found = _method(spec, requested)
    if found is None:
        return None
    method, scene = found
    from changedet.pipeline.align import read_scene_on_grid  # align imports this module

    if shift is not None:
        from changedet.pipeline.coregistration import shifted_scene

        scene = shifted_scene(scene, pair.grid, shift)
    coarse, factor = coarse_grid(pair.grid, scene)
    if method == "scl":
        values, valid = read_scene_on_grid(scene, pair, coarse, "nearest")
        masked, shadow = np.isin(values[0], SCL_MASKED) & valid, "SCL class 3"
    else:
        values, valid = read_scene_on_grid(scene, pair, coarse, "bilinear")
        cloud = s2cloudless_mask(values, valid)[0]
        masked, shadow = _shadow(cloud, values, valid, coarse, sun)
    fraction = float(masked.sum() / max(1, valid.sum()))
    return CloudMask(method, shadow, factor, masked.shape, np.packbits(masked.ravel()).tobytes(), fraction)


def sun_angles(spec: str) -> tuple[float, float] | None:
    """The sun's (azimuth, elevation) in degrees when ``spec`` is a STAC Item that records them
    (:func:`changedet.io.stac.sun_angles`); None for other inputs (shadows then fall back to dilation)."""
    if not is_stac_item(spec):
        return None
    return item_sun_angles(load_item(spec))
