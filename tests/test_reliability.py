"""Reliability: every failure class through ``changedet detect``, the other commands and the Prefect
flows gives one ``error: <reason>`` line, its documented exit status and nothing partial; degenerate
inputs give the right map; concurrent and killed runs leave a consistent output folder.

The failing cases are registered in ``tests/reliability_cases_*.py`` (see ``tests/reliability.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

import tests.reliability_cases_inputs  # noqa: F401 - registers the cases
import tests.reliability_cases_outputs  # noqa: F401 - registers the cases
from changedet.pipeline import detect
from changedet.cli import main
from changedet.io.outdir import LOCK_NAME
from flows.detect import main as flow_main
from tests.conftest import REPO, write_raster
from tests.reliability import CASES, assert_failed_cleanly, assert_one_error_line, snapshot

# flows.detect is imported at collection on purpose: Prefect's log handlers then bind to pytest's
# stream, not to a capsys stream that closes after the first flow test.


def test_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_cli_fails_cleanly(name, ctx, capsys):
    expected = CASES[name](ctx)
    before = snapshot(ctx.out)
    out = str(ctx.out) if expected.out is None else expected.out
    try:
        rc = main(["detect", *expected.args, "--out", out, "--quiet", *(["--overwrite"] if expected.overwrite else [])])
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
    assert main(args) == 1
    monkeypatch.setattr(gpd.GeoDataFrame, "to_file", real)
    assert main(args) == 0
    summary = json.loads((ctx.out / detect.RUN_JSON).read_text())
    assert summary["timings"]["model_s"] == 0.0 and summary["counts"]["resumed_tiles"] == summary["counts"]["tiles"]
    assert sorted(p.name for p in ctx.out.iterdir()) == sorted(detect.OUTPUT_NAMES)


def test_debug_shows_the_traceback(ctx, capsys):
    rc = main(["detect", *ctx.args(), "--out", str(ctx.out), "--device", "mps", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and err.strip().endswith("use cpu, cuda or cuda:N")


# ------------------------------------------------------------------------------------------------
# the other commands: one line, documented status
# ------------------------------------------------------------------------------------------------

COMMANDS = {
    "evaluate, missing prediction": (["evaluate", "--pred", "{tmp}/nope.tif", "--label", "{t1}"], 2, "nope.tif"),
    "evaluate, probability as prediction": (["evaluate", "--pred", "{t1}", "--label", "{t1}"], 2, "pass change_mask.tif"),
    "train, missing config": (["train", "--config", "{tmp}/nope.yaml"], 2, "nope.yaml"),
    "train, invalid YAML": (["train", "--config", "{tmp}/bad.yaml"], 2, "bad.yaml"),
    "train, unknown key": (["train", "--config", "{tmp}/unknown.yaml"], 2, "extra inputs"),
    "robustness, missing data": (["robustness", "--data", "{tmp}/nope", "--out", "{tmp}/r"], 2, "nope"),
    "robustness, bad budget": (["robustness", "--data", "{tmp}", "--out", "{tmp}/r", "--eps", "x"], 2, "--eps"),
    "domain-shift, unknown shift": (["domain-shift", "--data", "{city}/..", "--out", "{tmp}/d", "--shifts", "nope"], 2, "nope"),
    "domain-shift, empty --out": (["domain-shift", "--data", "{city}/..", "--out", ""], 2, "--out is empty"),
    "domain-shift, severity out of range": (["domain-shift", "--data", "{city}/..", "--out", "{tmp}/d", "--severities", "9"], 2, "[0, 5]"),
    "domain-shift, a scene that is not there": (["domain-shift", "--data", "{city}/..", "--out", "{tmp}/d", "--scenes", "bercy,hongkong"], 2,
                                                "no labelled scene"),
    "robustness, negative budget": (["robustness", "--data", "{city}/..", "--out", "{tmp}/r", "--scenes", "oscd_bercy", "--eps=-4,0"], 2, ">= 0"),
    "unknown command": (["frobnicate"], 2, "invalid choice"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_fails_with_one_line(name, ctx, capsys):
    (ctx.tmp / "bad.yaml").write_text("a: [")
    (ctx.tmp / "unknown.yaml").write_text("foo: 1\n")
    template, status, expect = COMMANDS[name]
    argv = [a.format(tmp=ctx.tmp, t1=ctx.t1, city=ctx.city) for a in template]
    assert_one_error_line(main(argv), capsys.readouterr().err, status, expect)


@pytest.mark.parametrize("module, argv, expect", [
    ("flows/train.py", ["{tmp}/nope.yaml"], "nope.yaml"),
    ("flows/evaluate.py", ["robustness", "--data", "{tmp}/nope", "--out", "{tmp}/r"], "nope"),
    ("flows/detect.py", ["run", "--t1", "{t1}", "--t2", "{t1}", "--out", "{tmp}/o", "--workers", "0"], "--workers"),
])
def test_flow_command_lines_fail_with_one_line(module, argv, expect, ctx, prefect_api):
    """As a user runs them: a fresh process, so Prefect's own log handlers are in play."""
    args = [a.format(tmp=ctx.tmp, t1=ctx.t1) for a in argv]
    proc = subprocess.run([sys.executable, module, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_error_line(proc.returncode, proc.stderr, 2, expect)


# ------------------------------------------------------------------------------------------------
# the Prefect flow (python flows/detect.py run ...)
# ------------------------------------------------------------------------------------------------

FLOW_CASES = [
    "corrupt tif", "non-overlapping scenes", "malicious checkpoint (pickle payload)", "output exists without --overwrite",
    "checkpoint metadata without model", "tile below the minimum", "device mps", "unwritable output folder",
    "another run holds the output folder", "empty --out", "--out is an input band folder", "single-pixel scene (cva needs scene statistics)",
]


@pytest.mark.parametrize("name", FLOW_CASES)
def test_flow_fails_cleanly(name, ctx, prefect_api, capsys):
    expected = CASES[name](ctx)
    before = snapshot(ctx.out)
    out = str(ctx.out) if expected.out is None else expected.out
    argv = ["run", *expected.args, "--out", out, "--workers", "1", *(["--overwrite"] if expected.overwrite else [])]
    rc = flow_main(argv)
    assert_failed_cleanly(rc, capsys.readouterr().err, ctx.out, before, expected)
    assert not (ctx.out / detect.TILE_STORE_DIR).exists()  # refused before predicting anything
    assert not (ctx.tmp / "pwned").exists()  # not even in the Dask worker process


# ------------------------------------------------------------------------------------------------
# degenerate inputs: the right map, not a plausible one
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["random", "constant", "tiny"])
def test_identical_dates_are_no_change(data, tmp_path):
    shape = {"random": (4, 80, 80), "constant": (4, 40, 40), "tiny": (4, 10, 10)}[data]
    values = np.full(shape, 7, np.uint16) if data == "constant" else np.random.default_rng(3).integers(0, 9999, shape)
    scene = write_raster(tmp_path / "x.tif", values.astype(np.uint16))
    result = detect.detect_changes(scene, scene, tmp_path / "out", detect.DetectParams(tile=32, overlap=8))
    assert result.summary["model"]["name"] == "cva"
    assert result.summary["counts"]["changed_pixels"] == 0 and result.summary["changes"]["regions"] == 0
    with rasterio.open(result.path(detect.PROBABILITY)) as src:
        assert src.read(1).max() < 0.01


def test_bundled_model_sees_no_change_between_a_date_and_itself(sample_city, tmp_path):
    result = detect.detect_changes(sample_city / "imgs_1", sample_city / "imgs_1", tmp_path / "out")
    assert result.summary["model"]["checkpoint"].endswith("oscd-s2-fc-siam-diff.safetensors")
    assert result.summary["counts"]["changed_pixels"] == 0


def test_sentinel2_blue_green_red_folder_is_fed_to_the_rgb_model_as_red_green_blue(sample_city, tmp_path):
    folders = []
    for date in ("imgs_1", "imgs_2"):
        folder = tmp_path / date
        folder.mkdir()
        for band in ("B02", "B03", "B04"):
            (folder / next((sample_city / date).glob(f"*_{band}.tif")).name).symlink_to(next((sample_city / date).glob(f"*_{band}.tif")))
        folders.append(folder)
    auto = detect.detect_changes(*folders, tmp_path / "auto")
    explicit = detect.detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", tmp_path / "explicit",
                                     detect.DetectParams(model="rgb", bands=["B04", "B03", "B02"]))
    assert auto.summary["t1"]["bands"] == ["B04", "B03", "B02"] and auto.summary["t2"]["bands"] == ["B04", "B03", "B02"]
    assert any("reordered" in w for w in auto.summary["warnings"])
    for name in (detect.PROBABILITY, detect.MASK):
        assert auto.path(name).read_bytes() == explicit.path(name).read_bytes()


