"""Scene input: one date as a multi-band raster, a folder/glob of single-band files, or any GDAL raster.

A :class:`Scene` is a list of :class:`BandSource` (file + band index + name + grid), nothing is read
until a window is requested (see :mod:`changedet.pipeline.align`).
"""

from __future__ import annotations

import glob
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from changedet.errors import InputError
from changedet.io.remote import REMOTE_OPEN_OPTIONS, display_url, gdal_path, is_remote, read_failure
from changedet.io.stac import is_stac_item, item_bands, load_item
from changedet.pipeline.grid import Grid

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".img", ".png", ".bmp", ".vrt")
SENTINEL2_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_BAND_SUFFIX = re.compile(r"[_\-.]((?:B\d{1,2}A?)|(?:band\d+)|(?:b\d+)|(?:SCL))$", re.IGNORECASE)  # SCL: L2A scene classification


@dataclass(frozen=True)
class BandSource:
    """One band: ``path`` and 1-based ``index`` in that file, its ``name``, native ``grid``, ``nodata``,
    GDAL ``description`` and colour interpretation (``colorinterp``: ``red``, ``gray``, ``undefined``...)."""

    path: str
    index: int
    name: str
    grid: Grid
    nodata: float | None
    dtype: str
    description: str = ""
    colorinterp: str = ""


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
        return min(self.bands, key=lambda b: b.grid.pixel_area)


def open_raster(path: str | Path):
    """``rasterio.open`` for reading, without the warning for rasters that have no georeference;
    :class:`InputError` with GDAL's reason when the file cannot be read. A remote file is opened
    without listing its folder (:data:`~changedet.io.remote.REMOTE_OPEN_OPTIONS`)."""
    try:
        with warnings.catch_warnings(), rasterio.Env(**(REMOTE_OPEN_OPTIONS if is_remote(str(path)) else {})):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "not a readable raster"
        raise InputError(f"cannot read raster {display_url(path)}: {reason}") from None


def _representable(nodata: float | None, dtype: str, path: str) -> float | None:
    """``--nodata`` for a band of ``dtype``, refused when no pixel of that type can hold the value."""
    if nodata is None:
        return nodata
    kind = np.dtype(dtype)
    if kind.kind in "iu":
        info = np.iinfo(kind)
        ok = not np.isnan(nodata) and float(nodata).is_integer() and info.min <= nodata <= info.max
    else:
        ok = kind.kind != "f" or not np.isfinite(nodata) or abs(nodata) <= np.finfo(kind).max
    if not ok:
        raise InputError(f"--nodata {nodata:g} cannot occur in {path} ({dtype} bands): give a value of that type")
    return nodata


def _band_sources(path: str, name_prefix: str | None, nodata: float | None) -> list[BandSource]:
    """The bands of one file; ``nodata`` applies only to bands whose file declares none."""
    with open_raster(path) as ds:
        if ds.count == 0 or ds.width == 0 or ds.height == 0:
            raise InputError(f"raster {display_url(path)} is empty ({ds.count} bands, {ds.height}x{ds.width} px)")
        try:  # the last pixel lives in the last block: a truncated file fails here, not mid-run
            ds.read(1, window=Window(ds.width - 1, ds.height - 1, 1, 1))
        except RasterioError as exc:
            if is_remote(path):
                raise InputError(read_failure(path, exc)) from None
            raise InputError(f"raster {display_url(path)} is truncated or corrupt: {str(exc).splitlines()[0]}") from None
        complex_bands = [i for i, dtype in enumerate(ds.dtypes, start=1) if "complex" in dtype]  # incl. CInt16
        if complex_bands:
            raise InputError(
                f"raster {path} has complex-valued bands ({ds.dtypes[complex_bands[0] - 1]}): give their amplitude "
                "(or intensity) as real-valued bands, e.g. gdal_translate -of GTiff with a VRT derived band"
            )
        grid = Grid.from_dataset(ds)
        sources = []
        data_bands = [i for i in range(1, ds.count + 1) if ds.colorinterp[i - 1].name != "alpha"]  # alpha: a mask
        for i in data_bands:
            if name_prefix is not None:
                name = name_prefix if len(data_bands) == 1 else f"{name_prefix}_{i}"
            else:
                name = f"B{i}"
            declared = ds.nodatavals[i - 1]
            band_nodata = declared if declared is not None else _representable(nodata, ds.dtypes[i - 1], path)
            description = ds.descriptions[i - 1] or ""
            colorinterp = ds.colorinterp[i - 1].name
            sources.append(BandSource(str(path), i, name, grid, band_nodata, ds.dtypes[i - 1], description, colorinterp))
    return sources


