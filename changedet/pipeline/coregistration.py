"""Co-registration of t2 onto t1: measure the offset between the dates, and correct it in the warp.

:func:`measure_offset` reads a 3 x 3 lattice of windows of the common grid (both dates, as the model
sees them), averages each date's bands on the finest native grid after standardising them, and
finds each window's translation by phase correlation with sub-pixel upsampling
(:func:`skimage.registration.phase_cross_correlation`). The robust median of the windows is the
offset; it is trusted (``confidence: high``) only when at least :data:`MIN_AGREEING` windows with
texture agree with it to :data:`AGREEMENT_PX`. Textureless, changed-everywhere or cross-sensor
pairs give ``low`` (or ``none``) confidence and no ``shift_px`` rather than a wrong shift.

Convention (``run.json``'s ``coregistration.shift_px = [dx, dy]``): a feature at column c, row r of
t1 appears at column c + dx, row r + dy of t2 as read on the common grid (t1 pixels).
:func:`shifted_scene` undoes it by moving t2's georeference (every band's transform) by the
opposite ground displacement; the reader's single warp then resamples t2 once, onto t1's lattice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from affine import Affine
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from changedet.errors import InputError
from changedet.pipeline.align import AlignedPair, PairReader
from changedet.pipeline.grid import Grid
from changedet.io.scene import Scene

UPSAMPLE = 50  # 1/50 px resolution of the correlation peak
AGREEMENT_PX = 0.5  # a window agrees when its shift is this close (Euclidean) to the median
MIN_AGREEING = 3  # windows that must agree for a trusted offset
MIN_WINDOW = 32  # smallest window side measured
MAX_WINDOW = 256
MIN_VALID = 0.9  # fraction of valid pixels a window needs


@dataclass(frozen=True)
class Coregistration:
    """The measured t2 -> t1 offset and whether the run corrected it.

    ``shift_px`` is ``(dx, dy)`` in t1 pixels when the measurement is trusted, else None;
    ``estimate_px`` the median of the measured windows either way (None when none was measured);
    ``confidence`` is ``high``, ``low`` or ``none`` (not measurable: ``reason`` says why).
    """

    shift_px: tuple[float, float] | None
    estimate_px: tuple[float, float] | None
    confidence: str
    windows: int
    agreeing: int
    spread_px: float | None
    window_px: int
    reason: str | None = None
    applied: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for ``run.json``."""
        data = asdict(self)
        for key in ("shift_px", "estimate_px"):
            data[key] = None if data[key] is None else [round(float(v), 3) for v in data[key]]
        data["spread_px"] = None if self.spread_px is None else round(float(self.spread_px), 3)
        data["method"] = f"phase correlation (scikit-image), 1/{UPSAMPLE} px, median of windows"
        return data


def _unmeasured(reason: str, window_px: int = 0) -> Coregistration:
    return Coregistration(None, None, "none", 0, 0, None, window_px, reason)