def _with_descriptions(path: Path, data: np.ndarray, roles: tuple[str, ...]) -> Path:
    write_raster(path, data)
    with rasterio.open(path, "r+") as dst:
        dst.descriptions = roles
    return path


def test_dates_with_bands_in_another_role_order_are_compared_band_by_band(tmp_path):
    rng = np.random.default_rng(9)
    t1 = rng.integers(1000, 2000, (4, 64, 64)).astype(np.uint16)
    t2 = t1 + rng.integers(0, 50, t1.shape).astype(np.uint16)
    t2[:, 20:40, 20:40] += 2000
    roles = ("red", "green", "blue", "nir")
    a = _with_descriptions(tmp_path / "a.tif", t1, roles)
    same = _with_descriptions(tmp_path / "same.tif", t2, roles)
    permuted = _with_descriptions(tmp_path / "permuted.tif", t2[[2, 1, 0, 3]], ("blue", "green", "red", "nir"))
    params = detect.DetectParams(model="cva", tile=32, overlap=8)
    reference = detect.detect_changes(a, same, tmp_path / "ref", params)
    reordered = detect.detect_changes(a, permuted, tmp_path / "perm", params)
    assert any("reordered" in w for w in reordered.summary["warnings"])
    assert reordered.path(detect.PROBABILITY).read_bytes() == reference.path(detect.PROBABILITY).read_bytes()


