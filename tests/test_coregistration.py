"""Co-registration: the t2 -> t1 offset measured on a real scene, its sign convention, the correction
in the warp, and a refusal instead of a wrong shift where the pair has nothing to correlate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from changedet import cli
from changedet.evaluate import evaluate_mask
from changedet.io.scene import open_scene
from changedet.pipeline.align import align_pair
from changedet.pipeline.coregistration import measure_offset
from changedet.pipeline.detect import DetectParams, detect_changes
from changedet.testing.misregistration import write_shifted_date
from changedet.testing.synthetic import write_synthetic_optical_sar
from tests.conftest import write_raster
from tests.reliability import assert_one_error_line

PLANTED = (1.5, -2.25)


def _offset(t1, t2, **kwargs):
    pair = align_pair(open_scene(t1), open_scene(t2), **kwargs)
    return measure_offset(pair)


@pytest.fixture(scope="module")
def shifted(sample_city, tmp_path_factory):
    """The bundled city's t2 (and t1) with :data:`PLANTED` written into their geotransforms."""
    root = tmp_path_factory.mktemp("shifted")
    return {
        "t2": write_shifted_date(sample_city / "imgs_2", root / "t2", PLANTED),
        "t1": write_shifted_date(sample_city / "imgs_1", root / "t1", PLANTED),
    }


def test_planted_shift_of_a_real_scene_is_recovered_within_a_tenth_of_a_pixel(sample_city, shifted):
    same_date = _offset(sample_city / "imgs_1", shifted["t1"])
    assert same_date.confidence == "high" and same_date.agreeing == same_date.windows == 9
    assert np.allclose(same_date.shift_px, PLANTED, atol=0.1), same_date
    native = _offset(sample_city / "imgs_1", sample_city / "imgs_2")  # OSCD's own dates differ by ~0.3 px
    planted = _offset(sample_city / "imgs_1", shifted["t2"])
    assert native.confidence == planted.confidence == "high"
    recovered = np.subtract(planted.shift_px, native.shift_px)
    assert np.allclose(recovered, PLANTED, atol=0.1), (planted, native)


def test_other_shifts_and_the_sign_convention(sample_city, tmp_path):
    for shift in [(-0.6, 0.35), (3.0, 0.0)]:
        moved = write_shifted_date(sample_city / "imgs_1", tmp_path / f"{shift}", shift)
        measured = _offset(sample_city / "imgs_1", moved)
        assert np.allclose(measured.shift_px, shift, atol=0.1), (shift, measured)
        back = _offset(moved, sample_city / "imgs_1")  # the other way round: the opposite offset
        assert np.allclose(back.shift_px, np.negative(shift), atol=0.1), (shift, back)


def test_correction_restores_f1_and_keeps_t1s_grid(sample_city, shifted, tmp_path):
    label = sample_city / "cm" / f"{sample_city.name.split('_')[-1]}-cm.tif"
    runs = {}
    for name, t2, correct in [("plain", sample_city / "imgs_2", False), ("plain+co", sample_city / "imgs_2", True),
                              ("shifted", shifted["t2"], False), ("shifted+co", shifted["t2"], True)]:  # fmt: skip
        result = detect_changes(sample_city / "imgs_1", t2, tmp_path / name, DetectParams(coregister=correct))
        runs[name] = (evaluate_mask(result.path("change_mask.tif"), label)["f1"], result)
    f1 = {k: v[0] for k, v in runs.items()}
    assert f1["shifted"] < f1["plain"] - 0.1, f1  # 2.7 px of misregistration costs most of the map
    assert abs(f1["shifted+co"] - f1["plain+co"]) <= 0.02, f1
    assert f1["shifted+co"] >= f1["plain"] - 0.02, f1
    summary = runs["shifted+co"][1].summary
    assert summary["coregistration"]["applied"] is True and summary["coregistration"]["confidence"] == "high"
    assert runs["shifted"][1].summary["coregistration"]["applied"] is False
    with rasterio.open(runs["plain"][1].path("change_mask.tif")) as a, rasterio.open(runs["shifted+co"][1].path("change_mask.tif")) as b:
        assert (a.crs, a.transform, a.shape, a.nodata) == (b.crs, b.transform, b.shape, b.nodata)
    recorded = json.loads(runs["shifted+co"][1].path("run.json").read_text())["coregistration"]
    assert set(recorded) >= {"shift_px", "confidence", "windows", "agreeing", "spread_px", "applied", "method"}


def _textureless_pair(tmp_path):
    rng = np.random.default_rng(3)
    one = rng.integers(100, 4000, (3, 96, 96)).astype(np.uint16)
    two = rng.integers(100, 4000, (3, 96, 96)).astype(np.uint16)  # nothing in common with t1
    return write_raster(tmp_path / "t1.tif", one), write_raster(tmp_path / "t2.tif", two)


def test_pairs_without_common_texture_get_low_confidence_not_a_shift(tmp_path):
    t1, t2 = _textureless_pair(tmp_path)
    noise = _offset(t1, t2)
    assert noise.confidence == "low" and noise.shift_px is None and noise.agreeing < 3, noise
    flat1 = write_raster(tmp_path / "f1.tif", np.full((3, 96, 96), 500, np.uint16))
    flat2 = write_raster(tmp_path / "f2.tif", np.full((3, 96, 96), 700, np.uint16))
    flat = _offset(flat1, flat2)
    assert flat.confidence == "none" and flat.shift_px is None and "texture" in flat.reason


def test_different_sensors_are_not_measured(tmp_path):
    optical, sar, _ = write_synthetic_optical_sar(tmp_path)
    measured = _offset(optical, sar, allow_different_bands=True)
    assert measured.confidence == "none" and measured.shift_px is None and "sensors" in measured.reason


def test_coregister_refuses_an_untrusted_offset_with_one_error_line(tmp_path, capsys):
    t1, t2 = _textureless_pair(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--coregister", "--model", "cva"])
    assert_one_error_line(rc, capsys.readouterr().err, 2, "--coregister")
    assert not out.exists() or not any(out.iterdir())
    rc = cli.main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--model", "cva"])
    assert rc == 0  # without --coregister the run goes on and says how far the offset can be trusted
    assert json.loads((out / "run.json").read_text())["coregistration"]["confidence"] == "low"
