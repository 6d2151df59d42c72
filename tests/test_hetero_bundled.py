"""The bundled ``hetero`` model (``structure-refined`` trained on the 13 shared hetero/SAR scenes): any
1- or 3-band optical/SAR pair in either order, through ``changedet detect`` and the Prefect flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from changedet.checkpoint import read_metadata
from changedet.cli import main as cli_main
from changedet.evaluate import evaluate_mask
from changedet.pipeline.output_table import DIFFERENCE, MASK, MASK_NODATA, PROBABILITY, RUN_JSON
from changedet.testing.synthetic import write_synthetic_optical_sar
from changedet.weights import bundled_checkpoint

CHECKPOINT = bundled_checkpoint("hetero")
pytestmark = pytest.mark.skipif(CHECKPOINT is None, reason="the bundled hetero checkpoint is not in changedet/weights")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The synthetic optical (3-band) / SAR (1-band) pair its metadata records a figure for."""
    return write_synthetic_optical_sar(tmp_path_factory.mktemp("hetero"))


def _detect(t1: Path, t2: Path, out: Path, *options: str) -> dict:
    args = ["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--model", "hetero", "--quiet", *options]
    assert cli_main(args) == 0
    return json.loads((out / RUN_JSON).read_text())


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def test_reproduces_its_recorded_sample_figure(pair, tmp_path):
    optical, sar, label = pair
    meta = read_metadata(CHECKPOINT)
    run = _detect(optical, sar, tmp_path / "a")
    assert run["model"]["name"] == "structure-refined"
    m = evaluate_mask(tmp_path / "a" / MASK, label)
    assert abs(m["f1"] - meta["sample_scene"]["f1"]) < 1e-6
    assert meta["expected_f1_unseen"]["pooled_f1_mean"] > 0
    with rasterio.open(optical) as src, rasterio.open(tmp_path / "a" / MASK) as out:
        assert out.crs == src.crs and out.transform == src.transform and out.nodata == MASK_NODATA


def test_either_order_gives_the_same_map(pair, tmp_path):
    optical, sar, _ = pair
    _detect(optical, sar, tmp_path / "a")
    _detect(sar, optical, tmp_path / "b")
    for name in (MASK, PROBABILITY, DIFFERENCE):
        np.testing.assert_allclose(_read(tmp_path / "a" / name), _read(tmp_path / "b" / name), atol=1e-5)


def test_sar_against_sar_runs(pair, tmp_path):
    _, sar, _ = pair
    _detect(sar, sar, tmp_path / "same")
    assert (_read(tmp_path / "same" / MASK)[0] == 0).all()  # a date against itself: no change


def test_bands_it_cannot_take_are_refused(pair, tmp_path, capsys):
    optical, sar, _ = pair
    two = tmp_path / "two.tif"
    with rasterio.open(sar) as src:
        profile, data = src.profile, src.read()
    profile.update(count=2)
    with rasterio.open(two, "w", **profile) as dst:
        dst.write(np.concatenate([data, data]))
    out = tmp_path / "refused"
    assert cli_main(["detect", "--t1", str(optical), "--t2", str(two), "--out", str(out), "--model", "hetero", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "1- or 3-band" in err[0]
    assert not out.exists()


def test_flow_writes_the_same_outputs(pair, tmp_path, prefect_api):
    """A Dask worker runs torch on one thread: the CLI on one thread writes the same bytes. On all
    cores oneDNN may pick other kernels (the transposed convolution's blocking depends on the thread
    count), so a probability can differ in its last bit, never more."""
    from flows.detect import DetectFlowParams, detect_pair, task_runner

    optical, sar, _ = pair
    _detect(optical, sar, tmp_path / "cli", "--threads", "1")
    _detect(optical, sar, tmp_path / "all-cores")
    params = DetectFlowParams(t1=str(optical), t2=str(sar), out=str(tmp_path / "flow"), name="hetero", model="hetero")
    detect_pair.with_options(task_runner=task_runner(workers=1))(params)
    for name in (MASK, PROBABILITY):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "flow" / name).read_bytes(), name
    np.testing.assert_array_equal(_read(tmp_path / "all-cores" / MASK), _read(tmp_path / "flow" / MASK))
    np.testing.assert_allclose(_read(tmp_path / "all-cores" / PROBABILITY), _read(tmp_path / "flow" / PROBABILITY), rtol=0, atol=1e-6)
