"""GIS consumers: the outputs as GDAL itself sees them (COG layout, statistics, overviews), the QGIS
styles written next to the rasters, and the polygons in the grid's EPSG with areas.

GDAL is used three ways: the GDAL that rasterio links (always), and, when installed on the machine,
the ``gdalinfo``/``ogrinfo`` command-line tools and GDAL's own COG validator script
(``osgeo_utils.samples.validate_cloud_optimized_geotiff``) — those tests skip with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from changedet.cli import main
from changedet.pipeline.detect import (
    DIFFERENCE,
    MASK,
    MASK_STYLE,
    POLYGONS,
    PROBABILITY,
    PROBABILITY_STYLE,
    RUN_JSON,
)
from changedet.testing.synthetic import write_synthetic_pair

RASTERS = (PROBABILITY, MASK, DIFFERENCE)
NO_PAM = {**os.environ, "GDAL_PAM_ENABLED": "NO"}  # gdalinfo -stats must not leave .aux.xml files behind


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One detect run on a 700 x 640 px UTM pair (larger than one 512 px COG block: overviews exist)."""
    root = tmp_path_factory.mktemp("gis")
    pair = write_synthetic_pair(root / "pair", 700, 640, bands=3, n_changes=12)
    out = root / "out"
    rc = main(["detect", "--t1", str(pair.t1), "--t2", str(pair.t2), "--out", str(out),
               "--tile", "128", "--overlap", "16", "--quiet"])
    assert rc == 0
    return out


def _valid_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        data = ds.read(1, masked=True)
    return data.compressed().astype(np.float64)


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def test_cog_layout_and_overviews_by_linked_gdal(run):
    for name in RASTERS:
        ok, errors, warnings = cog_validate(str(run / name), strict=True)
        assert ok and not errors and not warnings, (name, errors, warnings)
        with rasterio.open(run / name) as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG", name  # GDAL's own verdict on the layout
            assert ds.block_shapes == [(512, 512)] and ds.compression is not None
            assert ds.overviews(1), f"{name} has no overviews"
            assert ds.crs.to_epsg() == 32631


def test_statistics_computed_by_gdal_match_the_pixels(run):
    before = _files(run)
    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        for name in RASTERS:
            with rasterio.open(run / name) as ds:
                (stats,) = ds.stats(indexes=[1], approx=False)  # GDALComputeRasterStatistics, nodata excluded
            values = _valid_pixels(run / name)
            assert stats.min == pytest.approx(values.min()) and stats.max == pytest.approx(values.max()), name
            assert stats.mean == pytest.approx(values.mean(), rel=1e-6), name
    with rasterio.open(run / MASK) as ds:
        assert set(np.unique(ds.read(1))) <= {0, 1, 255}
    assert _files(run) == before


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo (GDAL command-line tools) not installed")
def test_gdalinfo_reports_cog_overviews_crs_and_statistics(run):
    before = _files(run)
    for name in RASTERS:
        done = subprocess.run(["gdalinfo", "-json", "-stats", str(run / name)], env=NO_PAM,
                              capture_output=True, text=True, timeout=120, check=True)
        info = json.loads(done.stdout)
        assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG", name
        assert 'ID["EPSG",32631]' in info["coordinateSystem"]["wkt"]
        band = info["bands"][0]
        assert band["block"] == [512, 512] and band["overviews"], name
        values = _valid_pixels(run / name)
        for key, expected in (("minimum", values.min()), ("maximum", values.max()), ("mean", values.mean())):
            assert band[key] == pytest.approx(expected, rel=1e-6, abs=1e-3), (name, key)  # gdalinfo prints 3 decimals
    assert _files(run) == before