def _window_layout(grid: Grid) -> tuple[int, list[Window]]:
    """Window side and a 3 x 3 lattice of windows spread over the grid (overlapping on small grids)."""
    side = int(np.clip(min(grid.shape) // 2, MIN_WINDOW, MAX_WINDOW))
    rows = np.unique(np.linspace(0, grid.height - side, 3).astype(int))
    cols = np.unique(np.linspace(0, grid.width - side, 3).astype(int))
    return side, [Window(int(c), int(r), side, side) for r in rows for c in cols]


def _finest_positions(scene: Scene) -> list[int]:
    finest = min(b.grid.pixel_area for b in scene.bands)
    return [i for i, b in enumerate(scene.bands) if np.isclose(b.grid.pixel_area, finest, rtol=1e-6)]


def _texture_image(values: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """The mean of the standardised bands (invalid pixels at 0, the mean); None when flat."""
    out = np.zeros(valid.shape, np.float64)
    used = 0
    for band in values:
        pixels = band[valid].astype(np.float64)
        std = pixels.std()
        if std <= 1e-6 * (1.0 + abs(pixels.mean())):
            continue
        out[valid] += (pixels - pixels.mean()) / std
        used += 1
    return out / used if used else None


def _window_shift(x1: np.ndarray, x2: np.ndarray) -> tuple[float, float]:
    """``(dx, dy)`` of one window: where t1's content sits in t2."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(x1, x2, upsample_factor=UPSAMPLE)
    return -float(shift[1]), -float(shift[0])


def _lattice_offset(pair: AlignedPair, positions: list[int]) -> tuple[float, float] | None:
    """Where t2's native lattice sits in the common grid's pixels, modulo 1 (in [-0.5, 0.5)), when its
    measured bands share the grid's CRS, orientation and pixel size; None when t2 must be resampled."""
    grid, own = pair.grid, pair.t2.bands[positions[0]].grid
    if grid.crs is None or own.crs != grid.crs or not own.is_north_up or not grid.is_north_up:
        return None
    if not np.allclose(own.res, grid.res, rtol=1e-9, atol=0):
        return None
    u, v = ~own.transform @ (grid.transform.c, grid.transform.f)
    return float(u - np.round(u)), float(v - np.round(v))


def measure_offset(pair: AlignedPair) -> Coregistration:
    """Measure the t2 -> t1 offset of ``pair`` (see the module docstring).

    Only bands that both dates have (by name) on their finest native grids are used. t2 is read on
    its own pixel lattice when it shares the grid's CRS and pixel size (an interpolated t2 pulls
    sub-pixel estimates towards whole pixels: bilinear by ~0.13 px at a quarter pixel), and the
    lattice's sub-pixel position is added back. Pairs of different sensors, grids under
    :data:`MIN_WINDOW` px, and windows with under :data:`MIN_VALID` valid pixels or no texture are
    not measured.
    """
    if min(pair.grid.shape) < MIN_WINDOW:
        return _unmeasured(f"the common grid ({pair.grid.height} x {pair.grid.width} px) is under {MIN_WINDOW} px")
    names2 = {n.upper(): i for i, n in enumerate(pair.t2.band_names)}
    common = [(i, names2[pair.t1.bands[i].name.upper()]) for i in _finest_positions(pair.t1)
              if pair.t1.bands[i].name.upper() in names2]  # fmt: skip
    if not common or pair.t1.count != pair.t2.count:
        return _unmeasured("t1 and t2 do not share bands (different sensors): phase correlation needs the same bands")
    p1, p2 = [c[0] for c in common], [c[1] for c in common]
    lattice = _lattice_offset(pair, p2) or (0.0, 0.0)
    on_lattice = replace(pair, grid=replace(pair.grid, transform=pair.grid.transform @ Affine.translation(-lattice[0], -lattice[1])))
    side, windows = _window_layout(pair.grid)
    shifts = []
    with PairReader(pair) as grid_reader, PairReader(on_lattice) as lattice_reader:
        for window in windows:
            x1, _, valid1 = grid_reader.read(window)
            _, x2, valid2 = lattice_reader.read(window)
            valid = valid1 & valid2
            if valid.mean() < MIN_VALID:
                continue
            a, b = _texture_image(x1[p1], valid), _texture_image(x2[p2], valid)
            if a is not None and b is not None:
                dx, dy = _window_shift(a, b)
                shifts.append((dx - lattice[0], dy - lattice[1]))
    if not shifts:
        return _unmeasured("no window of the overlap has texture and valid pixels in both dates", side)
    measured = np.array(shifts)
    median = np.median(measured, axis=0)
    distance = np.hypot(*(measured - median).T)
    agreeing = distance <= AGREEMENT_PX
    estimate, spread = (float(median[0]), float(median[1])), float(np.median(distance))
    if agreeing.sum() < MIN_AGREEING:
        reason = f"only {int(agreeing.sum())} of {len(shifts)} windows agree within {AGREEMENT_PX} px"
        return Coregistration(None, estimate, "low", len(shifts), int(agreeing.sum()), spread, side, reason)
    best = np.median(measured[agreeing], axis=0)
    return Coregistration((float(best[0]), float(best[1])), estimate, "high", len(shifts), int(agreeing.sum()), spread, side)


def _ground_offset(grid: Grid, shift: tuple[float, float], crs: Any) -> tuple[float, float]:
    """The displacement of a ``shift`` of the common grid's pixels, in ``crs`` units at the grid's centre."""
    t = grid.transform
    cx, cy = t @ (grid.width / 2, grid.height / 2)
    gx, gy = t.a * shift[0] + t.b * shift[1], t.d * shift[0] + t.e * shift[1]
    if crs is None or crs == grid.crs:
        return gx, gy
    xs, ys = transform_points(grid.crs, crs, [cx, cx + gx], [cy, cy + gy])
    return xs[1] - xs[0], ys[1] - ys[0]


def shifted_scene(scene: Scene, grid: Grid, shift: tuple[float, float]) -> Scene:
    """``scene`` with every band's transform moved so that content at ``(c + dx, r + dy)`` of the
    common ``grid`` lands on ``(c, r)``: the correction of a measured :class:`Coregistration`."""
    if grid.crs is None:
        raise InputError("--coregister moves t2's georeference: these inputs have none (give georeferenced rasters)")
    bands = []
    for band in scene.bands:
        gx, gy = _ground_offset(grid, shift, band.grid.crs)
        moved = replace(band.grid, transform=Affine.translation(-gx, -gy) @ band.grid.transform)
        bands.append(replace(band, grid=moved))
    return replace(scene, bands=tuple(bands))
