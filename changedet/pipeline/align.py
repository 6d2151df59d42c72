"""Put two dates on one common grid and read aligned windows lazily.

:func:`align_pair` only decides the target grid (no pixels are read). :class:`PairReader` then reads
any window of that grid for both dates: bands already on the grid's pixel lattice are read directly
(windowed), every other band goes through a GDAL ``WarpedVRT`` (on-the-fly reprojection/resampling,
never a full-scene copy). Invalid pixels (nodata, masks, NaN, outside a footprint) of every band of
both dates are combined into one valid-data mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from changedet.errors import GridError, InputError
from changedet.pipeline.grid import Grid
from changedet.io.bands import describe_bands, same_roles, scene_roles
from changedet.io.remote import display_url, read_failure
from changedet.io.scene import BandSource, Scene, open_raster

if TYPE_CHECKING:
    from changedet.pipeline.clouds import CloudMask
    from changedet.pipeline.coregistration import Coregistration

RESAMPLING_CHOICES = ("nearest", "bilinear", "cubic", "average", "lanczos")


@dataclass(frozen=True)
class AlignedPair:
    """Two scenes and the common ``grid`` they are read on.

    ``reference`` is t1's own finest band grid, before intersection, reprojection or flipping to north-up
    (the grid of a label without CRS, such as OSCD's ``cm.tif``).
    """

    t1: Scene
    t2: Scene
    grid: Grid
    reference: Grid
    resampling: str = "bilinear"
    coregistration: Coregistration | None = None
    clouds: tuple[CloudMask | None, CloudMask | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description for ``run.json``."""
        described = {
            "t1": {"source": self.t1.source, "bands": list(self.t1.band_names)},
            "t2": {"source": self.t2.source, "bands": list(self.t2.band_names)},
            "grid": self.grid.to_dict(),
            "reference_grid": self.reference.to_dict(),
            "resampling": self.resampling,
        }
        if self.coregistration is not None:
            described["coregistration"] = self.coregistration.to_dict()
        if self.clouds is not None:
            described["clouds"] = {d: None if m is None else m.to_dict() for d, m in zip(("t1", "t2"), self.clouds)}
            described["cloud_fraction"] = {d: None if m is None else round(m.fraction, 4) for d, m in zip(("t1", "t2"), self.clouds)}
        return described


def _band_list(scene: Scene, most: int = 8) -> str:
    names = scene.band_names
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[: most - 2])}, ..., {names[-1]}"


def _check_bands(t1: Scene, t2: Scene, allow_different_bands: bool) -> None:
    if allow_different_bands:
        return
    if t1.count != t2.count:
        raise InputError(
            f"band count differs between dates: t1 has {t1.count} ({_band_list(t1)}), t2 has {t2.count} "
            f"({_band_list(t2)}); select common bands with --bands, or use a pseudo-Siamese model for "
            "heterogeneous pairs (e.g. --model pseudo-siamese-fc)"
        )
    if t1.band_names != t2.band_names and not same_roles(t1, t2):
        diff = [f"{a}!={b}" for a, b in zip(t1.band_names, t2.band_names) if a != b]
        roles = "" if not any(scene_roles(t1) + scene_roles(t2)) else f" (roles: t1 {describe_bands(t1)}; t2 {describe_bands(t2)})"
        raise InputError(f"band names differ between dates: {', '.join(diff)}{roles}")


def _check_crs(t1: Scene, t2: Scene) -> bool:
    """True when every band is georeferenced; False when none is; GridError when mixed."""
    bands = [("t1", b) for b in t1.bands] + [("t2", b) for b in t2.bands]
    with_crs = [(d, b) for d, b in bands if b.grid.crs is not None]
    if len(with_crs) == len(bands):
        return True
    if not with_crs:
        return False
    date, band = next((d, b) for d, b in bands if b.grid.crs is None)
    ref_date, ref = with_crs[0]
    raise GridError(
        f"{date} band {band.name} ({band.path}) has no CRS but {ref_date} is in {ref.grid.crs.to_string()}: "
        "georeference it, or give both dates as plain pixel grids"
    )


