"""Reliability cases: inputs, band identity, degenerate scenes, models and checkpoints, parameters.

Each builder returns a :class:`~tests.reliability.Case` that must fail cleanly through the CLI (and,
for some, the Prefect flow): see ``tests/test_reliability.py``.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import rasterio
from affine import Affine

from changedet.weights import bundled_checkpoint
from tests.conftest import write_raster
from tests.reliability import Case, Ctx, Payload, case

# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


@case("missing file")
def _(c: Ctx) -> Case:
    return Case(c.args(c.tmp / "nope.tif"), "does not exist")


@case("zero-byte file")
def _(c: Ctx) -> Case:
    (c.tmp / "zero.tif").write_bytes(b"")
    return Case(c.args(c.tmp / "zero.tif"), "cannot read raster")


@case("zero-size raster (0 x 0 px)")
def _(c: Ctx) -> Case:
    vrt = c.tmp / "empty.vrt"
    vrt.write_text('<VRTDataset rasterXSize="0" rasterYSize="0"><VRTRasterBand dataType="Byte" band="1"/></VRTDataset>')
    return Case(c.args(vrt), "empty.vrt")


@case("corrupt tif")
def _(c: Ctx) -> Case:
    (c.tmp / "corrupt.tif").write_bytes(b"II*\x00" + b"\x13" * 200)
    return Case(c.args(c.tmp / "corrupt.tif"), "corrupt.tif")


@case("truncated tif")
def _(c: Ctx) -> Case:
    (c.tmp / "truncated.tif").write_bytes(c.t1.read_bytes()[:300])
    return Case(c.args(c.tmp / "truncated.tif"), "truncated.tif")


@case("huge size declared in a corrupt TIFF header")
def _(c: Ctx) -> Case:
    data = bytearray(write_raster(c.tmp / "small.tif", np.ones((3, 64, 64), np.uint16)).read_bytes())
    ifd = int.from_bytes(data[4:8], "little")
    for i in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        entry = ifd + 2 + 12 * i
        if int.from_bytes(data[entry : entry + 2], "little") in (256, 257):  # ImageWidth, ImageLength (SHORT)
            data[entry + 8 : entry + 10] = (65000).to_bytes(2, "little")
    (c.tmp / "huge_header.tif").write_bytes(bytes(data))
    return Case(c.args(c.tmp / "huge_header.tif", c.tmp / "huge_header.tif"), "huge_header.tif")


@case("huge declared size (100000 x 100000 px)")
def _(c: Ctx) -> Case:
    vrt = (
        '<VRTDataset rasterXSize="100000" rasterYSize="100000"><SRS>EPSG:32631</SRS>'
        "<GeoTransform>500000, 10, 0, 5400000, 0, -10</GeoTransform>"
        + "".join(
            f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource><SourceFilename>{c.t1}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
            for b in (1, 2, 3)
        )
        + "</VRTDataset>"
    )
    (c.tmp / "huge.vrt").write_text(vrt)
    return Case(c.args(c.tmp / "huge.vrt", c.tmp / "huge.vrt"), "--max-pixels")


@case("empty folder")
def _(c: Ctx) -> Case:
    (c.tmp / "empty").mkdir()
    return Case(c.args(c.tmp / "empty"), "no raster files")


@case("band count mismatch")
def _(c: Ctx) -> Case:
    four = write_raster(c.tmp / "four.tif", np.ones((4, 64, 64), np.uint16))
    return Case([*c.args(c.t1, four), "--model", "cva"], "band count")


@case("band count the model does not take")
def _(c: Ctx) -> Case:
    four = write_raster(c.tmp / "four.tif", np.ones((4, 64, 64), np.uint16))
    return Case([*c.args(c.t1, four), "--model", "rgb"], "takes 3 bands")


@case("band names mismatch")
def _(c: Ctx) -> Case:
    folder = c.tmp / "renamed"
    shutil.copytree(c.city / "imgs_2", folder)
    next(folder.glob("*_B12.tif")).rename(folder / "x_B13.tif")
    return Case(c.args(c.city / "imgs_1", folder), "B12")


@case("crs on one side only")
def _(c: Ctx) -> Case:
    plain = write_raster(c.tmp / "plain.tif", np.ones((3, 64, 64), np.uint16), crs=None)
    return Case(c.args(c.t1, plain), "georeference")


@case("non-overlapping scenes")
def _(c: Ctx) -> Case:
    far = write_raster(c.tmp / "far.tif", np.ones((3, 64, 64), np.uint16), transform=Affine(10.0, 0, 900000.0, 0, -10.0, 5400000.0))
    return Case(c.args(c.t1, far), "do not overlap")


@case("one date all nodata")
def _(c: Ctx) -> Case:
    blank = write_raster(c.tmp / "blank.tif", np.zeros((3, 64, 64), np.uint16), nodata=0)
    return Case(c.args(c.t1, blank), "no valid pixel")


@case("one date all NaN")
def _(c: Ctx) -> Case:
    nan = write_raster(c.tmp / "nan.tif", np.full((3, 64, 64), np.nan, np.float32))
    return Case(c.args(c.t1, nan), "no valid pixel")


@case("one NaN band")
def _(c: Ctx) -> Case:
    data = np.random.default_rng(1).uniform(0, 1, (3, 64, 64)).astype(np.float32)
    data[1] = np.nan
    return Case(c.args(c.t1, write_raster(c.tmp / "nanband.tif", data)), "no valid pixel")


@case("unknown band")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--bands", "B2,B99"], "B99")


# ------------------------------------------------------------------------------------------------
# degenerate scenes and band identity
# ------------------------------------------------------------------------------------------------


@case("single-pixel scene (cva needs scene statistics)")
def _(c: Ctx) -> Case:
    one = write_raster(c.tmp / "one.tif", np.arange(3, dtype=np.uint16).reshape(3, 1, 1) + 100)
    return Case([*c.args(one, one), "--model", "cva"], "needs at least 100")


@case("scene smaller than a CNN's stride")
def _(c: Ctx) -> Case:
    small = write_raster(c.tmp / "small.tif", np.random.default_rng(2).integers(0, 999, (3, 12, 12)).astype(np.uint16))
    return Case([*c.args(small, small), "--model", "fc-siam-diff"], "smaller than the 16 px")


@case("constant date against a varying one (cva)")
def _(c: Ctx) -> Case:
    flat = write_raster(c.tmp / "flat.tif", np.full((3, 64, 64), 500, np.uint16))
    return Case([*c.args(flat, c.t2), "--model", "cva"], "constant")


@case("bands whose roles the model does not take")
def _(c: Ctx) -> Case:
    folders = []
    for date in ("imgs_1", "imgs_2"):
        folder = c.tmp / f"bgn_{date}"
        folder.mkdir()
        for band in ("B02", "B03", "B08"):
            shutil.copy(next((c.city / date).glob(f"*_{band}.tif")), folder)
        folders.append(folder)
    return Case([*c.args(*folders), "--model", "rgb"], "takes red, green, blue")


@case("date on another radiometric scale than the model's training data")
def _(c: Ctx) -> Case:
    reflectance = c.tmp / "reflectance"
    reflectance.mkdir()
    for band in (c.city / "imgs_2").glob("*.tif"):
        with rasterio.open(band) as src:
            write_raster(reflectance / band.name, src.read().astype(np.float32) / 10000, crs=src.crs, transform=src.transform)
    return Case([*c.args(c.city / "imgs_1", reflectance), "--model", _training_statistics_checkpoint(c)],
                "t2 is on another radiometric scale")


def _training_statistics_checkpoint(c: Ctx) -> str:
    """A Sentinel-2 checkpoint that stores its training data's statistics (digital numbers, reflectance x 10000)."""
    from changedet.checkpoint import save_checkpoint
    from changedet.models import create_model

    bands = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    stats = {"mean": [1500.0] * 13, "std": [800.0] * 13}
    path = c.tmp / "s2_statistics.safetensors"
    save_checkpoint(path, create_model("fc-siam-diff", in_channels=13, base_channels=8),
                    {"model": "fc-siam-diff", "config": {"base_channels": 8}, "bands": bands,
                     "normalization": {"t1": stats, "t2": stats}})
    return str(path)


