"""The bundled models: OSCD Sentinel-2 (default for 13-band scenes) and RGB (default for 3-band scenes)
describe their inputs and reproduce their recorded validation F1 on the sample city."""


import pytest

from changedet.checkpoint import read_metadata
from changedet.cli import main
from changedet.pipeline.detect import MASK, DetectParams, detect_changes
from changedet.evaluate import evaluate_mask
from changedet.pipeline.predictor import auto_model, resolve_model
from changedet.weights import bundled_checkpoint

CHECKPOINT = bundled_checkpoint("oscd-s2")
RGB = bundled_checkpoint("rgb")


def test_bundled_checkpoint_is_small_and_self_describing():
    assert CHECKPOINT is not None and CHECKPOINT.stat().st_size < 8 * 2**20
    meta = read_metadata(CHECKPOINT)
    assert meta["bands"]["t1"] == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert meta["normalization"] == "per-scene"
    assert len(meta["split"]["train"]) == 10 and not meta["split"]["val"]  # every labelled OSCD city
    expected = meta["expected_f1_unseen"]  # the cross-validation figure, not a training-city score
    assert 0 < expected["pooled_f1_mean"] < 1 and "leave-groups-out" in expected["protocol"]
    assert meta["test_time"]["threshold_rule"] == "otsu"


def test_auto_picks_the_bundled_model_only_for_its_bands():
    assert auto_model(tuple(read_metadata(CHECKPOINT)["bands"]["t1"])).name == resolve_model("oscd-s2").name
    assert auto_model(("B1", "B2", "B3")).checkpoint == RGB
    assert auto_model(("B1", "B2", "B3", "B4")).name == "cva"


def test_bundled_rgb_checkpoint_is_small_and_self_describing():
    assert RGB is not None and RGB.stat().st_size < 8 * 2**20
    meta = read_metadata(RGB)
    assert meta["normalization"] == "per-scene" and meta["bands"] is None
    assert meta["input_channels"] == [3, 3] and meta["channel_names"] == ["red", "green", "blue"]
    split = meta["split"]
    assert {"bercy", "val_27_0000_0256"} <= set(split["val"]) and not set(split["val"]) & set(split["train"])
    assert not set(split["val_groups"]) & set(split["train_groups"])


def test_bundled_robust_checkpoint_records_its_defence_and_unseen_city_figures():
    meta = read_metadata(bundled_checkpoint("oscd-s2-robust"))
    assert not {"B01", "B09", "B10"} & set(meta["bands"]["t1"]) and meta["normalization"] == "per-scene"
    training = meta["adversarial_training"]
    assert len(training["train_scenes"]) == 10 and training["warmup_steps"] > 0 and training["threshold_tuned_on"].startswith("training")
    clean = meta["expected_f1_unseen"]["pooled_f1_mean"]
    robust = meta["robustness_unseen"]
    assert "leave-cities-out" in meta["expected_f1_unseen"]["protocol"] and 0 < clean < 1
    assert {"0.5", "1", "2", "4"} <= set(robust["worst_attack_both_dates"])  # the trade-off curve's budgets
    assert robust["worst_ratio_to_clean"]["1"] == pytest.approx(robust["worst_attack_both_dates"]["1"] / clean)


@pytest.mark.parametrize("name, bands", [("oscd-s2", None), ("oscd-s2-robust", None), ("rgb", ("B04", "B03", "B02"))])
def test_reproduces_recorded_sample_scene_f1(sample_city, tmp_path, name, bands):
    meta = read_metadata(bundled_checkpoint(name))
    # recorded by benchmarks/select_oscd.py bundle with the model's own defaults; the RGB model (not retrained yet)
    # recorded it as one of its validation scenes, with the same tiling
    recorded = meta.get("sample_scene") or meta["metrics"]["per_scene"]["bercy"]
    result = detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", tmp_path / "out", DetectParams(model=name, bands=bands))
    metrics = evaluate_mask(result.path(MASK), sample_city / "cm" / "bercy-cm.tif")
    assert metrics["f1"] == pytest.approx(recorded["f1"], abs=1e-6)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (recorded["tp"], recorded["fp"], recorded["fn"])
    assert result.summary["parameters"]["threshold_rule"] == meta.get("test_time", {}).get("threshold_rule", "fixed")


def test_scene_without_a_model_band_is_refused_with_the_reason(sample_city, tmp_path, capsys):
    rc = main(["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"),
               "--out", str(tmp_path / "o"), "--model", "oscd-s2", "--bands", "B02,B03,B04", "--quiet"])
    assert rc == 2 and "band" in capsys.readouterr().err


def test_rgb_model_refuses_a_scene_with_another_band_count(sample_city, tmp_path, capsys):
    rc = main(["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"),
               "--out", str(tmp_path / "o"), "--model", "rgb", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "takes 3 bands (red, green, blue, in that order)" in err and "has 13" in err
