"""xarray entry point: :func:`detect_xarray` runs ``changedet detect`` on two rioxarray DataArrays.

Each date is written band by band as single-band GeoTIFFs into a temporary folder, named so that
:func:`changedet.io.scene.open_scene` reads the DataArray's band names; the path of the CLI
(:func:`~changedet.pipeline.detect.detect_changes`) runs on the two folders, and its rasters come back
as one :class:`xarray.Dataset`. The temporary folder is removed whatever happens.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rioxarray
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.windows import Window
from rioxarray.exceptions import RioXarrayError

from changedet.errors import ChangeDetError, InputError, OutputError
from changedet.io.scene import band_file_names, open_scene
from changedet.options import ParameterError
from changedet.pipeline.detect import DetectParams, DetectResult, detect_changes, open_inputs
from changedet.pipeline.output_table import CERTIFIED_RADIUS, DIFFERENCE, MASK, OUTPUTS, PROBABILITY
from changedet.pipeline.params import DEFAULT_MODEL

#: Dataset variable -> output raster it is read from (``certified_radius`` only with ``smoothing_sigma``)
VARIABLES = {"probability": PROBABILITY, "mask": MASK, "difference": DIFFERENCE, "certified_radius": CERTIFIED_RADIUS}
#: bytes of one row block written per step of a NumPy-backed (or lazily loaded) date, all bands together
BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class _Date:
    """One validated date: ``data`` with dims (band, y, x), north-up, and how its band files are written."""

    label: str
    data: xr.DataArray
    names: tuple[str, ...]  # band names as the scene reader will report them
    files: tuple[str, ...]
    crs: CRS
    transform: Affine
    nodata: float | None


def _spatial_dims(da: xr.DataArray, label: str) -> tuple[str, str]:
    """The (y, x) dimensions rioxarray finds, with coordinates along both."""
    try:
        y_dim, x_dim = str(da.rio.y_dim), str(da.rio.x_dim)
    except RioXarrayError:
        raise InputError(f"{label} has no 2-D spatial dims (y/x) among its dims {tuple(da.dims)}: rename them to y and x "
                         "or call .rio.set_spatial_dims(x_dim=..., y_dim=...)") from None
    missing = [d for d in (y_dim, x_dim) if d not in da.coords]
    if missing:
        raise InputError(f"{label} has no coordinates along {', '.join(missing)}: georeference it (rioxarray, stackstac, odc-stac)")
    return y_dim, x_dim


def _band_dim(da: xr.DataArray, label: str, spatial: tuple[str, str], band_dim: str | None) -> xr.DataArray:
    """``da`` as (band, y, x) with its band dim renamed ``band``; other dims of size 1 are dropped."""
    others = [str(d) for d in da.dims if d not in spatial]
    if band_dim is None:
        if not others:
            raise InputError(f"{label} has no band dim (dims {tuple(da.dims)}): add one, e.g. t.expand_dims(band=['B04'])")
        if len(others) > 1 and "band" not in others:
            raise InputError(f"{label} has several non-spatial dims ({', '.join(others)}): name the band dim with band_dim=...")
        band_dim = others[0] if len(others) == 1 else "band"
    elif band_dim not in others:
        raise InputError(f"{label} has no band dim {band_dim!r} besides its spatial dims (dims {tuple(da.dims)})")
    extra = [d for d in others if d != band_dim]
    large = [f"{d} of size {da.sizes[d]}" for d in extra if da.sizes[d] != 1]
    if large:
        raise InputError(f"{label} has dim {large[0]} besides bands and y/x: give one date, e.g. .isel({large[0].split()[0]}=0) "
                         f"or .median({large[0].split()[0]!r})")
    da = da.isel({d: 0 for d in extra}, drop=True).transpose(band_dim, *spatial)
    return da.rename({band_dim: "band"}) if band_dim != "band" else da


def _band_files(da: xr.DataArray, label: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(band names as the scene reader reports them, file names): ``<label>_<band>.tif`` for names the
    reader recognises as band suffixes (``B02``, ``B8A``, ``b4``, ``band3``, ``SCL``; read upper-case),
    else ``<band>.tif`` (``red``, ``nir``: read as the file stem). Integer coordinates 1..n are ``B1..Bn``."""
    values = da["band"].values.tolist() if "band" in da.coords else list(range(1, da.sizes["band"] + 1))
    raws = [f"B{int(v)}" if isinstance(v, int) or (isinstance(v, str) and v.isdigit()) else str(v) for v in values]
    return band_file_names(raws, label)


