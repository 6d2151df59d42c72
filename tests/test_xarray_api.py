"""changedet.detect_xarray: rioxarray DataArrays in, the CLI's rasters out as one georeferenced Dataset.

Equality with ``detect_changes`` on the same data written as band folders (bundled model, all 13 bands
on the 10 m grid) and on the bundled sample folders themselves (CVA, 10 m bands); dask input; band
names that are not Sentinel-2 names; one-line refusals that leave nothing behind; netCDF round trip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray
import xarray as xr
from affine import Affine
from rasterio.enums import Resampling

import changedet
from changedet.errors import InputError
from changedet.io.scene import SENTINEL2_ORDER, band_name_from_filename
from changedet.options import ParameterError
from changedet.pipeline.detect import DIFFERENCE, MASK, MASK_NODATA, PROBABILITY, DetectParams, detect_changes

VARIABLES = {"probability": PROBABILITY, "mask": MASK, "difference": DIFFERENCE}
TEN_METRE = ("B02", "B03", "B04", "B08")


def _band_files(folder: Path) -> dict[str, Path]:
    return {band_name_from_filename(str(p)): p for p in folder.glob("*.tif")}


def _stack(folder: Path, bands=SENTINEL2_ORDER) -> xr.DataArray:
    """``bands`` of one sample date on its 10 m (B02) grid, band coordinate = their Sentinel-2 names."""
    files = _band_files(folder)
    ref = rioxarray.open_rasterio(files["B02"])
    arrays = []
    for name in bands:
        band = rioxarray.open_rasterio(files[name])
        if band.shape != ref.shape:
            band = band.rio.reproject_match(ref, resampling=Resampling.bilinear)
        arrays.append(band.drop_vars("spatial_ref").assign_coords(x=ref.x, y=ref.y))
    stack = xr.concat(arrays, dim="band", combine_attrs="drop").assign_coords(band=list(bands))
    return stack.rio.write_crs(ref.rio.crs).rio.write_transform(ref.rio.transform()).load()


def _write_folder(stack: xr.DataArray, folder: Path) -> Path:
    """``stack`` as the CLI reads a date: one ``<tile>_<band>.tif`` per band (rasterio, not the module's writer)."""
    folder.mkdir()
    profile = dict(driver="GTiff", width=stack.sizes["x"], height=stack.sizes["y"], count=1, dtype=stack.dtype.name,
                   crs=stack.rio.crs, transform=stack.rio.transform(), nodata=stack.rio.nodata)
    for name in stack["band"].values:
        with rasterio.open(folder / f"T31UDQ_{name}.tif", "w", **profile) as dst:
            dst.write(stack.sel(band=name).values, 1)
    return folder


def _assert_same_as_cli(ds: xr.Dataset, out_dir: Path) -> None:
    for var, name in VARIABLES.items():
        with rasterio.open(out_dir / name) as src:
            values = src.read(1)
            assert ds[var].dtype == values.dtype and np.array_equal(ds[var].values, values), var
            assert ds[var].rio.crs == src.crs and ds[var].rio.transform() == src.transform, var
            assert ds[var].rio.nodata == src.nodata, var
    assert ds.rio.crs == src.crs and ds.rio.transform() == src.transform


@pytest.fixture(scope="module")
def stacks(sample_city):
    """Both sample dates as 13-band uint16 DataArrays on the 10 m grid, nodata 0, a corner of t2 invalid."""
    t1, t2 = _stack(sample_city / "imgs_1"), _stack(sample_city / "imgs_2")
    t2 = t2.copy(data=t2.values.copy())
    t2.values[:, :20, :30] = 0
    return t1.rio.write_nodata(0, encoded=False), t2.rio.write_nodata(0, encoded=False)


@pytest.fixture(scope="module")
def cli_run(stacks, tmp_path_factory):
    """``detect_changes`` (default parameters) on the stacks written as band folders."""
    root = tmp_path_factory.mktemp("xarray_cli")
    folders = [_write_folder(s, root / date) for s, date in zip(stacks, ("t1", "t2"))]
    return detect_changes(folders[0], folders[1], root / "out", DetectParams())


@pytest.fixture(scope="module")
def xr_run(stacks):
    return changedet.detect_xarray(*stacks)


@pytest.fixture(scope="module")
def ten_metre(sample_city):
    """The 10 m bands of both sample dates, read as they are (no resampling)."""
    return tuple(_stack(sample_city / d, TEN_METRE) for d in ("imgs_1", "imgs_2"))


@pytest.fixture(scope="module")
def cva_run(ten_metre):
    return changedet.detect_xarray(*ten_metre, model="cva")


def test_equals_the_cli_on_the_same_band_folders(xr_run, cli_run):
    _assert_same_as_cli(xr_run, cli_run.out_dir)
    summary = cli_run.summary
    assert xr_run.attrs["threshold"] == summary["threshold"] and xr_run.attrs["model"] == summary["model"]["name"]
    assert xr_run.attrs["valid_pixels"] == summary["counts"]["valid_pixels"] < 395 * 360  # t2's nodata corner
    assert (xr_run.mask.values[:20, :30] == MASK_NODATA).all()
    assert xr_run.attrs["bands_t1"] == '["' + '", "'.join(SENTINEL2_ORDER) + '"]'
    assert set(xr_run.data_vars) == set(VARIABLES) and xr_run.probability.dims == ("y", "x")


def test_equals_the_cli_on_the_bundled_sample_folders(cva_run, sample_city, tmp_path):
    result = detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", tmp_path / "out",
                            DetectParams(model="cva", bands=list(TEN_METRE)))
    _assert_same_as_cli(cva_run, result.out_dir)


