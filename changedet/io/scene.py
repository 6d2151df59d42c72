"""Scene input: one date as a multi-band raster, a folder/glob of single-band files, or any GDAL raster.

A :class:`Scene` is a list of :class:`BandSource` (file + band index + name + grid), nothing is read
until a window is requested (see :mod:`changedet.align`).
"""

from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from changedet.errors import InputError
from changedet.grid import Grid

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".png", ".bmp", ".vrt")
SENTINEL2_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_BAND_SUFFIX = re.compile(r"[_\-.]((?:B\d{1,2}A?)|(?:band\d+)|(?:b\d+))$", re.IGNORECASE)


@dataclass(frozen=True)
class BandSource:
    """One band: ``path`` and 1-based ``index`` in that file, its ``name``, native ``grid`` and ``nodata``."""

    path: str
    index: int
    name: str
    grid: Grid
    nodata: float | None
    dtype: str
    description: str = ""


@dataclass(frozen=True)
class Scene:
    """One acquisition date: an ordered tuple of bands (possibly on different native grids)."""

    source: str
    bands: tuple[BandSource, ...]

    @property
    def band_names(self) -> tuple[str, ...]:
        """Band names in order."""
        return tuple(b.name for b in self.bands)

    @property
    def count(self) -> int:
        """Number of bands."""
        return len(self.bands)

    def finest_band(self) -> BandSource:
        """The band with the smallest pixel area (first one on ties): the default target grid."""
        return min(self.bands, key=lambda b: b.grid.res[0] * b.grid.res[1])


def open_raster(path: str | Path):
    """``rasterio.open`` for reading, without the warning for rasters that have no georeference;
    :class:`InputError` with GDAL's reason when the file cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "not a readable raster"
        raise InputError(f"cannot read raster {path}: {reason}") from None


def _band_sources(path: str, name_prefix: str | None, nodata: float | None) -> list[BandSource]:
    with open_raster(path) as ds:
        if ds.count == 0 or ds.width == 0 or ds.height == 0:
            raise InputError(f"raster {path} is empty ({ds.count} bands, {ds.height}x{ds.width} px)")
        try:  # the last pixel lives in the last block: a truncated file fails here, not mid-run
            ds.read(1, window=Window(ds.width - 1, ds.height - 1, 1, 1))
        except RasterioError as exc:
            raise InputError(f"raster {path} is truncated or corrupt: {str(exc).splitlines()[0]}") from None
        grid = Grid.from_dataset(ds)
        sources = []
        for i in range(1, ds.count + 1):
            if name_prefix is not None:
                name = name_prefix if ds.count == 1 else f"{name_prefix}_{i}"
            else:
                name = f"B{i}"
            band_nodata = nodata if nodata is not None else ds.nodatavals[i - 1]
            description = ds.descriptions[i - 1] or ""
            sources.append(BandSource(str(path), i, name, grid, band_nodata, ds.dtypes[i - 1], description))
    return sources


def band_name_from_filename(path: str) -> str:
    """``..._B8A.tif`` -> ``B8A``; otherwise the file stem."""
    stem = Path(path).stem
    match = _BAND_SUFFIX.search(stem)
    return match.group(1).upper() if match else stem


def _sort_key(name: str) -> tuple[int, str]:
    return (SENTINEL2_ORDER.index(name), name) if name in SENTINEL2_ORDER else (len(SENTINEL2_ORDER), name)


def _list_files(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        files = [str(p) for p in sorted(path.iterdir()) if p.suffix.lower() in RASTER_SUFFIXES and p.is_file()]
        if not files:
            raise InputError(f"folder {spec} contains no raster files ({', '.join(RASTER_SUFFIXES)})")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec))
        if not files:
            raise InputError(f"pattern {spec} matches no file")
        return files
    if not path.exists():
        raise InputError(f"input {spec} does not exist")
    return [spec]


def select_bands(bands: Sequence[BandSource], selection: Sequence[str | int], source: str) -> tuple[BandSource, ...]:
    """Pick bands by name (case-insensitive) or 1-based index, in the given order."""
    by_name = {b.name.upper(): b for b in bands}
    chosen = []
    for item in selection:
        key = str(item).strip()
        if key.isdigit():
            idx = int(key)
            if not 1 <= idx <= len(bands):
                raise InputError(f"band index {idx} out of range 1..{len(bands)} in {source}")
            chosen.append(bands[idx - 1])
        elif key.upper() in by_name:
            chosen.append(by_name[key.upper()])
        else:
            raise InputError(f"band {key!r} not found in {source}; available: {', '.join(b.name for b in bands)}")
    return tuple(chosen)


def open_scene(spec: str | Path, bands: Sequence[str | int] | None = None, nodata: float | None = None) -> Scene:
    """Describe one date without reading pixels.

    Args:
        spec: a raster file (all its bands, named ``B1..Bn``; GDAL band descriptions are kept as
            ``description``), a folder of single-band files (band name = the
            ``_B01``-style suffix; Sentinel-2 names sorted B01..B12 with B8A after B08), or a glob.
        bands: optional selection by name or 1-based index, applied after ordering.
        nodata: value to treat as invalid where the files declare none.

    Raises:
        InputError: missing/unreadable files, empty rasters, unknown band names, duplicate band names.
    """
    spec = str(spec)
    files = _list_files(spec)
    if len(files) == 1:
        sources = _band_sources(files[0], None, nodata)
    else:
        sources = []
        for f in files:
            sources.extend(_band_sources(f, band_name_from_filename(f), nodata))
        sources.sort(key=lambda b: _sort_key(b.name))
    names = [b.name for b in sources]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"duplicate band names in {spec}: {', '.join(dupes)}")
    chosen = select_bands(sources, bands, spec) if bands else tuple(sources)
    return Scene(spec, chosen)