def band_name_from_filename(path: str) -> str:
    """``..._B8A.tif`` -> ``B8A``; otherwise the file stem."""
    stem = Path(path).stem
    match = _BAND_SUFFIX.search(stem)
    return match.group(1).upper() if match else stem


def band_file_names(names: Sequence[str], label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Files that a folder scene reads back under ``names``: (names as read, file names). A name the
    reader recognises as a band suffix (``B02``, ``B8A``, ``b4``, ``band3``, ``SCL``; read upper-case) is
    written ``<label>_<name>.tif``, any other (``red``, ``nir``: read as the stem) ``<name>.tif``.
    :class:`InputError` for a name no file can carry or two names read alike."""
    pairs: list[tuple[str, str]] = []  # (name as read, file name)
    for raw in names:
        if not raw.strip() or raw.startswith(".") or any(c in raw for c in "/\\\0"):
            raise InputError(f"{label} has band name {raw!r}, which cannot name a band file: rename the band")
        prefixed, stem = f"{label}_{raw}.tif", f"{raw}.tif"
        if band_name_from_filename(prefixed) == raw.upper():  # a band suffix: read upper-case, as from a folder
            pairs.append((raw.upper(), prefixed))
        elif band_name_from_filename(stem) == raw:
            pairs.append((raw, stem))
        else:
            raise InputError(f"{label} has band name {raw!r}, which ends like a band suffix ({band_name_from_filename(stem)}) "
                             "and would be read under that name: rename the band")
    read = [name for name, _ in pairs]
    upper = [n.upper() for n in read]
    if dupes := sorted({n for n in read if upper.count(n.upper()) > 1}):
        raise InputError(f"{label} has duplicate band names ({', '.join(dupes)}): give each band once")
    return tuple(read), tuple(file for _, file in pairs)


def _sort_key(name: str) -> tuple[int, str]:
    return (SENTINEL2_ORDER.index(name), name) if name in SENTINEL2_ORDER else (len(SENTINEL2_ORDER), name)


def _is_band_file(path: Path) -> bool:
    """A visible (not ``.``-prefixed, e.g. macOS ``._B01.tif``) file with a raster suffix."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in RASTER_SUFFIXES


def _names(paths: Sequence[Path], most: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _list_files(spec: str) -> list[str]:
    """The raster files of one date. An existing path is used as it is, never as a pattern (a file
    named ``scene[1].tif``); a folder gives its visible raster files; anything else is a glob, of
    which folders, hidden and non-raster files are ignored. :class:`InputError` when nothing is left."""
    if is_remote(spec):  # a URL: one raster, never a pattern (a signed URL's query holds "?")
        return [gdal_path(spec)]
    path = Path(spec)
    if path.is_dir():
        entries = sorted(path.iterdir())
        files = [str(p) for p in entries if _is_band_file(p)]
        if not files:
            folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
            hint = f"; it holds only sub-folders ({_names(folders)}): give one of them" if folders else ""
            raise InputError(f"folder {spec} contains no raster files ({', '.join(RASTER_SUFFIXES)}){hint}")
        return files
    if path.exists():
        return [spec]
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(spec))]
        files = [str(p) for p in matches if _is_band_file(p)]
        if not files:
            seen = f" (it matches only {_names(matches)})" if matches else ""
            raise InputError(f"pattern {spec} matches no raster file ({', '.join(RASTER_SUFFIXES)}){seen}")
        return files
    raise InputError(f"input {spec} does not exist")


def _by_description(bands: Sequence[BandSource], key: str, source: str) -> BandSource | None:
    """The one band whose GDAL description is ``key`` (case-insensitive); None if none, InputError if several."""
    matches = [(i, b) for i, b in enumerate(bands, start=1) if b.description.strip().upper() == key.upper()]
    if len(matches) > 1:
        numbers = ", ".join(str(i) for i, _ in matches)
        raise InputError(f"band {key!r} matches the description of bands {numbers} in {source}; select by index")
    return matches[0][1] if matches else None