def _gdal_python() -> str | None:
    """A Python with GDAL's own bindings and sample scripts (the system one), if any."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and subprocess.run([candidate, "-c", "import osgeo_utils.samples.validate_cloud_optimized_geotiff"],
                                        capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def test_gdal_cog_validator_script_accepts_every_raster(run):
    python = _gdal_python()
    if python is None:
        pytest.skip("GDAL's Python bindings (osgeo_utils) are not installed")
    for name in RASTERS:
        done = subprocess.run([python, "-m", "osgeo_utils.samples.validate_cloud_optimized_geotiff", "--full-check=yes",
                               str(run / name)], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and "is a valid cloud optimized GeoTIFF" in done.stdout, done.stdout + done.stderr


def test_polygons_in_the_grid_epsg_with_areas(run):
    with rasterio.open(run / MASK) as ds:
        epsg, pixel_area = ds.crs.to_epsg(), abs(ds.transform.a * ds.transform.e)
        changed = int((ds.read(1) == 1).sum())
    info = pyogrio.read_info(run / POLYGONS, layer="changes")
    assert info["crs"] == f"EPSG:{epsg}" and info["geometry_type"] == "Polygon"
    assert {"id", "pixels", "area_m2", "mean_prob"} <= set(info["fields"])
    frame = gpd.read_file(run / POLYGONS)
    assert len(frame) > 0 and frame.crs.to_epsg() == epsg
    np.testing.assert_allclose(frame["area_m2"], frame.geometry.area)  # metres in a UTM grid
    np.testing.assert_allclose(frame["area_m2"], frame["pixels"] * pixel_area)
    assert frame["pixels"].sum() == changed
    summary = json.loads((run / RUN_JSON).read_text())
    assert summary["changes"]["changed_area_m2"] == pytest.approx(frame["area_m2"].sum())


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="ogrinfo (GDAL command-line tools) not installed")
def test_ogrinfo_reads_the_geopackage(run):
    done = subprocess.run(["ogrinfo", "-so", "-al", str(run / POLYGONS)], env=NO_PAM,
                          capture_output=True, text=True, timeout=120, check=True)
    assert "Geometry: Polygon" in done.stdout and "area_m2: Real" in done.stdout
    assert 'ID["EPSG",32631]' in done.stdout


def _qml(path: Path) -> ET.Element:
    text = path.read_text()
    assert text.startswith("<!DOCTYPE qgis")
    root = ET.fromstring(text.split("\n", 1)[1])
    assert root.tag == "qgis"
    return root


def test_qgis_styles_sit_next_to_their_rasters(run):
    for raster, style in ((PROBABILITY, PROBABILITY_STYLE), (MASK, MASK_STYLE)):
        assert Path(style).stem == Path(raster).stem and (run / style).is_file()  # QGIS loads <name>.qml for <name>.tif


def test_probability_style_is_a_pseudocolour_ramp_marking_the_threshold(run):
    renderer = _qml(run / PROBABILITY_STYLE).find("pipe/rasterrenderer")
    assert renderer.get("type") == "singlebandpseudocolor" and renderer.get("band") == "1"
    items = renderer.findall("rastershader/colorrampshader/item")
    values = [float(i.get("value")) for i in items]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 1.0
    threshold = json.loads((run / RUN_JSON).read_text())["threshold"]
    assert any(abs(v - threshold) < 1e-6 and "threshold" in i.get("label") for v, i in zip(values, items))
    with rasterio.open(run / PROBABILITY) as ds:
        transparent = renderer.find("rasterTransparency/singleValuePixelList/pixelListEntry")
        assert float(transparent.get("min")) == ds.nodata and transparent.get("percentTransparent") == "100"


def test_mask_style_is_paletted_with_change_and_transparent_nodata(run):
    renderer = _qml(run / MASK_STYLE).find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = {e.get("value"): e for e in renderer.findall("colorPalette/paletteEntry")}
    assert set(entries) == {"0", "1"}
    assert entries["1"].get("label") == "change" and entries["1"].get("alpha") == "255"
    assert entries["0"].get("alpha") == "0"
    with rasterio.open(run / MASK) as ds:
        transparent = renderer.find("rasterTransparency/singleValuePixelList/pixelListEntry")
        assert float(transparent.get("min")) == ds.nodata == 255