def _crs_label(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else "the target CRS"


def _unit_name(crs: CRS) -> str:
    """Plural unit name of a CRS: ``degrees``, ``metres``, ``US survey feet``..."""
    if crs.is_geographic:
        return "degrees"
    unit = crs.linear_units or "unknown"
    if unit.lower() == "unknown":
        return "units of the CRS"
    return unit[: -len("foot")] + "feet" if unit.endswith("foot") else unit + "s"


def _size(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _utm_epsg(crs: CRS, bounds: tuple[float, float, float, float]) -> str:
    """The WGS 84 / UTM zone at the centre of ``bounds`` (in ``crs``), e.g. ``EPSG:32631``."""
    west, south, east, north = transform_bounds(crs, CRS.from_epsg(4326), *bounds)
    lon, lat = (west + east) / 2, (south + north) / 2
    zone = int((lon + 180) // 6) % 60 + 1
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def _check_resolution(reference: Grid, crs: CRS, resolution: float) -> None:
    """GridError naming the unit when ``resolution`` is coarser than t1's footprint in ``crs``
    (less than one target pixel along its width or height)."""
    bounds = reference.bounds_in(crs)
    width, height = bounds[2] - bounds[0], bounds[3] - bounds[1]
    if resolution <= min(width, height):
        return
    unit = _unit_name(crs)
    if crs.is_geographic:
        hint = f"give a resolution in degrees, or --crs with a projected CRS (e.g. {_utm_epsg(crs, bounds)}) for metres"
    else:
        hint = f"give a finer resolution in {unit}"
    raise GridError(
        f"--resolution {resolution:g} is in {unit} (the unit of {_crs_label(crs)}) and is coarser than the whole "
        f"scene ({_size(width)} x {_size(height)} {unit}); {hint}"
    )


def align_pair(
    t1: Scene,
    t2: Scene,
    crs: str | CRS | None = None,
    resolution: float | None = None,
    resampling: str = "bilinear",
    allow_different_bands: bool = False,
    bbox: Sequence[float] | None = None,
) -> AlignedPair:
    """Choose the common grid of two dates.

    The target grid is t1's finest band grid (optionally reprojected to ``crs`` and/or
    ``resolution``, in the units of the target CRS), clipped to the intersection of the bounding
    boxes of all band footprints of both dates; pixels of that box outside a band's footprint are
    invalid. The target grid is always north-up: when t1's geotransform is south-up, east-to-west
    (flipped exactly: same pixels) or rotated/sheared (t1's CRS and pixel size, covering t1's
    footprint) a warning says so. Scenes without CRS on both sides are treated as pixel grids
    aligned at the upper-left corner (with a warning); their geotransforms are ignored. ``bbox``
    (west, south, east, north in WGS84 degrees) clips the grid further, on the same pixel lattice.

    Raises:
        InputError: band sets differ between dates (unless ``allow_different_bands``).
        GridError: CRS missing on one side only, no overlap, bad ``crs``/``resolution`` (including a
            resolution coarser than the whole scene in the target CRS's unit).
    """
    if resampling not in RESAMPLING_CHOICES:
        raise InputError(f"unknown resampling {resampling!r}; choose one of {', '.join(RESAMPLING_CHOICES)}")
    _check_bands(t1, t2, allow_different_bands)
    georeferenced = _check_crs(t1, t2)
    reference = t1.finest_band().grid
    if not georeferenced:
        if crs is not None or resolution is not None:
            raise GridError("--crs/--resolution need georeferenced inputs; these scenes have no CRS")
        warnings.warn(
            "inputs have no georeference: treating them as pixel grids aligned at the upper-left corner",
            NotGeoreferencedWarning,
            stacklevel=2,
        )
        if bbox is not None:
            raise GridError("--bbox needs georeferenced inputs; these scenes have no CRS")
        height = min(b.grid.height for b in t1.bands + t2.bands)
        width = min(b.grid.width for b in t1.bands + t2.bands)
        grid = Grid(None, reference.transform, width, height)
        return AlignedPair(t1, t2, grid, reference, resampling)
    if resolution is not None and not resolution > 0:
        raise GridError(f"--resolution must be positive, got {resolution}")
    try:
        target_crs = CRS.from_user_input(crs) if crs is not None else None
    except Exception:  # rasterio raises CRSError subclasses of several bases
        raise GridError(f"invalid CRS {crs!r} (expected e.g. EPSG:32631)") from None
    if not reference.is_north_up:
        warnings.warn(
            f"t1's geotransform is {reference.orientation} ({t1.finest_band().path}): the outputs are on a "
            "north-up grid covering its footprint",
            stacklevel=2,
        )
    if resolution is not None:
        _check_resolution(reference, target_crs or reference.crs, resolution)
    grid = reference.reprojected(target_crs, resolution)
    for band in t1.bands + t2.bands:
        grid = grid.clip_to_bounds(band.grid.bounds_in(grid.crs))
    if bbox is not None:
        area = transform_bounds("EPSG:4326", grid.crs, *bbox, densify_pts=21)
        try:
            grid = grid.clip_to_bounds(area)
        except GridError:
            raise GridError(f"--bbox {','.join(f'{v:g}' for v in bbox)} does not meet the scenes' common footprint "
                            f"(in WGS84: {', '.join(f'{v:.5f}' for v in grid.bounds_in(CRS.from_epsg(4326)))})") from None  # fmt: skip
    return AlignedPair(t1, t2, grid, reference, resampling)


class _FileReader:
    """Reads the requested bands of one file on the target grid (direct window or WarpedVRT)."""

    def __init__(self, path: str, bands: list[BandSource], grid: Grid, resampling: str) -> None:
        self.dataset = open_raster(path)
        self.indexes = [b.index for b in bands]
        self.nodata = [b.nodata for b in bands]
        own = bands[0].grid
        self.offset: Window | None = None
        self.vrt: WarpedVRT | None = None
        if grid.crs is None:  # pixel grids aligned at the upper-left corner, whatever their geotransform
            self.offset = Window(0, 0, grid.width, grid.height)
        else:
            try:
                window = own.window_of(grid)
                inside = window.col_off >= 0 and window.row_off >= 0
                inside = inside and window.col_off + window.width <= own.width
                inside = inside and window.row_off + window.height <= own.height
                self.offset = window if inside else None
            except GridError:
                pass
        alphas = [i for i, ci in enumerate(self.dataset.colorinterp, start=1) if ci.name == "alpha"]
        self.alpha = alphas[0] if alphas else None  # an alpha band is this file's mask, wherever it sits
        if self.offset is None:
            finer = own.pixel_area < grid.pixel_area
            method = Resampling.average if finer else Resampling[resampling]
            alpha = {"src_alpha": self.alpha} if self.alpha else {"add_alpha": True}  # the warper's alpha: last band
            moved = {} if own.transform == self.dataset.transform else {"src_transform": own.transform}  # co-registered t2
            self.vrt = WarpedVRT(
                self.dataset,
                **moved,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=method,
                src_nodata=bands[0].nodata,
                **alpha,
            )

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Bands ``(n, h, w)`` as float32 and a valid mask ``(h, w)``."""
        if self.vrt is not None:
            data = self.vrt.read(self.indexes + [self.vrt.count], window=window)
            values, valid = data[:-1].astype(np.float32), data[-1] > 0
        else:
            src_window = Window(
                window.col_off + self.offset.col_off, window.row_off + self.offset.row_off, window.width, window.height
            )
            values = self.dataset.read(self.indexes, window=src_window).astype(np.float32)
            valid = np.all(self.dataset.read_masks(self.indexes, window=src_window) > 0, axis=0)
            if self.alpha is not None:
                valid &= self.dataset.read(self.alpha, window=src_window) > 0
            for band, nodata in zip(values, self.nodata):
                if nodata is not None and not np.isnan(nodata):
                    valid &= band != np.float32(nodata)
        valid &= np.all(np.isfinite(values), axis=0)
        return values, valid

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.dataset.close()


class PairReader:
    """Context manager reading aligned windows of both dates: ``read(window) -> (x1, x2, valid)``."""

    def __init__(self, pair: AlignedPair) -> None:
        self.pair = pair
        self._readers: list[tuple[list[_FileReader], list[list[int]]]] = []

    def __enter__(self) -> "PairReader":
        try:
            for scene in (self.pair.t1, self.pair.t2):
                self._readers.append(self._open_scene(scene))
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_scene(self, scene: Scene) -> tuple[list[_FileReader], list[list[int]]]:
        groups: dict[str, list[int]] = {}
        for position, band in enumerate(scene.bands):
            groups.setdefault(band.path, []).append(position)
        readers, positions = [], []
        for path, pos in groups.items():
            try:
                readers.append(_FileReader(path, [scene.bands[p] for p in pos], self.pair.grid, self.pair.resampling))
            except rasterio.errors.RasterioIOError as exc:
                raise InputError(f"cannot read raster {display_url(path)}: {exc}") from None
            positions.append(pos)
        return readers, positions

    def read_date(self, index: int, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """One date (0: t1, 1: t2) of ``window``: bands ``(C, h, w)`` float32 and its valid mask, clouds
        and their shadows (when the pair has cloud masks) invalid."""
        readers, positions = self._readers[index]
        count = sum(len(p) for p in positions)
        out = np.empty((count, int(window.height), int(window.width)), np.float32)
        valid = np.ones((int(window.height), int(window.width)), bool)
        for reader, pos in zip(readers, positions):
            try:
                values, ok = reader.read(window)
            except rasterio.errors.RasterioIOError as exc:
                raise InputError(read_failure(reader.dataset.name, exc)) from None
            out[pos] = values
            valid &= ok
        mask = None if self.pair.clouds is None else self.pair.clouds[index]
        if mask is not None:
            valid &= ~mask.window(window)
        return out, valid

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Aligned ``x1 (C1, h, w)``, ``x2 (C2, h, w)`` float32 and the joint valid mask ``(h, w)``."""
        x1, v1 = self.read_date(0, window)
        x2, v2 = self.read_date(1, window)
        return x1, x2, v1 & v2

    def close(self) -> None:
        """Close every open dataset."""
        for readers, _ in self._readers:
            for reader in readers:
                reader.close()
        self._readers = []


def read_scene_on_grid(scene: Scene, pair: AlignedPair, grid: Grid, resampling: str, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All of ``scene``'s bands on ``grid`` (e.g. a coarse grid over ``pair.grid``: cloud masks, report
    images), read in ``block``-pixel squares: values ``(C, h, w)`` float32 and the valid mask."""
    view = replace(pair, t1=scene, t2=scene, grid=grid, resampling=resampling, clouds=None)
    values = np.zeros((scene.count, grid.height, grid.width), np.float32)
    valid = np.zeros(grid.shape, bool)
    with PairReader(view) as reader:
        for row in range(0, grid.height, block):
            for col in range(0, grid.width, block):
                window = Window(col, row, min(block, grid.width - col), min(block, grid.height - row))
                part, ok = reader.read_date(0, window)
                values[:, row : row + window.height, col : col + window.width] = part
                valid[row : row + window.height, col : col + window.width] = ok
    return values, valid


def read_scene_block_mean(scene: Scene, pair: AlignedPair, factor: int, strip_pixels: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """``scene``'s bands on ``pair.grid.coarsened(factor)``: the mean of the valid pixels of each
    ``factor`` x ``factor`` block of ``pair.grid`` (as read for the model), and the blocks with any.

    Reads the fine grid in strips of about ``strip_pixels`` pixels, so memory stays bounded whatever
    the decimation (a single warp onto the coarse grid reads the whole source extent at once)."""
    coarse = pair.grid.coarsened(factor)
    view = replace(pair, t1=scene, t2=scene, clouds=None)
    sums = np.zeros((scene.count, coarse.height, coarse.width), np.float64)
    counts = np.zeros(coarse.shape, np.int64)
    rows = max(1, strip_pixels // max(1, pair.grid.width * factor)) * factor  # fine rows per strip, whole blocks
    padded_width = coarse.width * factor
    with PairReader(view) as reader:
        for row in range(0, pair.grid.height, rows):
            height = min(rows, pair.grid.height - row)
            part, ok = reader.read_date(0, Window(0, row, pair.grid.width, height))
            blocks = -(-height // factor)
            values = np.zeros((scene.count, blocks * factor, padded_width), np.float32)
            valid = np.zeros((blocks * factor, padded_width), bool)
            values[:, :height, : pair.grid.width] = np.where(ok, part, 0)
            valid[:height, : pair.grid.width] = ok
            top = row // factor
            sums[:, top : top + blocks] = values.reshape(scene.count, blocks, factor, coarse.width, factor).sum(axis=(2, 4))
            counts[top : top + blocks] = valid.reshape(blocks, factor, coarse.width, factor).sum(axis=(1, 3))
    means = (sums / np.maximum(counts, 1)).astype(np.float32)
    return means, counts > 0