def test_a_folder_of_one_band_file_names_the_band_by_its_suffix(sample_city, tmp_path):
    folders = []
    for date in ("imgs_1", "imgs_2"):
        (tmp_path / date).mkdir()
        band = next((sample_city / date).glob("*_B08.tif"))
        (tmp_path / date / band.name).symlink_to(band)
        folders.append(tmp_path / date)
    result = detect.detect_changes(*folders, tmp_path / "out", detect.DetectParams(model="cva"))
    assert result.summary["t1"]["bands"] == ["B08"] == result.summary["t2"]["bands"]


def test_a_multiband_file_is_read_by_its_descriptions_not_by_band_positions(tmp_path):
    """Band 10 of a 13-band stack is named B10 by position; what it is comes from its description."""
    from changedet.io.bands import scene_roles
    from changedet.io.scene import open_scene

    order = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B11", "B12", "B10", "B8A"]
    stack = write_raster(tmp_path / "stack.tif", np.arange(13, dtype=np.uint16)[:, None, None] * np.ones((13, 8, 8), np.uint16))
    with rasterio.open(stack, "r+") as dst:
        dst.descriptions = order
    wanted = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    scene = open_scene(stack, wanted)
    assert [b.description for b in scene.bands] == wanted
    assert scene_roles(open_scene(stack))[9:12] == ["swir16", "swir22", "cirrus"]


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_an_alpha_band_anywhere_masks_its_file(shift, tmp_path):
    data = np.random.default_rng(12).integers(0, 250, (3, 64, 64)).astype(np.uint8)
    alpha = np.full((1, 64, 64), 255, np.uint8)
    alpha[:, 20:40, 20:40] = 0
    first = tmp_path / "alpha_first.tif"
    transform = rasterio.transform.from_origin(500000 + shift, 5400000 + shift, 10, 10)
    with rasterio.open(first, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint8", crs="EPSG:32631",
                       transform=transform) as dst:
        dst.write(np.concatenate([alpha, data]))
        dst.colorinterp = [ColorInterp.alpha, ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    other = write_raster(tmp_path / "rgb.tif", data)
    result = detect.detect_changes(other, first, tmp_path / "out", detect.DetectParams(model="cva", tile=32, overlap=8))
    with rasterio.open(result.path(detect.MASK)) as src:
        mask = src.read(1)
    assert (mask[22:38, 22:38] == detect.MASK_NODATA).all() and (mask[:16, :16] != detect.MASK_NODATA).all()


def test_a_gain_and_offset_alone_is_no_change_for_cva(tmp_path):
    t1 = np.random.default_rng(10).integers(100, 4000, (3, 64, 64)).astype(np.float32)
    a, b = write_raster(tmp_path / "a.tif", t1), write_raster(tmp_path / "b.tif", 1.5 * t1 + 1000)
    result = detect.detect_changes(a, b, tmp_path / "out", detect.DetectParams(model="cva", tile=32, overlap=8))
    assert result.summary["counts"]["changed_pixels"] == 0


def test_alpha_band_is_a_mask_not_a_band(tmp_path):
    data = np.random.default_rng(11).integers(0, 255, (3, 64, 64)).astype(np.uint8)
    alpha = np.full((1, 64, 64), 255, np.uint8)
    alpha[:, :, :16] = 0
    rgba = tmp_path / "rgba.tif"
    with rasterio.open(rgba, "w", driver="GTiff", width=64, height=64, count=4, dtype="uint8", crs="EPSG:32631",
                       transform=rasterio.transform.from_origin(500000, 5400000, 10, 10), photometric="RGB", alpha="YES") as dst:
        dst.write(np.concatenate([data, alpha]))
    rgb = write_raster(tmp_path / "rgb.tif", np.roll(data, 5, axis=2))
    result = detect.detect_changes(rgba, rgb, tmp_path / "out", detect.DetectParams(model="cva", tile=32, overlap=8))
    assert result.summary["t1"]["bands"] == ["B1", "B2", "B3"]
    assert result.summary["counts"]["valid_pixels"] == 64 * 48


# ------------------------------------------------------------------------------------------------
# concurrent and killed runs
# ------------------------------------------------------------------------------------------------


def _detect_process(t1: Path, t2: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "changedet.cli", "detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out),
           "--model", "cva", "--tile", "64", "--overlap", "8", "--quiet", "--overwrite", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def big_pair(tmp_path) -> tuple[Path, Path]:
    data = np.random.default_rng(5).integers(100, 4000, (3, 768, 768)).astype(np.uint16)
    return write_raster(tmp_path / "a.tif", data), write_raster(tmp_path / "b.tif", np.roll(data, 9, axis=2))


def _assert_complete(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(detect.OUTPUT_NAMES), sorted(p.name for p in out.iterdir())
    assert json.loads((out / detect.RUN_JSON).read_text())["counts"]["valid_pixels"] > 0


def test_two_concurrent_runs_into_one_folder(big_pair, tmp_path):
    """One run writes, the other is refused with the holder's pid (or runs after it): never a mix."""
    out = tmp_path / "out"
    procs = [_detect_process(*big_pair, out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert rc in (0, 75), err
        if rc == 75:
            assert_one_error_line(rc, err, 75, "another changedet run (pid ")
    assert 0 in [rc for rc, _ in results]
    _assert_complete(out)
    assert not (out / LOCK_NAME).exists()


def test_killed_run_leaves_no_trace_after_the_next_run(big_pair, tmp_path):
    """SIGKILL while outputs are staged: the leftover staging folder is removed by the next run."""
    out = tmp_path / "out"
    proc = _detect_process(*big_pair, out)
    deadline = time.monotonic() + 240
    while not list(out.glob(".changedet-staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL or not list(out.glob(".changedet-staging-*")):
        pytest.skip("the run finished before it could be killed while staging")
    rerun = _detect_process(*big_pair, out)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    _assert_complete(out)
    assert not list(out.glob(".changedet-*")), list(out.iterdir())
