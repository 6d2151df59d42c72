"""detect --zones: changed hectares, valid fraction and mean probability per zone (any CRS), as
zones.csv, a zones layer of changes.gpkg, run.json and the report; bad zones are refused cleanly."""

from __future__ import annotations

import csv

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import Point, box

from changedet.cli import main
from changedet.pipeline.detect import DetectParams, detect_changes
from tests.reliability import Case, assert_failed_cleanly, snapshot


@pytest.fixture(scope="module")
def zoned(sample_city, tmp_path_factory):
    """The bundled city with three zones given in UTM (the grid is EPSG:4326): the whole scene, its
    western half and a parcel inside that half (overlapping zones)."""
    root = tmp_path_factory.mktemp("zones")
    with rasterio.open(next((sample_city / "imgs_1").glob("*_B02.tif"))) as ds:
        w, s, e, n = ds.bounds
    shapes = [box(w - 0.01, s - 0.01, e + 0.01, n + 0.01), box(w, s, (w + e) / 2, n),
              box(w + 0.3 * (e - w), s + 0.3 * (n - s), w + 0.45 * (e - w), s + 0.45 * (n - s))]  # fmt: skip
    zones = gpd.GeoDataFrame({"name": ["all", "west", "parcel"]}, geometry=shapes, crs="EPSG:4326").to_crs("EPSG:32631")
    zones.to_file(root / "zones.gpkg", driver="GPKG")
    result = detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", root / "out", DetectParams(zones=str(root / "zones.gpkg")))
    return result, zones


def _rows(result) -> dict[str, dict[str, str]]:
    with open(result.path("zones.csv"), newline="") as fh:
        return {row["zone"]: row for row in csv.DictReader(fh)}


def test_zone_statistics_agree_with_the_polygons_and_the_mask(zoned):
    result, zones = zoned
    rows = _rows(result)
    assert float(rows["all"]["changed_ha"]) == pytest.approx(result.summary["changes"]["changed_area_ha"], rel=1e-4)
    assert int(rows["all"]["changed_pixels"]) == result.summary["counts"]["changed_pixels"]
    changes = gpd.read_file(result.path("changes.gpkg"), layer="changes")
    west = zones.to_crs(changes.crs).geometry.iloc[1]
    clipped = changes.intersection(west).to_crs(changes.estimate_utm_crs()).area.sum() / 1e4  # independent: vector overlay
    assert float(rows["west"]["changed_ha"]) == pytest.approx(clipped, rel=0.03)
    assert 0 < int(rows["parcel"]["changed_pixels"]) <= int(rows["west"]["changed_pixels"])  # overlaps counted in full
    assert float(rows["all"]["valid_fraction"]) == pytest.approx(1.0)
    with rasterio.open(result.path("change_mask.tif")) as ds:
        mask = ds.read(1)
    assert float(rows["all"]["changed_fraction"]) == pytest.approx((mask == 1).sum() / (mask != 255).sum(), rel=1e-4)


def test_zones_are_a_layer_in_the_grid_crs_and_in_run_json_and_the_report(zoned):
    result, _ = zoned
    layer = gpd.read_file(result.path("changes.gpkg"), layer="zones")
    with rasterio.open(result.path("change_mask.tif")) as ds:
        assert layer.crs == gpd.GeoSeries([], crs=ds.crs.to_wkt()).crs
    assert list(layer["zone"]) == ["all", "west", "parcel"]
    assert [z["zone"] for z in result.summary["zones"]] == ["all", "west", "parcel"]
    page = result.path("report.html").read_text()
    assert 'id="zones"' in page and ">parcel<" in page


BAD = {
    "missing file": (lambda tmp: str(tmp / "nope.gpkg"), "cannot read zones"),
    "points": (lambda tmp: _write(tmp, [Point(500100, 5399900)], "EPSG:32631"), "hold no polygon"),
    "no CRS": (lambda tmp: _write(tmp, [box(500000, 5399400, 500300, 5400000)], None), "have no CRS"),
    "outside the grid": (lambda tmp: _write(tmp, [box(600000, 5000000, 600100, 5000100)], "EPSG:32631"), "meets the grid"),
}


def _write(tmp, geometries, crs) -> str:
    path = tmp / "bad_zones.gpkg"
    gpd.GeoDataFrame({"name": [f"z{i}" for i in range(len(geometries))]}, geometry=geometries, crs=crs).to_file(path)
    return str(path)


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_zones_are_refused_with_one_error_line(bad, ctx, capsys):
    make, expect = BAD[bad]
    before = snapshot(ctx.out)
    rc = main(["detect", *ctx.args(), "--zones", make(ctx.tmp), "--out", str(ctx.out), "--overwrite", "--quiet"])
    assert_failed_cleanly(rc, capsys.readouterr().err, ctx.out, before, Case([], expect))
    assert np.all([not n.endswith("zones.csv") for n in snapshot(ctx.out)])