@case("complex-valued bands")
def _(c: Ctx) -> Case:
    rng = np.random.default_rng(6)
    data = (rng.normal(1000, 50, (2, 32, 32)) + 1j * rng.normal(0, 50, (2, 32, 32))).astype(np.complex64)
    return Case(c.args(write_raster(c.tmp / "slc.tif", data), write_raster(c.tmp / "slc2.tif", data)), "complex-valued")


@case("integer complex bands (Sentinel-1 SLC CInt16)")
def _(c: Ctx) -> Case:
    slc = c.tmp / "slc_cint16.tif"
    with rasterio.open(slc, "w", driver="GTiff", width=32, height=32, count=1, dtype="complex_int16", crs="EPSG:32631",
                       transform=Affine(10.0, 0, 500000.0, 0, -10.0, 5400000.0)):
        pass
    return Case(c.args(slc, slc), "complex-valued")


@case("--nodata nan for integer bands")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--nodata", "nan"], "cannot occur")


@case("--nodata that the band type cannot hold")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--nodata", "1e40"], "cannot occur")


@case("band roles that differ between dates")
def _(c: Ctx) -> Case:
    dates = []
    for name, roles in (("roles1.tif", ("red", "green", "blue")), ("roles2.tif", ("red", "green", "nir"))):
        path = write_raster(c.tmp / name, np.random.default_rng(8).integers(100, 4000, (3, 64, 64)).astype(np.uint16))
        with rasterio.open(path, "r+") as dst:
            dst.descriptions = roles
        dates.append(path)
    return Case([*c.args(*dates), "--model", "cva"], "band roles differ between dates")


