"""``hetero-unsupervised`` (structure consistency): a 3-band optical date against a 1-band SAR-like date,
through ``changedet detect`` and the Prefect flow, with no training and no labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from changedet.cli import main as cli_main
from changedet.metrics import Confusion
from changedet.models import create_model
from changedet.pipeline.output_table import MASK, PROBABILITY, RUN_JSON
from changedet.testing.synthetic import write_synthetic_optical_sar

SIDE = 160
TRANSFORM = from_origin(500000, 4600000, 10, 10)


@pytest.fixture(scope="module")
def optical_sar(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """t1 optical (3 bands), t2 a SAR-like 1-band image with speckle; one block changes class."""
    optical, sar, label = write_synthetic_optical_sar(tmp_path_factory.mktemp("optsar"), SIDE)
    with rasterio.open(label) as ds:
        return optical, sar, ds.read(1) == 1


def _detect(t1: Path, t2: Path, out: Path, *options: str) -> dict:
    args = ["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--model", "hetero-unsupervised",
            "--tile", "96", "--overlap", "16", "--quiet", *options]
    assert cli_main(args) == 0
    return json.loads((out / RUN_JSON).read_text())


def _f1(mask_path: Path, change: np.ndarray) -> float:
    with rasterio.open(mask_path) as ds:
        mask = ds.read(1)
        assert ds.crs.to_epsg() == 32631 and ds.transform == TRANSFORM
    return Confusion().update(mask == 1, change, mask != 255).metrics()["f1"]


def test_detects_the_planted_change_across_sensors_in_either_order(optical_sar, tmp_path):
    optical, sar, change = optical_sar
    run = _detect(optical, sar, tmp_path / "a")
    assert run["model"]["name"] == "hetero-unsupervised"
    assert _f1(tmp_path / "a" / MASK, change) > 0.6
    _detect(sar, optical, tmp_path / "b")  # SAR first
    assert _f1(tmp_path / "b" / MASK, change) > 0.6


def test_cva_cannot_compare_these_dates(optical_sar, tmp_path, capsys):
    optical, sar, _ = optical_sar
    args = ["detect", "--t1", str(optical), "--t2", str(sar), "--out", str(tmp_path / "c"), "--model", "cva", "--quiet"]
    assert cli_main(args) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_identical_dates_show_no_structure_change() -> None:
    model = create_model("hetero-unsupervised", in_channels=(3, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 48, 48, generator=g)
    flat = x[0].flatten(1).T
    model.fit_scene(flat, flat.clone(), torch.ones(len(flat), dtype=torch.bool))
    out = model.predict(x, x.clone())
    assert out.difference.abs().max() < 1e-5 and (torch.sigmoid(out.logits) < 0.5).all()


def test_flow_writes_the_same_outputs(optical_sar, tmp_path, prefect_api):
    from flows.detect import DetectFlowParams, detect_pair, task_runner

    optical, sar, _ = optical_sar
    _detect(optical, sar, tmp_path / "cli")
    params = DetectFlowParams(t1=str(optical), t2=str(sar), out=str(tmp_path / "flow"), name="optsar",
                              model="hetero-unsupervised", tile=96, overlap=16)
    detect_pair.with_options(task_runner=task_runner(workers=1))(params)
    for name in (MASK, PROBABILITY):
        with rasterio.open(tmp_path / "cli" / name) as a, rasterio.open(tmp_path / "flow" / name) as b:
            assert np.array_equal(a.read(), b.read())