def test_dask_backed_input_gives_the_same_result(stacks, xr_run):
    chunked = (stacks[0].chunk({"band": 1, "y": 100, "x": 128}), stacks[1].chunk({"band": 4, "y": 64}))
    ds = changedet.detect_xarray(*chunked)
    for var in VARIABLES:
        assert np.array_equal(ds[var].values, xr_run[var].values), var
    assert ds.rio.transform() == xr_run.rio.transform() and ds.attrs["threshold"] == xr_run.attrs["threshold"]


def test_models_that_name_their_bands_pick_them_by_name(stacks, xr_run):
    reversed_order = list(SENTINEL2_ORDER[::-1])
    ds = changedet.detect_xarray(*(s.sel(band=reversed_order) for s in stacks))
    assert ds.attrs["bands_t1"] == xr_run.attrs["bands_t1"]  # oscd-s2's order, as from a folder
    assert np.array_equal(ds.probability.values, xr_run.probability.values)


def test_common_names_keep_their_names_and_order(ten_metre, cva_run):
    names = ["blue", "green", "red", "nir"]  # read from <name>.tif; a folder would sort them
    ds = changedet.detect_xarray(*(t.assign_coords(band=names) for t in ten_metre), model="cva")
    assert ds.attrs["bands_t1"] == ds.attrs["bands_t2"] == '["blue", "green", "red", "nir"]'
    assert "warnings" not in ds.attrs  # no reordering
    for var in VARIABLES:
        assert np.array_equal(ds[var].values, cva_run[var].values), var


def test_integer_bands_are_positions_like_a_multiband_file(stacks, tmp_path):
    t1, t2 = (s.assign_coords(band=np.arange(1, 14)) for s in stacks)
    paths = [tmp_path / "t1.tif", tmp_path / "t2.tif"]
    for stack, path in zip((t1, t2), paths):  # rasterio: rio.to_raster would recompute the transform from the coordinates
        with rasterio.open(path, "w", driver="GTiff", width=stack.sizes["x"], height=stack.sizes["y"], count=13,
                           dtype=stack.dtype.name, crs=stack.rio.crs, transform=stack.rio.transform(), nodata=0) as dst:
            dst.write(stack.values)
    result = detect_changes(paths[0], paths[1], tmp_path / "out", DetectParams(model="cva"))
    ds = changedet.detect_xarray(t1, t2, model="cva")
    assert ds.attrs["bands_t1"] == str([f"B{i}" for i in range(1, 14)]).replace("'", '"')  # B10 after B9
    _assert_same_as_cli(ds, result.out_dir)


def test_south_up_and_sliced_inputs_are_read_on_their_grid(ten_metre, cva_run):
    flipped = [t.isel(y=slice(None, None, -1)).drop_vars("spatial_ref").rio.write_crs(t.rio.crs) for t in ten_metre]
    ds = changedet.detect_xarray(*flipped, model="cva")
    assert ds.rio.transform().almost_equals(cva_run.rio.transform())  # recomputed from the coordinates
    assert np.array_equal(ds.mask.values, cva_run.mask.values)
    window = dict(x=slice(40, 300), y=slice(10, 380))  # keeps the full grid's GeoTransform: whole-pixel offset
    part = changedet.detect_xarray(*(t.isel(window) for t in ten_metre), model="cva")
    assert part.rio.transform() == cva_run.isel(window).rio.transform() and part.mask.shape == (370, 260)


