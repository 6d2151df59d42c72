"""``changedet monitor``: a generated static STAC catalog over the bundled OSCD city (Paris, Bercy) with
changes planted at known dates, a cloud over two dates and one date too cloudy to use."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import box

from changedet.cli import main
from changedet.monitoring.state import PixelState
from changedet.pipeline.grid import Grid
from changedet.testing.timeseries import Planted, SyntheticDate, write_time_series
from tests.reliability import assert_one_error_line, snapshot

BBOX = "2.362,48.826,2.398,48.862"
A = Planted((60, 60, 40, 40), (250, 200))  # appears 2017-03-06, confirmed 2017-04-05
B = Planted((200, 250, 36, 36), (40, 240))  # appears 2017-05-05, confirmed 2017-06-04
CLOUD = (300.0, 100.0, 40.0)  # over 2017-04-05 and 2017-05-05: two consecutive dates, never a confirmed change
DATES = [
    SyntheticDate("2017-01-05"),
    SyntheticDate("2017-02-04", gain=1.03),
    SyntheticDate("2017-03-06", (A,), gain=0.98),
    SyntheticDate("2017-03-20", (A,), cloud=(200.0, 180.0, 260.0)),  # mostly cloud: skipped by --max-cloud
    SyntheticDate("2017-04-05", (A,), cloud=CLOUD),
    SyntheticDate("2017-05-05", (A, B), cloud=CLOUD, gain=1.02),
    SyntheticDate("2017-06-04", (A, B)),
]
OUTPUTS = ("first_change_date.tif", "last_change_probability.tif", "last_change_probability.qml", "confirmed_changes.gpkg",
           "timeline.csv", "timeline.png", "zones_timeline.csv", "alerts.json", "state.json")


@pytest.fixture(scope="module")
def catalog(sample_city, tmp_path_factory) -> Path:
    return write_time_series(sample_city / "imgs_1", tmp_path_factory.mktemp("catalog"), DATES)


@pytest.fixture(scope="module")
def zones(catalog) -> Path:
    """Zone ``A`` around the first planted change, ``elsewhere`` far from both, in EPSG:3857 (reprojected)."""
    with rasterio.open(next((catalog.parent / "2017-01-05" / "bands").glob("*B04.tif"))) as ds:
        t = ds.transform
    corner = lambda r, c: (t.c + t.a * c, t.f + t.e * r)  # noqa: E731
    (w, n), (e, s) = corner(55, 55), corner(105, 105)
    (w2, n2), (e2, s2) = corner(120, 280), corner(170, 330)
    frame = gpd.GeoDataFrame({"name": ["A", "elsewhere"]}, geometry=[box(w, s, e, n), box(w2, s2, e2, n2)], crs="EPSG:4326")
    path = catalog.parent / "zones.gpkg"
    frame.to_crs("EPSG:3857").to_file(path)
    return path


def _args(catalog: Path, zones: Path, out: Path, *extra: str) -> list[str]:
    return ["monitor", "--stac", str(catalog), "--bbox", BBOX, "--out", str(out), "--max-cloud", "0.5", "--zones", str(zones),
            "--alert-ha", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def full_run(catalog, zones, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "area"
    assert main(_args(catalog, zones, out)) == 0
    return out


def _planted(mask_of: Planted, out: Path, catalog: Path) -> np.ndarray:
    """The planted rectangle on the monitoring grid."""
    with rasterio.open(next((catalog.parent / "2017-01-05" / "bands").glob("*B04.tif"))) as ds:
        source = Grid.from_dataset(ds)
        shape = (ds.height, ds.width)
    with rasterio.open(out / "first_change_date.tif") as ds:
        window = source.window_of(Grid.from_dataset(ds))
    full = mask_of.mask(shape)
    return full[int(window.row_off) : int(window.row_off + window.height), int(window.col_off) : int(window.col_off + window.width)]


def test_first_change_date_is_the_planted_date(full_run, catalog):
    with rasterio.open(full_run / "first_change_date.tif") as ds:
        first = ds.read(1)
        assert ds.nodata == 4294967295 and ds.dtypes[0] == "uint32"
    in_a, in_b = _planted(A, full_run, catalog), _planted(B, full_run, catalog)
    assert (first[in_a] == 20170306).sum() >= 0.1 * in_a.sum()  # found: the bundled model's recall is modest
    assert (first[in_b] == 20170505).sum() >= 0.05 * in_b.sum()
    assert set(np.unique(first[in_a])) <= {0, 20170306}, "a pixel of A dated otherwise"
    assert set(np.unique(first[in_b])) <= {0, 20170505}, "a pixel of B dated otherwise"
    confirmed = (first > 0) & (first != 4294967295)
    assert (confirmed & ~(in_a | in_b)).sum() <= 0.01 * confirmed.size, "false confirmations outside the planted changes"


def test_cloud_covered_pixels_never_confirm(full_run, catalog):
    with rasterio.open(full_run / "first_change_date.tif") as ds:
        first = ds.read(1)
    rows, cols = np.mgrid[0:395, 0:360]
    disk = Planted((0, 0, 0, 0), (0, 0)).mask((395, 360)) | (np.hypot(rows + 0.5 - CLOUD[0], cols + 0.5 - CLOUD[1]) < CLOUD[2] + 6)
    on_grid = _planted(Planted((0, 0, 395, 360), (0, 0)), full_run, catalog)  # the grid's window of the source
    window = np.argwhere(on_grid)
    (r0, c0), (r1, c1) = window.min(0), window.max(0) + 1
    under = disk[r0:r1, c0:c1][: first.shape[0], : first.shape[1]]
    assert under.sum() > 3000
    assert not ((first[under] > 0) & (first[under] != 4294967295)).any()
    rows_ = {r["date"]: r for r in json.loads((full_run / "state.json").read_text())["timeline"]}
    assert rows_["2017-04-05"]["cloud_fraction"] > 0.05 and rows_["2017-05-05"]["cloud_fraction"] > 0.05
    assert rows_["2017-03-20"]["status"] == "skipped" and "--max-cloud" in rows_["2017-03-20"]["reason"]
    assert rows_["2017-01-05"]["status"] == "baseline"


def test_outputs_keep_the_grid_and_tables_agree(full_run, catalog):
    with rasterio.open(next((catalog.parent / "2017-01-05" / "bands").glob("*B04.tif"))) as src:
        source = Grid.from_dataset(src)
    for name in ("first_change_date.tif", "last_change_probability.tif"):
        with rasterio.open(full_run / name) as ds:
            grid = Grid.from_dataset(ds)
            assert ds.crs == source.crs and grid.same_lattice(source)
            source.window_of(grid)  # an integer offset on the input's lattice
            assert ds.profile.get("tiled") and ds.overviews(1) is not None
    with rasterio.open(full_run / "last_change_probability.tif") as ds:
        assert ds.nodata == -9999.0
    polygons = gpd.read_file(full_run / "confirmed_changes.gpkg", layer="confirmed_changes")
    assert set(polygons["first_date"]) == {"2017-03-06", "2017-05-05"}
    assert polygons.crs == source.crs and (polygons["mean_probability"] > 0).all()
    timeline = {r["date"]: r for r in json.loads((full_run / "state.json").read_text())["timeline"]}
    assert abs(polygons["area_ha"].sum() - timeline["2017-06-04"]["confirmed_ha"]) < 0.01 * timeline["2017-06-04"]["confirmed_ha"]
    zones = {r["zone"]: r for r in gpd.read_file(full_run / "confirmed_changes.gpkg", layer="zones").to_dict("records")}
    assert zones["A"]["confirmed_ha"] > 1 and zones["elsewhere"]["confirmed_ha"] == 0
    alerts = json.loads((full_run / "alerts.json").read_text())
    assert [(a["zone"], a["date"]) for a in alerts] == [("A", "2017-04-05")]
    assert (full_run / "zones_timeline.csv").read_text().count("\n") == 1 + 2 * 5  # 5 compared dates x 2 zones
    dated = gpd.read_file(full_run / "confirmed_changes.gpkg", layer="zones_timeline")
    with (full_run / "zones_timeline.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["date"], r["zone"]) for r in csv_rows] == list(zip(dated["date"], dated["zone"]))
    assert np.allclose([float(r["confirmed_ha"]) for r in csv_rows], dated["confirmed_ha"])
    assert dated.crs == source.crs
    for label, row in zones.items():
        assert dated[dated["zone"] == label].geometry.iloc[-1].equals(row["geometry"])


def test_incremental_rerun_equals_one_run_byte_for_byte(full_run, catalog, zones, tmp_path):
    out = tmp_path / "area"
    assert main(_args(catalog, zones, out, "--end", "2017-03-06")) == 0
    first = json.loads((out / "state.json").read_text())["timeline"]
    assert [r["date"] for r in first] == ["2017-01-05", "2017-02-04", "2017-03-06"]
    assert main(_args(catalog, zones, out)) == 0
    assert snapshot_of(out) == snapshot_of(full_run)
    assert main(_args(catalog, zones, out)) == 0  # nothing new: the same bytes again
    assert snapshot_of(out) == snapshot_of(full_run)


def snapshot_of(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_kill_mid_run_then_rerun_finishes_identically(full_run, catalog, zones, tmp_path):
    out = tmp_path / "area"
    command = [sys.executable, "-m", "changedet.cli", *_args(catalog, zones, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".monitor" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or "{}").get("timeline", [])) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "state.json").exists()  # nothing partial: outputs only at the end of a step
    assert main(_args(catalog, zones, out)) == 0
    assert snapshot_of(out) == snapshot_of(full_run)


def test_refusals_leave_earlier_outputs_byte_identical(full_run, catalog, zones, tmp_path, capsys):
    before = snapshot(full_run)
    cases = [
        (_args(catalog, zones, full_run, "--persistence", "3"), "options differ"),
        (_args(tmp_path / "missing.json", zones, full_run), "does not exist"),
        (["monitor", "--stac", str(catalog), "--out", str(full_run)], "--bbox is required"),
        (["monitor", "--stac", str(catalog), "--bbox", BBOX, "--out", str(full_run), "--alert-ha", "2"], "--alert-ha needs --zones"),
        (_args(catalog, zones, full_run, "--baseline", "mean:3"), "--baseline"),
    ]
    for args, reason in cases:
        status = main(args)
        assert_one_error_line(status, capsys.readouterr().err, 2, reason)
        assert snapshot(full_run) == before, args
    empty = tmp_path / "far"
    status = main(["monitor", "--stac", str(catalog), "--bbox", "10,10,10.01,10.01", "--out", str(empty), "--quiet"])
    assert_one_error_line(status, capsys.readouterr().err, 2, "no usable acquisition")


def _state(run: list[tuple[np.ndarray, np.ndarray, np.ndarray]], persistence: int = 2, k: int = 1) -> tuple[PixelState, list]:
    """A 1-band 1x3 grid through dates of (values, valid, changed); probability 0.9 where changed."""
    state = PixelState.empty(k, 1, (1, 3))
    values, valid, _ = run[0]
    state.start(values, valid)
    out = []
    for stamp, (values, valid, changed) in enumerate(run[1:], start=2):
        out.append(state.update(values, valid, np.where(changed, 0.9, 0.1).astype(np.float32), changed, stamp, persistence))
    return state, out


def test_persistence_counts_consecutive_clear_acquisitions_only():
    v = lambda *x: np.array(x, np.float32).reshape(1, 1, 3)  # noqa: E731
    ok = lambda *x: np.array(x, bool).reshape(1, 3)  # noqa: E731
    dates = [
        (v(1, 1, 1), ok(1, 1, 1), ok(0, 0, 0)),
        (v(5, 5, 5), ok(1, 1, 1), ok(1, 1, 1)),  # 2: a run starts everywhere
        (v(5, 5, 1), ok(1, 0, 1), ok(1, 0, 0)),  # 3: pixel 0 confirmed (run from 2); pixel 1 cloudy: neither counts nor breaks
        (v(5, 5, 1), ok(1, 1, 1), ok(0, 1, 0)),  # 4: pixel 1 confirmed with start 2; pixel 2's run broke at 3
    ]
    state, steps = _state(dates)
    assert state.first_change.ravel().tolist() == [2, 2, 0]
    assert steps[1]["confirmed"].ravel().tolist() == [True, False, False]
    assert steps[2]["confirmed"].ravel().tolist() == [False, True, False]
    assert np.allclose(state.confirmed_probability.ravel()[:2], 0.9)
    assert state.baseline()[0].ravel().tolist() == [5, 5, 1]  # after confirmation the new state is the baseline


def test_cloudy_pixels_never_confirm_and_median_baseline():
    v = lambda *x: np.array(x, np.float32).reshape(1, 1, 3)  # noqa: E731
    ok = lambda *x: np.array(x, bool).reshape(1, 3)  # noqa: E731
    dates = [(v(1, 1, 1), ok(1, 1, 1), ok(0, 0, 0))] + [(v(9, 9, 9), ok(0, 1, 1), ok(1, 1, 0))] * 4
    state, _ = _state(dates, persistence=3, k=1)
    assert state.first_change.ravel().tolist() == [0, 2, 0]
    assert not state.compared.ravel()[0]
    median = PixelState.empty(3, 1, (1, 3))
    for x in (1, 2, 10):
        median.start(v(x, x, x), ok(1, 1, 1)) if x == 1 else median.update(
            v(x, x, x), ok(1, 1, 1), np.full((1, 3), 0.1, np.float32), ok(0, 0, 0), 2, 2)
    assert median.baseline()[0].ravel().tolist() == [2, 2, 2]
