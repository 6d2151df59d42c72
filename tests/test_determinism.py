"""Determinism: the same inputs and model give byte-identical GeoTIFFs (and styles) across runs, across
processes, and on 2 Dask workers of the detect flow.

GDAL writes no timestamp into the COGs (no TIFFTAG_DATETIME), so equal pixels mean equal bytes. An
untrained registry model (here FC-Siam-diff) is the hard case: its weights come from a fixed seed, so
every process — every Dask worker — builds the same network. The GeoPackage is compared by content:
SQLite/GPKG record a modification time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio

from changedet.cli import main
from changedet.pipeline.detect import (
    DIFFERENCE,
    MASK,
    MASK_STYLE,
    POLYGONS,
    PROBABILITY,
    PROBABILITY_STYLE,
)
from changedet.testing.synthetic import write_synthetic_pair

BYTE_IDENTICAL = (PROBABILITY, MASK, DIFFERENCE, PROBABILITY_STYLE, MASK_STYLE)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_synthetic_pair(tmp_path_factory.mktemp("pair"), 200, 180, bands=3, n_changes=5)


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in BYTE_IDENTICAL:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    pa, pb = gpd.read_file(a / POLYGONS), gpd.read_file(b / POLYGONS)
    assert pa.equals(pb)


def _args(pair, out: Path, model: str) -> list[str]:
    return ["detect", "--t1", str(pair.t1), "--t2", str(pair.t2), "--out", str(out), "--model", model,
            "--tile", "64", "--overlap", "16", "--batch-size", "4", "--quiet"]


def test_cogs_carry_no_timestamp(runs):
    for name in (PROBABILITY, MASK, DIFFERENCE):
        with rasterio.open(runs["cva"] / name) as ds:
            assert "TIFFTAG_DATETIME" not in ds.tags(), name


@pytest.fixture(scope="module")
def runs(pair, tmp_path_factory) -> dict[str, Path]:
    """One in-process CLI run per model: what every other run must reproduce byte for byte."""
    root = tmp_path_factory.mktemp("runs")
    for model in ("cva", "fc-siam-diff"):
        assert main(_args(pair, root / model, model)) == 0
    return {"cva": root / "cva", "fc-siam-diff": root / "fc-siam-diff"}


@pytest.mark.parametrize("model", ["cva", "fc-siam-diff"])
def test_a_second_process_gives_byte_identical_outputs(pair, runs, tmp_path, model):
    subprocess.run([sys.executable, "-m", "changedet.cli", *_args(pair, tmp_path / "b", model)], cwd=REPO, check=True, timeout=300)
    assert_same_outputs(runs[model], tmp_path / "b")


def test_two_dask_workers_give_byte_identical_outputs(prefect_api, pair, runs, tmp_path):
    """The flow on 2 worker processes (1 torch thread each, what ``--workers 2`` sets) reproduces the
    single-process run; test_flows.py checks the 1-worker flow against the single-process run."""
    from flows.detect import DetectFlowParams, detect_pair, task_runner

    params = DetectFlowParams(t1=str(pair.t1), t2=str(pair.t2), out=str(tmp_path / "w2"), model="fc-siam-diff",
                              tile=64, overlap=16, batch_size=4, threads=1)
    detect_pair.with_options(task_runner=task_runner(workers=2))(params)
    assert_same_outputs(runs["fc-siam-diff"], tmp_path / "w2")
