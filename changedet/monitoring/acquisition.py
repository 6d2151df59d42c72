"""One acquisition put on the monitoring grid: read, clouds and shadows masked, co-registered onto the
reference date, and written as a folder of band files that a detection reads like any folder scene.

The monitoring grid is the first clear acquisition's pixel lattice (or ``--crs``/``--resolution``)
clipped to ``--bbox`` (:func:`monitoring_grid`); every later date is read onto exactly that grid, so all
outputs share it. A date folder holds one GeoTIFF per band in the item's data type (integers rounded
from resampled bands) with an internal mask: pixels outside the footprint, nodata, clouds and their
shadows are masked. The item's SCL band serves the cloud mask only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from changedet.io.scene import band_file_names, open_scene, Scene
from changedet.io.writers import writing
from changedet.monitoring.catalog import Acquisition
from changedet.monitoring.params import MonitorParams
from changedet.pipeline.align import AlignedPair, PairReader, align_pair
from changedet.pipeline.clouds import cloud_mask, sun_angles
from changedet.pipeline.coregistration import measure_offset, shifted_scene
from changedet.pipeline.grid import Grid

META = "acquisition.json"
BLOCK = 1024
NOT_MODEL_BANDS = ("SCL",)


def _scene(acquisition: Acquisition, params: MonitorParams) -> Scene:
    return open_scene(acquisition.href, params.bands, params.nodata)


def monitoring_grid(acquisition: Acquisition, params: MonitorParams) -> Grid:
    """The grid every date is read on: ``acquisition``'s finest band lattice (or ``--crs``/``--resolution``)
    clipped to ``--bbox``."""
    scene = _scene(acquisition, params)
    return align_pair(scene, scene, params.crs, params.resolution, params.resampling, False, params.bbox).grid


def _as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(np.nan_to_num(values)), info.min, info.max).astype(dtype)


def _coregistered(pair: AlignedPair, params: MonitorParams) -> tuple[AlignedPair, dict[str, Any], str | None]:
    """``pair`` with t2 moved onto the reference by the measured offset (with ``--coregister``), the
    measurement, and why the date cannot be used (an offset asked for but not trusted), if so."""
    offset = measure_offset(pair)
    if not params.coregister:
        return pair, offset.to_dict(), None
    if offset.shift_px is None:
        return pair, offset.to_dict(), f"--coregister: offset not trusted ({offset.confidence}: {offset.reason})"
    moved = replace(pair, t2=shifted_scene(pair.t2, pair.grid, offset.shift_px))
    return moved, replace(offset, applied=True).to_dict(), None


def ingest(acquisition: Acquisition, grid: Grid, reference: str | Path | None, params: MonitorParams, folder: str | Path) -> dict[str, Any]:
    """Write ``acquisition`` on ``grid`` into ``folder`` (atomically: a temporary folder renamed) and
    return what it records (``acquisition.json``): valid and cloud fractions, co-registration, and
    ``skipped`` with the reason when the date cannot be used (too cloudy, untrusted offset, no valid
    pixel). ``reference``: the first date's folder, which later dates are co-registered onto. A folder
    written before is reused."""
    folder = Path(folder)
    if (folder / META).is_file():
        return json.loads((folder / META).read_text())
    meta: dict[str, Any] = {"date": acquisition.date, "item": acquisition.item_id, "href": acquisition.href,
                            "eo_cloud_cover": acquisition.cloud_cover, "skipped": acquisition.skipped,
                            "cloud_fraction": None, "valid_fraction": 0.0}  # fmt: skip
    values = valid = None
    if meta["skipped"] is None:
        values, valid, names, dtypes = _read(acquisition, grid, reference, params, meta)
    staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=folder.parent))
    try:
        if meta["skipped"] is None:
            write_band_folder(staging, names, dtypes, grid, values, valid)
        with writing(staging / META):
            (staging / META).write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _read(acquisition: Acquisition, grid: Grid, reference: str | Path | None, params: MonitorParams,
          meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:  # fmt: skip
    """The date's model bands on ``grid`` (values, valid mask, names, data types); fills ``meta``."""
    scene = _scene(acquisition, params)
    pair = AlignedPair(scene if reference is None else open_scene(reference), scene, grid, grid, params.resampling)
    shift = None
    if reference is not None:
        pair, meta["coregistration"], meta["skipped"] = _coregistered(pair, params)
        shift = tuple(meta["coregistration"]["shift_px"]) if meta["coregistration"].get("applied") else None
    mask = None
    if params.cloud_mask != "none" and meta["skipped"] is None:
        mask = cloud_mask(acquisition.href, pair, 1, params.cloud_mask, shift, sun_angles(acquisition.href))
        meta["clouds"] = None if mask is None else mask.to_dict()
        meta["cloud_fraction"] = None if mask is None else round(mask.fraction, 6)
        if mask is not None and params.max_cloud is not None and mask.fraction > params.max_cloud:
            meta["skipped"] = f"{mask.fraction:.1%} cloud or shadow ({mask.method}), above --max-cloud {params.max_cloud:g}"
    keep = [i for i, b in enumerate(pair.t2.bands) if b.name not in NOT_MODEL_BANDS]
    names = [pair.t2.bands[i].name for i in keep]
    dtypes = [_dtype(pair.t2.bands[i].dtype) for i in keep]
    values = np.zeros((len(keep), grid.height, grid.width), np.float32)
    valid = np.zeros(grid.shape, bool)
    if meta["skipped"] is None:
        with PairReader(replace(pair, clouds=(None, mask))) as reader:
            for row in range(0, grid.height, BLOCK):
                for col in range(0, grid.width, BLOCK):
                    window = Window(col, row, min(BLOCK, grid.width - col), min(BLOCK, grid.height - row))
                    part, ok = reader.read_date(1, window)
                    values[:, row : row + window.height, col : col + window.width] = part[keep]
                    valid[row : row + window.height, col : col + window.width] = ok
        meta["valid_fraction"] = round(float(valid.mean()), 6)
        if not valid.any():
            meta["skipped"] = "no valid pixel over the area (outside the footprint, nodata or cloud)"
    meta["bands"], meta["dtypes"] = names, dtypes
    return values, valid, names, dtypes


def _dtype(dtype: str) -> str:
    return dtype if dtype in ("uint8", "uint16", "int16", "uint32", "int32", "float32") else "float32"


def write_band_folder(folder: str | Path, names: list[str], dtypes: list[str], grid: Grid, values: np.ndarray, valid: np.ndarray) -> None:
    """``values (C, H, W)`` on ``grid`` as one GeoTIFF per band (``dtypes``; integers rounded) in
    ``folder``, each with the internal mask ``valid``; a folder scene reads them back as ``names``."""
    folder = Path(folder)
    _, files = band_file_names(names, "date")
    mask = np.where(valid, 255, 0).astype(np.uint8)
    for name, dtype, band in zip(files, dtypes, values):
        profile = {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": 1, "dtype": dtype, "crs": grid.crs,
                   "transform": grid.transform, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "zstd"}
        with writing(folder / name), rasterio.open(folder / name, "w", **profile) as out:
            out.write(_as_dtype(np.where(valid, band, 0), dtype), 1)
            out.write_mask(mask)


def read_band_folder(folder: str | Path, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """A folder written by :func:`write_band_folder`: values ``(C, H, W)`` float32 and the valid mask."""
    scene = open_scene(folder)
    pair = AlignedPair(scene, scene, grid, grid, "nearest")
    with PairReader(pair) as reader:
        return reader.read_date(0, Window(0, 0, grid.width, grid.height))