@case("resolution in degrees coarser than the scene")
def _(c: Ctx) -> Case:
    return Case([*c.args(c.city / "imgs_1", c.city / "imgs_2"), "--model", "cva", "--resolution", "10"], "degree")


# ------------------------------------------------------------------------------------------------
# models and checkpoints
# ------------------------------------------------------------------------------------------------


@case("checkpoint path that is a folder")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--model", str(c.tmp)], "is a folder")


@case("unknown model")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--model", "resnet-nonexistent"], "resnet-nonexistent")


@case("malicious checkpoint (pickle payload)")
def _(c: Ctx) -> Case:
    evil = c.tmp / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload(c.tmp / "pwned")))
    evil.with_suffix(".json").write_text('{"model": "cva", "config": {}}')
    return Case([*c.args(), "--model", str(evil)], "refusing to load")


@case("checkpoint without its metadata file")
def _(c: Ctx) -> Case:
    (c.tmp / "lonely.pt").write_bytes(b"\x00" * 16)
    return Case([*c.args(), "--model", str(c.tmp / "lonely.pt")], "lonely.json")


@case("not a safetensors checkpoint")
def _(c: Ctx) -> Case:
    (c.tmp / "fake.safetensors").write_bytes(b"\x00" * 64)
    return Case([*c.args(), "--model", str(c.tmp / "fake.safetensors")], "not a changedet safetensors")


@case("truncated checkpoint")
def _(c: Ctx) -> Case:
    good = bundled_checkpoint("oscd-s2").read_bytes()
    (c.tmp / "cut.safetensors").write_bytes(good[: len(good) // 2])
    return Case([*c.args(c.city / "imgs_1", c.city / "imgs_2"), "--model", str(c.tmp / "cut.safetensors")], "cannot load weights")

def _checkpoint_with(c: Ctx, name: str, metadata: object) -> str:
    """A ``.pt`` state dict with ``metadata`` as its JSON sidecar (``metadata`` a JSON text if str)."""
    import torch

    path = c.tmp / f"{name}.pt"
    torch.save({}, path)
    path.with_suffix(".json").write_text(metadata if isinstance(metadata, str) else json.dumps(metadata))
    return str(path)


@case("checkpoint metadata without model")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--model", _checkpoint_with(c, "nomodel", {"config": {}})], "no 'model'")


@case("checkpoint metadata that is not an object")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--model", _checkpoint_with(c, "list", [1, 2])], "JSON object")


@case("checkpoint sidecar that is not JSON")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--model", _checkpoint_with(c, "broken", "{not json")], "invalid checkpoint metadata")


@case("checkpoint threshold stored as text")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--model", _checkpoint_with(c, "text", {"model": "cva", "threshold": "0.5"})], "'threshold'")


@case("checkpoint config the model does not take")
def _(c: Ctx) -> Case:
    meta = {"model": "fc-siam-diff", "config": {"no_such_argument": 1}}
    return Case([*c.args(), "--model", _checkpoint_with(c, "cfg", meta)], "no_such_argument")


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


# name: (options added to the good pair, a fragment of the error line)
OPTION_CASES = {
    "overlap >= tile": (["--tile", "64", "--overlap", "64"], "overlap"),
    "threshold out of range": (["--threshold", "1.5"], "--threshold"),
    "invalid crs": (["--crs", "EPSG:999999"], "EPSG:999999"),
    "negative resolution": (["--resolution", "-5"], "--resolution"),
    **{f"device {d}": (["--device", d], "unknown device") for d in ("mps", "xpu", "meta", "cpu:0")},
    "a band selected twice": (["--bands", "B1,B2,B1", "--model", "cva"], "more than once"),
    "empty band selection": (["--bands", " , "], "comma-separated names"),
    "unparsable option value": (["--tile", "x"], "invalid int value"),
    "tile below the minimum": (["--tile", "8"], "at least 16"),
}
for _name, (_options, _expect) in OPTION_CASES.items():
    case(_name)(lambda c, o=_options, e=_expect: Case([*c.args(), *o], e))


@case("cuda without gpu")
def _(c: Ctx) -> Case:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    return Case([*c.args(), "--device", "cuda"], "cuda")