def select_bands(bands: Sequence[BandSource], selection: Sequence[str | int], source: str) -> tuple[BandSource, ...]:
    """Pick bands by 1-based index, by GDAL band description (case-insensitive, only if exactly one
    band has it) or by name, in the given order. A description wins over a name: the names of a
    multi-band file's bands are positions (``B10`` is its 10th band), a description says what it is."""
    by_name = {b.name.upper(): b for b in bands}
    chosen = []
    for item in selection:
        key = str(item).strip()
        if key.isdigit():
            idx = int(key)
            if not 1 <= idx <= len(bands):
                raise InputError(f"band index {idx} out of range 1..{len(bands)} in {source}")
            chosen.append(bands[idx - 1])
        elif (band := _by_description(bands, key, source)) is not None:
            chosen.append(band)
        elif key.upper() in by_name:
            chosen.append(by_name[key.upper()])
        else:
            described = [f"{b.name} ({b.description})" if b.description else b.name for b in bands]
            raise InputError(f"band {key!r} not found in {source}; available: {', '.join(described)}")
    twice = sorted({b.name for b in chosen if chosen.count(b) > 1})
    if twice:
        raise InputError(f"band {', '.join(twice)} selected more than once from {source}: each band may be chosen once")
    return tuple(chosen)


def _file_sources(spec: str, nodata: float | None) -> list[BandSource]:
    """The bands of a file, folder, glob or raster URL, named and ordered as :func:`open_scene` says."""
    files = _list_files(spec)
    if len(files) == 1:
        sources = _band_sources(files[0], None, nodata)
        suffix = _BAND_SUFFIX.search(Path(files[0]).stem)
        if len(sources) == 1 and suffix and files[0] != gdal_path(spec):  # a folder/glob of one band file: named as in a folder
            sources = [replace(sources[0], name=suffix.group(1).upper())]
        return sources
    sources = []
    for f in files:
        sources.extend(_band_sources(f, band_name_from_filename(f), nodata))
    sources.sort(key=lambda b: _sort_key(b.name))
    return sources


def _item_sources(spec: str, nodata: float | None) -> list[BandSource]:
    """The bands of a STAC Item (:func:`changedet.io.stac.item_bands`), each read from its asset's file."""
    sources = []
    for band in item_bands(load_item(spec)):
        try:
            source = next(s for s in _band_sources(band.path, None, nodata) if s.index == band.index)
        except InputError as exc:
            raise InputError(f"STAC item {spec}, asset {band.key}: {exc}") from None
        except StopIteration:
            raise InputError(f"STAC item {spec}, asset {band.key}: its file has no band {band.index}") from None
        sources.append(replace(source, name=band.name, description=source.description or band.common_name))
    return sources


def open_scene(spec: str | Path, bands: Sequence[str | int] | None = None, nodata: float | None = None) -> Scene:
    """Describe one date without reading pixels.

    Args:
        spec: a raster file (all its bands, named ``B1..Bn``; GDAL band descriptions are kept as
            ``description``), a folder of single-band files (band name = the
            ``_B01``-style suffix; Sentinel-2 names sorted B01..B12 with B8A after B08; hidden and
            non-raster files ignored), or a glob (folders, hidden and non-raster files ignored). An
            existing path is never taken as a glob; an http(s)/S3/GCS URL of a raster (read by range
            requests, :mod:`changedet.io.remote`); or a STAC Item (``.json`` path or URL,
            :mod:`changedet.io.stac`).
        bands: optional selection by 1-based index, name or GDAL description, applied after ordering.
        nodata: value to treat as invalid in bands whose file declares no nodata (a declared one is kept).

    Raises:
        InputError: missing/unreadable files, empty rasters, unknown band names, duplicate band names.
    """
    spec = str(spec)
    if is_stac_item(spec):
        sources = _item_sources(spec, nodata)
    else:
        sources = _file_sources(spec, nodata)
    names = [b.name for b in sources]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"duplicate band names in {spec}: {', '.join(dupes)}")
    chosen = select_bands(sources, bands, spec) if bands else tuple(sources)
    return Scene(spec, chosen)
