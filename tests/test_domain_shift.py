"""Domain shifts (identity at severity 0, sensor range, invalid pixels untouched), histogram matching,
AdaBN (BatchNorm statistics only), ECE on a hand-computed example, and the Taizhou cross-domain scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from changedet.evaluation.adaptation import adabn, band_quantiles, match_histograms
from changedet.evaluation.calibration import expected_calibration_error, histogram_ece
from changedet.evaluation.domain_shift import SHIFTS, apply_shift, shift_scene
from changedet.evaluation.loading import open_labelled_scenes
from changedet.evaluation.sensor import Sensor
from changedet.models import create_model
from changedet.metrics import ProbabilityHistogram

BANDS = ("B02", "B03", "B04", "B08")
SENSOR = Sensor(10000.0)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    x = (rng.random((4, 40, 48)) * 4000 + 300).astype(np.float32)
    x[:, :3, :3] = 12000.0  # bright pixels above reflectance 1
    valid = np.ones((40, 48), bool)
    valid[20:26, 10:30] = False
    x[:, 20:26, 10:30] = 65535.0  # nodata
    return x, valid


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shift_identity_range_and_invalid_pixels(name, image):
    x, valid = image
    assert np.array_equal(apply_shift(name, x, valid, 0, SENSOR, BANDS), x)
    for severity in (1, 5):
        y = apply_shift(name, x, valid, severity, SENSOR, BANDS, seed=3)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert np.array_equal(y[:, ~valid], x[:, ~valid])
        assert (y >= np.minimum(x, 0)).all() and (y <= np.maximum(x, SENSOR.high)).all()
        assert not np.array_equal(y[:, valid], x[:, valid])
    assert np.array_equal(apply_shift(name, x, valid, 5, SENSOR, BANDS, seed=3), apply_shift(name, x, valid, 5, SENSOR, BANDS, seed=3))


def test_histogram_matching_undoes_a_monotone_shift(image):
    x, valid = image
    shifted = apply_shift("gain_offset", x, valid, 5, SENSOR, BANDS)
    matched = match_histograms(shifted, valid, band_quantiles(x, valid))
    assert np.array_equal(matched[:, ~valid], shifted[:, ~valid])
    assert np.abs(matched[:, valid] - x[:, valid]).mean() < 0.05 * np.abs(shifted[:, valid] - x[:, valid]).mean()


def test_ece_hand_computed():
    prob = np.array([0.1, 0.2, 0.7, 0.9])
    target = np.array([False, True, True, True])
    # bin [0, .5): confidence .15, accuracy .5 -> .35 * 2/4; bin [.5, 1]: .8 vs 1 -> .2 * 2/4
    assert expected_calibration_error(prob, target, bins=2) == pytest.approx(0.275)
    assert expected_calibration_error(prob, target, np.array([True, True, False, False]), bins=2) == pytest.approx(0.35)
    hist = ProbabilityHistogram()
    hist.update(prob, target, np.ones(4, bool))
    assert histogram_ece(hist, bins=2) == pytest.approx(0.275, abs=1e-3)


def test_adabn_changes_batchnorm_statistics_only(sample_city):
    torch.manual_seed(0)
    model = create_model("fc-siam-diff", in_channels=13, base_channels=4).eval()
    bands = [f"B{i:02d}" for i in range(1, 13)]
    bands.insert(8, "B8A")
    (scene,) = open_labelled_scenes(sample_city, ["bercy"], (bands, bands))
    norm = {d: {"mean": [1500.0] * 13, "std": [800.0] * 13} for d in ("t1", "t2")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adabn(model, [shift_scene(scene, "haze", 5)], norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert any(k.endswith("running_mean") for k in changed) and not adapted.training


def test_taizhou_cross_domain_scene(shared_data, tmp_path):
    from changedet.evaluation.cross_domain import taizhou_scene

    scene = taizhou_scene(shared_data / "landsat" / "taizhou", tmp_path)
    assert scene.channels == (6, 6) and scene.shape == (400, 400)
    assert int((scene.label == 1).sum()) == 4227 and int((scene.label == 0).sum()) == 17163
