"""Cloud and shadow masks: a cloud planted in a real OSCD date is not change but invalid in every
output, run.json gives each date's cloud fraction, --max-cloud refuses, SCL classes mask, shadows
are cast away from the sun."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio

from changedet import cli
from changedet.pipeline.clouds import project_shadow
from changedet.pipeline.detect import DetectParams, detect_changes
from changedet.testing.clouds import write_clouded_date
from flows.detect import process_inbox  # at collection: Prefect's log handlers bind to pytest's stream
from tests.conftest import write_raster
from tests.reliability import assert_failed_cleanly, assert_one_error_line, snapshot, Case

CENTRE, RADIUS = (200.0, 180.0), 40.0


@pytest.fixture(scope="module")
def clouded(sample_city, tmp_path_factory):
    root = tmp_path_factory.mktemp("clouded")
    disk = write_clouded_date(sample_city / "imgs_2", root / "t2", CENTRE, RADIUS)
    return root / "t2", disk


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.nodata


def test_planted_cloud_is_change_without_a_mask_and_invalid_with_one(sample_city, clouded, tmp_path):
    t2, disk = clouded
    plain = detect_changes(sample_city / "imgs_1", t2, tmp_path / "plain", DetectParams())
    mask, _ = _read(plain.path("change_mask.tif"))
    assert (mask[disk] == 1).mean() > 0.9  # the cloud is taken for change
    masked = detect_changes(sample_city / "imgs_1", t2, tmp_path / "masked", DetectParams(cloud_mask="s2cloudless"))
    for name in ("change_mask.tif", "change_probability.tif", "difference.tif"):
        values, nodata = _read(masked.path(name))
        assert np.all(values[disk] == nodata), name  # invalid in every output, not "no change"
    clouds = json.loads(masked.path("run.json").read_text())
    assert clouds["cloud_fraction"]["t1"] < 0.01 and clouds["cloud_fraction"]["t2"] >= disk.mean()
    assert clouds["clouds"]["t2"]["method"] == "s2cloudless" and "dilated" in clouds["clouds"]["t2"]["shadow"]
    with rasterio.open(masked.path("change_mask.tif")) as ds, rasterio.open(plain.path("change_mask.tif")) as ref:
        assert (ds.crs, ds.transform, ds.shape) == (ref.crs, ref.transform, ref.shape)
    clear = detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", tmp_path / "clear", DetectParams(cloud_mask="auto"))
    assert clear.summary["cloud_fraction"] == {"t1": 0.0, "t2": 0.0}  # bright Paris roofs are not clouds


def test_max_cloud_refuses_with_one_error_line_and_leaves_earlier_outputs(sample_city, clouded, earlier_outputs, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(earlier_outputs, out)
    before = snapshot(out)
    args = ["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(clouded[0]), "--out", str(out), "--overwrite",
            "--cloud-mask", "s2cloudless", "--max-cloud", "0.02"]  # fmt: skip
    rc = cli.main(args)
    assert_failed_cleanly(rc, capsys.readouterr().err, out, before, Case(args, "--max-cloud"))
    rc = cli.main(["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(tmp_path / "x"),
                   "--max-cloud", "0.5"])  # fmt: skip
    assert_one_error_line(rc, capsys.readouterr().err, 2, "--cloud-mask")


def test_s2cloudless_needs_its_bands(tmp_path, capsys):
    data = np.random.default_rng(0).integers(100, 4000, (3, 64, 64)).astype(np.uint16)
    t1, t2 = write_raster(tmp_path / "a.tif", data), write_raster(tmp_path / "b.tif", data[::-1].copy())
    rc = cli.main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(tmp_path / "o"), "--cloud-mask", "s2cloudless"])
    assert_one_error_line(rc, capsys.readouterr().err, 2, "B10")
    result = detect_changes(t1, t2, tmp_path / "auto", DetectParams(cloud_mask="auto"))
    assert any("not masked" in w for w in result.summary["warnings"])
    assert result.summary["cloud_fraction"] == {"t1": None, "t2": None}


def test_scl_band_masks_its_cloud_and_shadow_classes(sample_city, tmp_path):
    t2 = tmp_path / "t2"
    shutil.copytree(sample_city / "imgs_2", t2)
    b05 = next(t2.glob("*_B05.tif"))  # a 20 m band: the SCL lattice
    with rasterio.open(b05) as ds:
        profile = {**ds.profile, "dtype": "uint8", "nodata": 0}
        scl = np.full((ds.height, ds.width), 4, np.uint8)  # vegetation
    scl[10:30, 10:40], scl[40:50, 10:40], scl[60:70, 60:90] = 9, 3, 6  # cloud, its shadow, water (kept)
    with rasterio.open(t2 / "T31UDQ_SCL.tif", "w", **profile) as dst:
        dst.write(scl, 1)
    result = detect_changes(sample_city / "imgs_1", t2, tmp_path / "o", DetectParams(cloud_mask="auto"))
    mask, nodata = _read(result.path("change_mask.tif"))
    assert result.summary["clouds"]["t2"]["method"] == "scl"
    assert np.all(mask[22:58, 22:78] == nodata) and np.all(mask[82:98, 22:78] == nodata)  # 20 m rows 10-50, cols 10-40 = 10 m rows 20-100, cols 20-80
    assert np.all(mask[122:138, 122:178] != nodata)  # water is not masked
    expected = (np.isin(scl, (3, 9))).mean()
    assert result.summary["cloud_fraction"]["t2"] == pytest.approx(expected, abs=0.01)


def test_shadows_are_cast_away_from_the_sun():
    cloud = np.zeros((120, 120), bool)
    cloud[50:60, 50:60] = True
    dark = np.ones_like(cloud)
    shadow = project_shadow(cloud, dark, sun_azimuth=180.0, sun_elevation=45.0, pixel_m=60.0)  # sun in the south
    rows, cols = np.nonzero(shadow)
    assert rows.max() < 50 and rows.min() >= 50 - 3000 / 60 - 1 and cols.min() >= 50 and cols.max() < 60  # north of it
    east = project_shadow(cloud, dark, sun_azimuth=270.0, sun_elevation=30.0, pixel_m=60.0)  # sun in the west
    assert np.nonzero(east)[1].min() >= 60
    assert not project_shadow(cloud, np.zeros_like(dark), 180.0, 45.0, 60.0).any()  # only where it is dark


def test_inbox_flow_skips_a_pair_too_cloudy_and_says_so(sample_city, clouded, prefect_api, tmp_path, caplog):
    for name, t2 in (("clear", sample_city / "imgs_2"), ("cloudy", clouded[0])):
        (tmp_path / "inbox" / name).mkdir(parents=True)
        shutil.copytree(sample_city / "imgs_1", tmp_path / "inbox" / name / "t1")
        shutil.copytree(t2, tmp_path / "inbox" / name / "t2")
    processed = process_inbox(str(tmp_path / "inbox"), str(tmp_path / "outputs"), cloud_mask="s2cloudless", max_cloud=0.05)
    assert processed == ["clear"]
    assert (tmp_path / "outputs" / "clear" / "change_mask.tif").is_file()
    assert not list((tmp_path / "outputs").glob("cloudy/*.tif"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped cloudy: t2 is" in logged and "above --max-cloud" in logged and "skipped as too cloudy: cloudy" in logged