def _declared_transform(da: xr.DataArray) -> Affine | None:
    """The transform ``da`` declares (its grid mapping's ``GeoTransform``, else a ``transform`` attribute), if any."""
    grid_mapping = da.rio.grid_mapping
    geo = da.coords[grid_mapping].attrs.get("GeoTransform") if grid_mapping in da.coords else None
    if geo:
        return Affine.from_gdal(*(float(v) for v in str(geo).split()))
    return Affine(*da.attrs["transform"][:6]) if len(da.attrs.get("transform", ())) >= 6 else None


def _north_up(da: xr.DataArray, label: str, y_dim: str, x_dim: str) -> tuple[xr.DataArray, Affine]:
    """``da`` flipped north-up (x ascending, y descending) and its transform; refused when the transform
    is rotated or the coordinates are not its regular pixel centres."""
    try:
        transform = da.rio.transform()
    except RioXarrayError as exc:
        raise InputError(f"{label} has no usable transform: {exc}") from None
    if transform.b or transform.d:
        raise InputError(f"{label} has a rotated transform {tuple(transform)[:6]}: warp it north-up first (.rio.reproject)")
    if transform.a == 0 or transform.e == 0:
        raise InputError(f"{label} has a zero pixel size in its transform {tuple(transform)[:6]}")
    declared = _declared_transform(da)
    if declared is not None:  # sliced arrays keep the full grid's transform: whole-pixel offsets only
        col, row = ~declared @ (transform.c, transform.f)
        if max(abs(col - round(col)), abs(row - round(row))) > 1e-3:
            raise InputError(f"{label}'s coordinates are offset by ({col:.2f}, {row:.2f}) px from its declared transform "
                             f"{tuple(declared)[:6]}: coordinates must be pixel centres (stackstac: xy_coords='center')")
    height, width = da.sizes[y_dim], da.sizes[x_dim]
    for dim, origin, step, size in ((x_dim, transform.c, transform.a, width), (y_dim, transform.f, transform.e, height)):
        expected = origin + step * (np.arange(size) + 0.5)
        if not np.allclose(np.asarray(da[dim].values, dtype="float64"), expected, rtol=0.0, atol=abs(step) * 1e-3):
            raise InputError(f"{label}'s {dim} coordinates are not the regular pixel centres of its transform "
                             f"{tuple(transform)[:6]}: irregular or inconsistent coordinates")
    sx, sy = (-1 if transform.a < 0 else 1), (-1 if transform.e > 0 else 1)  # flip to x ascending, y descending
    flipped = transform @ Affine.translation(width if sx < 0 else 0, height if sy < 0 else 0) @ Affine.scale(sx, sy)
    return da.isel({x_dim: slice(None, None, sx), y_dim: slice(None, None, sy)}), flipped


def _nodata(da: xr.DataArray, label: str) -> float | None:
    """The declared nodata (``rio.nodata``, else ``rio.encoded_nodata``), refused when the dtype cannot hold it."""
    try:
        nodata = da.rio.nodata if da.rio.nodata is not None else da.rio.encoded_nodata
    except (OverflowError, ValueError) as exc:  # rioxarray: a nodata its dtype cannot hold
        raise InputError(f"{label}'s nodata does not fit its values: {exc} (fix it with .rio.write_nodata)") from None
    return None if nodata is None else float(nodata)


