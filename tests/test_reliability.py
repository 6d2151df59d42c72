"""Reliability: bad inputs and faults through ``changedet detect`` and the Prefect detect flow.

Every case runs against an output folder that already holds the outputs of an earlier successful
run, with ``--overwrite`` (so a run that got far enough would replace them), and must give:

* a non-zero exit status and exactly one ``error: <reason>`` line that names the cause;
* no partial output: no new raster, GeoPackage, style or staging folder anywhere in ``--out`` (only
  the hidden tile store, kept so that a rerun resumes, may remain after an interrupt or a full disk);
* the earlier outputs byte-identical.

A full disk is simulated (``OSError(ENOSPC)`` / SQLite's "database or disk is full" injected where
the tile store, the COG conversion and the GeoPackage write), because mounting a tiny tmpfs needs root.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from changedet import detect
from changedet.cli import main
from changedet.weights import bundled_checkpoint
from flows.detect import main as flow_main
from tests.conftest import write_raster

# flows.detect is imported at collection on purpose: Prefect's log handlers then bind to pytest's
# stream, not to a capsys stream that closes after the first flow test.
OUTPUT_SUFFIXES = (".tif", ".tiff", ".gpkg", ".qml")


class Payload:
    """A pickle that creates ``marker`` when unpickled by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@dataclass
class Ctx:
    """What a case builder gets: a temp folder, the good pair, the bundled city, the output folder."""

    tmp: Path
    t1: Path
    t2: Path
    city: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch

    def args(self, t1: Path | str | None = None, t2: Path | str | None = None) -> list[str]:
        return ["--t1", str(t1 or self.t1), "--t2", str(t2 or self.t2)]


@dataclass(frozen=True)
class Case:
    """A failing run: CLI arguments (without --out), a fragment the error line must contain, the exit status."""

    args: list[str]
    expect: str
    status: int = 2
    overwrite: bool = True


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(name: str):
    def register(fn: Callable[[Ctx], Case]) -> Callable[[Ctx], Case]:
        CASES[name] = fn
        return fn

    return register


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (recursively) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


def assert_failed_cleanly(rc: int, err: str, out: Path, before: dict[str, bytes], expected: Case) -> None:
    assert rc == expected.status, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert expected.expect.lower() in lines[0].lower(), lines[0]
    after = snapshot(out)
    assert {name: after.get(name) for name in before} == before, "earlier outputs changed"
    new = [name for name in after if name not in before]
    assert all(name.startswith(detect.TILE_STORE_DIR + "/") for name in new), new
    assert not [n for n in new if n.endswith(OUTPUT_SUFFIXES)], new
    assert not list(out.glob(".changedet-staging-*")) if out.is_dir() else True


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
# models and checkpoints
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------------


@case("overlap >= tile")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--tile", "64", "--overlap", "64"], "overlap")


@case("threshold out of range")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--threshold", "1.5"], "--threshold")


@case("invalid crs")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--crs", "EPSG:999999"], "EPSG:999999")


@case("negative resolution")
def _(c: Ctx) -> Case:
    return Case([*c.args(), "--resolution", "-5"], "--resolution")


@case("cuda without gpu")
def _(c: Ctx) -> Case:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    return Case([*c.args(), "--device", "cuda"], "cuda")


# ------------------------------------------------------------------------------------------------
# outputs and faults
# ------------------------------------------------------------------------------------------------


@case("output exists without --overwrite")
def _(c: Ctx) -> Case:
    return Case(c.args(), "--overwrite", overwrite=False)


@case("output path is a file")
def _(c: Ctx) -> Case:
    shutil.rmtree(c.out)
    c.out.write_text("keep me")
    return Case(c.args(), "not a folder")


@case("unwritable output folder")
def _(c: Ctx) -> Case:
    if os.geteuid() != 0:
        c.out.chmod(0o555)  # holds the earlier outputs; restored by the test
        return Case(c.args(), "permission denied", status=1)
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no folder is unwritable")
    c.out = Path("/sys/changedet-reliability-out")  # root can write anywhere except pseudo file systems
    return Case(c.args(), "not permitted", status=1)


@case("interrupted run (Ctrl-C)")
def _(c: Ctx) -> Case:
    calls = []
    real = detect.predict_batch

    def interrupt_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    c.monkeypatch.setattr(detect, "predict_batch", interrupt_second_batch)
    return Case([*c.args(), "--tile", "32", "--overlap", "8", "--batch-size", "1"], "interrupted", status=130)


