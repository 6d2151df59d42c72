"""End-to-end detect on the bundled OSCD city: georeference, COG layout, GeoPackage, run.json, evaluate."""

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from changedet.cli import main
from changedet.pipeline.detect import DIFFERENCE, MASK, OUTPUT_NAMES, POLYGONS, PROBABILITY, DetectParams, detect_changes
from changedet.pipeline.grid import Grid
from changedet.testing.synthetic import write_synthetic_pair


@pytest.fixture(scope="module")
def sample_run(sample_city, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    rc = main(["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"),
               "--out", str(out), "--tile", "128", "--overlap", "24", "--quiet"])
    assert rc == 0
    return out


def test_outputs_carry_the_t1_10m_grid_exactly(sample_run, sample_city):
    with rasterio.open(next((sample_city / "imgs_1").glob("*_B02.tif"))) as ref:
        expected = Grid.from_dataset(ref)
    nodata = {PROBABILITY: -9999.0, DIFFERENCE: -9999.0, MASK: 255}
    dtypes = {PROBABILITY: "float32", DIFFERENCE: "float32", MASK: "uint8"}
    for name in (PROBABILITY, MASK, DIFFERENCE):
        with rasterio.open(sample_run / name) as ds:
            assert Grid.from_dataset(ds) == expected, name
            assert ds.crs == expected.crs and ds.transform == expected.transform
            assert ds.nodata == nodata[name] and ds.dtypes[0] == dtypes[name]


def test_outputs_are_valid_cogs_with_overviews(sample_run):
    for name in (PROBABILITY, MASK, DIFFERENCE):
        ok, errors, _ = cog_validate(str(sample_run / name))
        assert ok, (name, errors)
        with rasterio.open(sample_run / name) as ds:
            assert ds.profile["tiled"] and ds.compression is not None
            assert ds.overviews(1) or max(ds.shape) <= 512


def test_probability_mask_and_difference_are_consistent(sample_run):
    meta = json.loads((sample_run / "run.json").read_text())
    with rasterio.open(sample_run / PROBABILITY) as p, rasterio.open(sample_run / MASK) as m, rasterio.open(sample_run / DIFFERENCE) as d:
        prob, mask, diff = p.read(1), m.read(1), d.read(1)
    assert ((prob >= 0) & (prob <= 1)).all() and (diff >= 0).all()
    np.testing.assert_array_equal(mask == 1, prob >= meta["threshold"])
    assert meta["counts"]["changed_pixels"] == int((mask == 1).sum())


def test_polygons_readable_with_area_and_probability(sample_run):
    frame = gpd.read_file(sample_run / POLYGONS)
    meta = json.loads((sample_run / "run.json").read_text())
    assert frame.crs.to_epsg() == 4326
    assert len(frame) == meta["changes"]["regions"] > 0
    assert frame["pixels"].sum() == meta["counts"]["changed_pixels"]
    assert (frame["area_m2"] > 0).all() and frame.geometry.is_valid.all()
    assert frame["mean_prob"].between(meta["threshold"], 1.0).all()
    # one 10 m Sentinel-2 pixel at 48.9°N is ~8.5 m x 13 m in EPSG:4326 degrees: about 110 m²
    per_pixel = frame["area_m2"].sum() / frame["pixels"].sum()
    assert 90 < per_pixel < 130


def test_run_json_records_inputs_grid_model_and_timings(sample_run, sample_city):
    meta = json.loads((sample_run / "run.json").read_text())
    # --model auto picks the bundled Sentinel-2 model for the 13-band OSCD city
    assert meta["model"]["name"] == "ensemble" and meta["model"]["checkpoint"].endswith("oscd-s2-fc-siam-diff.safetensors")
    assert meta["parameters"]["tile"] == 128 and meta["parameters"]["threshold_rule"] == meta["model"]["test_time"]["threshold_rule"]
    assert meta["grid"]["epsg"] == 4326 and meta["t1"]["bands"][0] == "B01"
    assert meta["timings"]["model_s"] > 0 and meta["versions"]["torch"]
    assert sorted(p.name for p in sample_run.iterdir()) == sorted(OUTPUT_NAMES)


def test_evaluate_cli_against_the_oscd_label(sample_run, sample_city, capsys):
    rc = main(["evaluate", "--pred", str(sample_run / MASK), "--label", str(sample_city / "cm" / "bercy-cm.tif"), "--json"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["change_value"] == 2 and metrics["tp"] + metrics["fn"] == 1046  # bercy: 1046 changed px
    assert 0 < metrics["f1"] < 1 and -1 <= metrics["kappa"] <= 1


def test_synthetic_changes_found_and_reprojected_output(tmp_path):
    pair = write_synthetic_pair(tmp_path / "syn", 300, 260, bands=4, n_changes=8)
    params = DetectParams(tile=96, overlap=16, crs="EPSG:3857", resolution=12.0)
    result = detect_changes(pair.t1, pair.t2, tmp_path / "out", params)
    with rasterio.open(result.path(MASK)) as m:
        assert m.crs.to_epsg() == 3857 and m.res == (12.0, 12.0)
    from changedet.evaluate import evaluate_mask

    metrics = evaluate_mask(result.path(MASK), pair.label)  # georeferenced label, warped onto the output grid
    assert metrics["f1"] > 0.8


@pytest.mark.shared_data
def test_envi_landsat_pair_keeps_its_utm_grid(shared_data, tmp_path):
    root = shared_data / "landsat" / "taizhou"
    result = detect_changes(root / "2000TM", root / "2003TM", tmp_path / "out", DetectParams(tile=128, overlap=16))
    with rasterio.open(root / "2000TM") as src, rasterio.open(result.path(PROBABILITY)) as out:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
    # sparse Taizhou labels: CVA must separate the sampled changed / unchanged pixels well
    with rasterio.open(root / "change.bmp") as c, rasterio.open(root / "unchanged.bmp") as u, rasterio.open(result.path(MASK)) as m:
        changed, unchanged, mask = c.read(1) == 255, u.read(1) == 255, m.read(1)
    assert (mask[changed] == 1).mean() > 0.7 and (mask[unchanged] == 0).mean() > 0.9


@pytest.mark.shared_data
def test_png_pair_without_georeference_gives_pixel_grid_outputs(shared_data, tmp_path):
    root = shared_data / "levir_cd_samples"
    name = "test_2_0000_0000.png"
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        result = detect_changes(root / "A" / name, root / "B" / name, tmp_path / "out", DetectParams(tile=128, overlap=16))
    with rasterio.open(result.path(MASK)) as out:
        assert out.crs is None and out.shape == (256, 256)
    assert cog_validate(str(result.path(MASK)))[0]
    from changedet.evaluate import evaluate_mask

    assert evaluate_mask(result.path(MASK), root / "label" / name)["change_value"] == 255


def test_fingerprint_follows_content_not_paths(tmp_path):
    from changedet.pipeline.detect import plan_run

    pair = write_synthetic_pair(tmp_path / "a", 64, 64, bands=2, n_changes=2)
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in (pair.t1, pair.t2):
        (moved / f"renamed_{p.name}").write_bytes(p.read_bytes())
    params = DetectParams(tile=32, overlap=8)
    first = plan_run(pair.t1, pair.t2, params).fingerprint
    assert plan_run(moved / "renamed_t1.tif", moved / "renamed_t2.tif", params).fingerprint == first
    assert plan_run(pair.t2, pair.t1, params).fingerprint != first  # dates swapped
    assert plan_run(pair.t1, pair.t2, DetectParams(tile=32, overlap=4)).fingerprint != first