def _prepare(da: Any, label: str, band_dim: str | None) -> _Date:
    """Validate one date without computing it (see :func:`detect_xarray` for what is refused)."""
    if not isinstance(da, xr.DataArray):
        hint = ": give one with a band dim, e.g. ds.to_array('band') (odc-stac)" if isinstance(da, xr.Dataset) else ""
        raise InputError(f"{label} is a {type(da).__name__}, not an xarray.DataArray{hint}")
    spatial = _spatial_dims(da, label)
    da = _band_dim(da, label, spatial, band_dim)
    if 0 in da.shape:
        raise InputError(f"{label} is empty ({dict(da.sizes)})")
    da = da.astype("float32") if da.dtype == np.float16 else da  # GeoTIFF has no float16
    if da.dtype.kind not in "uif" or not rasterio.dtypes.check_dtype(da.dtype):
        hint = "give amplitude or intensity as real bands" if da.dtype.kind == "c" else "cast it, e.g. .astype('float32')"
        raise InputError(f"{label} has {da.dtype} values, which a GeoTIFF band cannot hold: {hint}")
    if (crs := da.rio.crs) is None:
        raise InputError(f"{label} has no CRS: set it with .rio.write_crs('EPSG:...')")
    names, files = _band_files(da, label)
    data, transform = _north_up(da, label, *spatial)
    return _Date(label, data.rename({spatial[0]: "y", spatial[1]: "x"}), names, files, crs, transform, _nodata(da, label))