def _disk_full(path: str | Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@case("disk full in the tile store")
def _(c: Ctx) -> Case:
    def full(self, index, *args):
        raise _disk_full(self.path / "pred" / str(index))

    c.monkeypatch.setattr(detect.TileStore, "write", full)
    return Case(c.args(), "no space left on device", status=1)


@case("disk full while writing a COG")
def _(c: Ctx) -> Case:
    real = detect.write_cog

    def full(src, dst, resampling="average"):
        if Path(dst).name == detect.DIFFERENCE:  # the probability COG is complete, this one half-written
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
            raise _disk_full(dst)
        real(src, dst, resampling)

    c.monkeypatch.setattr(detect, "write_cog", full)
    return Case(c.args(), "no space left on device", status=1)


@case("disk full while writing the GeoPackage")
def _(c: Ctx) -> Case:
    import geopandas as gpd
    from pyogrio.errors import FeatureError

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
        raise FeatureError("Could not add feature to layer at index 0: sqlite3_exec(...) failed: database or disk is full")

    c.monkeypatch.setattr(gpd.GeoDataFrame, "to_file", full)
    return Case(c.args(), "database or disk is full")


# ------------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def good_pair(tmp_path):
    data = np.random.default_rng(0).integers(100, 4000, (3, 64, 64)).astype(np.uint16)
    return write_raster(tmp_path / "t1.tif", data), write_raster(tmp_path / "t2.tif", data[::-1].copy())


@pytest.fixture(scope="module")
def earlier_outputs(tmp_path_factory) -> Path:
    """Outputs of a successful run on another pair: what every failing run must leave untouched."""
    root = tmp_path_factory.mktemp("earlier")
    data = np.random.default_rng(7).integers(100, 4000, (3, 48, 48)).astype(np.uint16)
    t1, t2 = write_raster(root / "a.tif", data), write_raster(root / "b.tif", data[:, ::-1].copy())
    detect.detect_changes(t1, t2, root / "out", detect.DetectParams(tile=32, overlap=8))
    return root / "out"


@pytest.fixture
def ctx(tmp_path, good_pair, sample_city, earlier_outputs, monkeypatch) -> Ctx:
    out = tmp_path / "out"
    shutil.copytree(earlier_outputs, out)
    return Ctx(tmp_path, *good_pair, sample_city, out, monkeypatch)


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_cli_fails_cleanly(name, ctx, capsys):
    expected = CASES[name](ctx)
    before = snapshot(ctx.out)
    try:
        rc = main(["detect", *expected.args, "--out", str(ctx.out), "--quiet", *(["--overwrite"] if expected.overwrite else [])])
        err = capsys.readouterr().err
        assert_failed_cleanly(rc, err, ctx.out, before, expected)
    finally:
        if ctx.out.is_dir() and not ctx.out.is_relative_to("/sys"):
            ctx.out.chmod(0o755)
    assert not (ctx.tmp / "pwned").exists()  # no pickle payload ran


def test_rerun_after_a_fault_resumes_and_succeeds(ctx, monkeypatch):
    """After a full disk during the GeoPackage write, the same command resumes from the stored tiles."""
    import geopandas as gpd
    from pyogrio.errors import FeatureError

    real = gpd.GeoDataFrame.to_file

    def full(self, *args, **kwargs):
        raise FeatureError("database or disk is full")

    monkeypatch.setattr(gpd.GeoDataFrame, "to_file", full)
    args = ["detect", *ctx.args(), "--out", str(ctx.out), "--tile", "32", "--overlap", "8", "--overwrite", "--quiet"]
    assert main(args) == 2
    monkeypatch.setattr(gpd.GeoDataFrame, "to_file", real)
    assert main(args) == 0
    summary = json.loads((ctx.out / detect.RUN_JSON).read_text())
    assert summary["timings"]["model_s"] == 0.0 and summary["counts"]["resumed_tiles"] == summary["counts"]["tiles"]
    assert sorted(p.name for p in ctx.out.iterdir()) == sorted(detect.OUTPUT_NAMES)


# ------------------------------------------------------------------------------------------------
# the Prefect flow (python flows/detect.py run ...)
# ------------------------------------------------------------------------------------------------

FLOW_CASES = ["corrupt tif", "non-overlapping scenes", "malicious checkpoint (pickle payload)", "output exists without --overwrite"]


@pytest.mark.parametrize("name", FLOW_CASES)
def test_flow_fails_cleanly(name, ctx, prefect_api, capsys):
    expected = CASES[name](ctx)
    before = snapshot(ctx.out)
    argv = ["run", *expected.args, "--out", str(ctx.out), "--workers", "1", *(["--overwrite"] if expected.overwrite else [])]
    rc = flow_main(argv)
    assert_failed_cleanly(rc, capsys.readouterr().err, ctx.out, before, expected)
    assert not (ctx.out / detect.TILE_STORE_DIR).exists()  # refused before predicting anything
    assert not (ctx.tmp / "pwned").exists()  # not even in the Dask worker process