def _rotated(da: xr.DataArray) -> xr.DataArray:
    return da.rio.write_transform(Affine(1e-4, 1e-5, 2.36, 1e-5, -1e-4, 48.87))


REFUSALS = {
    "no CRS": (lambda t: t.drop_vars("spatial_ref"), "t1 has no CRS"),
    "no band dim": (lambda t: t.isel(band=0), "t1 has no band dim"),
    "two unnamed extra dims": (lambda t: t.expand_dims(a=2).rename(band="b"), r"several non-spatial dims \(a, b\).*band_dim="),
    "duplicate band names": (lambda t: t.assign_coords(band=["B02", "B03", "b02", "B08"]), r"duplicate band names \(B02\)"),
    "band name read as another": (lambda t: t.assign_coords(band=["B02", "B03", "sr_b4", "B08"]), "ends like a band suffix"),
    "empty": (lambda t: t.isel(x=slice(0, 0)), "t1 is empty"),
    "several dates": (lambda t: t.expand_dims(time=3), r"dim time of size 3.*\.isel\(time=0\)"),
    "not 2-D spatial": (lambda t: t.rename(x="a", y="b"), "no 2-D spatial dims"),
    "rotated": (_rotated, "rotated transform"),
    "irregular coords": (lambda t: t.assign_coords(x=np.r_[t.x.values[:99], t.x.values[99:] + 3e-5]), "not the regular pixel"),
    "top-left coords": (lambda t: t.assign_coords(x=t.x.values - float(t.rio.resolution()[0]) / 2), r"offset by \(-0.50"),
    "a Dataset": (lambda t: t.to_dataset(dim="band"), "to_array"),
    "complex values": (lambda t: t.astype("complex64"), "complex64 values"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_in_one_line(case, ten_metre, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    change, reason = REFUSALS[case]
    with pytest.raises(InputError, match=reason) as info:
        changedet.detect_xarray(change(ten_metre[0]), ten_metre[1], model="cva")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_refusals_of_the_pipeline_name_the_dates_and_leave_nothing(ten_metre, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(InputError, match=r"'B01' not found in t1; available: B02") as info:
        changedet.detect_xarray(*ten_metre, model="oscd-s2")  # needs all 13 bands
    assert str(tmp_path) not in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ParameterError, match="--tile: must be at least"):
        changedet.detect_xarray(*ten_metre, tile=3)
    with pytest.raises(ParameterError, match=r"t1.sel\(band="):
        changedet.detect_xarray(*ten_metre, bands=["B02"])


def test_dataset_round_trips_through_netcdf(xr_run, tmp_path):
    engine = next((e for e, module in (("netcdf4", "netCDF4"), ("h5netcdf", "h5netcdf"), ("scipy", "scipy"))
                   if importlib.util.find_spec(module)), None)
    if engine is None:
        pytest.skip("no netCDF engine installed (netCDF4, h5netcdf or scipy)")
    ds = xr_run
    if engine == "scipy":  # netCDF3 has no unsigned bytes: the mask goes as int16
        ds = ds.assign(mask=ds.mask.astype("int16").rio.write_nodata(MASK_NODATA, encoded=False))
    ds.to_netcdf(tmp_path / "changes.nc", engine=engine)
    with xr.open_dataset(tmp_path / "changes.nc", engine=engine, decode_coords="all", mask_and_scale=False) as back:
        back.load()
    assert back.attrs == xr_run.attrs
    assert back.rio.crs == xr_run.rio.crs and back.rio.transform() == xr_run.rio.transform()
    for var in VARIABLES:
        assert np.array_equal(back[var].values, xr_run[var].values), var
        assert back[var].rio.nodata == xr_run[var].rio.nodata, var


def test_import_stays_light_and_exports_detect_xarray():
    code = "import sys, changedet; print(sorted(m for m in ('torch', 'xarray', 'rasterio') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    from changedet.xarray_api import detect_xarray

    assert changedet.detect_xarray is detect_xarray
    with pytest.raises(AttributeError):
        changedet.no_such_name  # noqa: B018