def _row_blocks(data: xr.DataArray) -> list[tuple[int, int]]:
    """Row ranges to compute and write one at a time: the dask chunks along y, else ~:data:`BLOCK_BYTES`."""
    rows = max(1, BLOCK_BYTES // (data.sizes["band"] * data.sizes["x"] * data.dtype.itemsize))
    sizes = data.chunksizes.get("y") or (rows,) * -(-data.sizes["y"] // rows)
    edges = np.minimum(np.cumsum((0, *sizes)), data.sizes["y"]).tolist()
    return list(zip(edges[:-1], edges[1:]))


def _write_date(date: _Date, folder: Path) -> None:
    """One single-band GeoTIFF per band in ``folder``, written row block by row block."""
    height, width = date.data.sizes["y"], date.data.sizes["x"]
    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype=date.data.dtype.name,
                   crs=date.crs, transform=date.transform, nodata=date.nodata)
    folder.mkdir()
    with ExitStack() as stack:
        outs: list[Any] = []
        for start, stop in _row_blocks(date.data):
            block = np.asarray(date.data.isel(y=slice(start, stop)).values)  # computes this block of every band
            try:
                outs = outs or [stack.enter_context(rasterio.open(folder / f, "w", **profile)) for f in date.files]
                for out, band in zip(outs, block):
                    out.write(band, 1, window=Window(0, start, width, stop - start))
            except (OSError, RasterioError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OutputError(f"cannot write {date.label}'s band files in {folder}: {reason} (set TMPDIR)") from None


def _keep_order(params: DetectParams, dates: tuple[_Date, _Date], folders: tuple[Path, Path]) -> DetectParams:
    """``params`` selecting the DataArrays' band order (a folder is read in Sentinel-2, then name order)
    unless the model names its bands (it picks them by name, as from a folder)."""
    names = dates[0].names
    if sorted(names) != sorted(dates[1].names) or open_scene(folders[0]).band_names == names:
        return params
    with warnings.catch_warnings():  # the run itself warns
        warnings.simplefilter("ignore")
        spec = open_inputs(folders[0], folders[1], params)[2]
    return params if spec.bands is not None else DetectParams(**{**params.model_dump(), "bands": list(names)})


def _summary_attrs(summary: dict[str, Any]) -> dict[str, str | int | float]:
    """A small run summary of ``run.json`` as netCDF-safe attributes: str/int/float, anything else as JSON text."""
    model, counts = summary["model"], summary["counts"]
    attrs = {
        "model": model.get("name"), "model_checkpoint": Path(model["checkpoint"]).name if model.get("checkpoint") else None,
        "threshold": summary.get("threshold"), "bands_t1": summary["t1"]["bands"], "bands_t2": summary["t2"]["bands"],
        "valid_pixels": counts.get("valid_pixels"), "changed_pixels": counts.get("changed_pixels"),
        "coregistration": summary.get("coregistration"), "cloud_fraction": summary.get("cloud_fraction"),
        "warnings": summary.get("warnings") or None, "parameters": summary.get("parameters"),
        "fingerprint": summary.get("fingerprint"), "changedet_version": summary.get("versions", {}).get("changedet"),
    }
    return {k: v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v, default=str)
            for k, v in attrs.items() if v is not None}


def _read_outputs(result: DetectResult) -> xr.Dataset:
    """The output rasters of ``result``, loaded into memory, as one Dataset with CRS, transform and nodata."""
    variables = {}
    for var, name in VARIABLES.items():
        if name not in result.summary["outputs"]:
            continue
        with rioxarray.open_rasterio(result.path(name), masked=False) as opened:
            raster = opened.load()
        crs, transform, nodata = raster.rio.crs, raster.rio.transform(), raster.rio.nodata
        raster = (raster.squeeze("band", drop=True) if raster.sizes["band"] == 1 else raster).drop_vars("spatial_ref", errors="ignore")
        raster.attrs, raster.encoding = {"long_name": OUTPUTS[name].description}, {}
        variables[var] = raster.rio.write_nodata(nodata, encoded=False)
    dataset = xr.Dataset(variables, attrs=_summary_attrs(result.summary))
    return dataset.rio.write_crs(crs).rio.write_transform(transform)


def detect_xarray(
    t1: xr.DataArray, t2: xr.DataArray, model: str = DEFAULT_MODEL, band_dim: str | None = None, **params: Any
) -> xr.Dataset:
    """Detect changes between two georeferenced DataArrays through the path of ``changedet detect``.

    Args:
        t1, t2: one date each: 2-D spatial dims (``y``/``x`` or what rioxarray recognises), one band dim,
            a CRS (``rio.crs``); NumPy- or dask-backed (``rioxarray.open_rasterio``, stackstac with
            ``xy_coords="center"``, odc-stac ``.to_array("band")``); the dates may lie on different grids.
            Band names are the band coordinate's values (``B02``, ``red``; integers 1..n: ``B1..Bn``;
            band-suffix names such as ``b4`` upper-cased, as from a folder). Other dims of size 1 are
            dropped. Declared nodata (``rio.nodata``, else ``rio.encoded_nodata``) and NaN are invalid.
        model: as ``--model``.
        band_dim: the band dim, when it is not the only non-spatial dim (or ``band``).
        **params: any other :class:`~changedet.pipeline.params.DetectParams` field (``threshold``, ``tile``,
            ``device``...) but ``bands``: select bands on the DataArrays (``t.sel(band=[...])``).

    Returns:
        A Dataset on the common grid with ``probability`` (float32), ``mask`` (uint8: 1 change, 0 none, 2
        abstain with smoothing), ``difference`` (float32) (and ``certified_radius`` with smoothing), CRS,
        transform and nodata written (``rio``), and ``attrs`` summarising ``run.json`` (str/int/float,
        nested values as JSON text). Polygons: use :func:`~changedet.pipeline.detect.detect_changes`.

    Memory and disk: each date is computed one row block at a time (its dask chunks along y, else
    ~64 MB of all bands) into uncompressed GeoTIFFs in a temporary folder (``TMPDIR``: room for both
    dates and the outputs); the Dataset holds the outputs in memory. Band order is the DataArrays' for
    models that take bands by position; models that name their bands (``oscd-s2``) or roles (``rgb``)
    pick them by name or role, as from a folder.

    Raises:
        InputError: not a DataArray, no CRS, no or an ambiguous band dim, no 2-D spatial dims, empty,
            duplicate or unusable band names, a rotated transform or coordinates that are not its regular
            pixel centres, an unwritable dtype or nodata; and whatever ``changedet detect`` refuses
            (temporary paths named t1/t2). Nothing is returned or left behind on any error.
        ParameterError: an invalid parameter, as ``changedet detect`` reports it.
    """
    if "bands" in params:
        raise ParameterError("bands: select bands on the DataArrays instead, e.g. t1.sel(band=['B04', 'B03', 'B02'])")
    settings = DetectParams(model=model, **params)
    dates = (_prepare(t1, "t1", band_dim), _prepare(t2, "t2", band_dim))
    with tempfile.TemporaryDirectory(prefix="changedet-xarray-") as tmp:
        root = Path(tmp)
        folders = (root / "t1", root / "t2")
        for date, folder in zip(dates, folders):
            _write_date(date, folder)
        try:
            settings = _keep_order(settings, dates, folders)
            result = detect_changes(folders[0], folders[1], root / "out", settings)
        except ChangeDetError as exc:
            message = str(exc).replace(str(folders[0]), "t1").replace(str(folders[1]), "t2").replace(tmp, "<temporary folder>")
            raise type(exc)(message) from exc
        return _read_outputs(result)
