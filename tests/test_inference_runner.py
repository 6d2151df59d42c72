"""One inference path: validation scores exactly what ``changedet detect --runtime torch`` writes (the
default CPU runtime, ONNX Runtime, agrees with it to 1e-4 in probability: tests/test_edge.py), the
runner's input-transform hook runs on detect's tiles, and the Normalization value type is applied the
same way everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from changedet.checkpoint import read_metadata
from changedet.cli import main as cli_main
from changedet.data.datasets import PatchDataset
from changedet.data.stats import compute_normalization, per_scene_normalization
from changedet.evaluate import evaluate_mask
from changedet.losses import build_loss
from changedet.models import create_model
from changedet.normalization import Normalization, date_statistics
from changedet.pipeline.align import PairReader
from changedet.pipeline.detect import DetectParams, plan_run
from changedet.pipeline.inference import SceneRunner, TileBatch
from changedet.pipeline.output_table import MASK, PROBABILITY, RUN_JSON
from changedet.pipeline.postprocess import scene_threshold
from changedet.pipeline.tiling import Tiling
from changedet.pipeline.validation import evaluate_scenes
from changedet.train import Trainer, TrainSettings

TILING = {"tile": 128, "overlap": 24}


@pytest.fixture(scope="module")
def detected(tmp_path_factory, sample_city) -> Path:
    out = tmp_path_factory.mktemp("detect") / "out"
    args = ["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(out),
            "--model", "oscd-s2", "--tile", str(TILING["tile"]), "--overlap", str(TILING["overlap"]), "--runtime", "torch", "--quiet"]
    assert cli_main(args) == 0
    return out


def test_validation_f1_equals_detect_then_evaluate(bundled, bercy, detected, sample_city):
    """The F1 training validation reports for a scene and checkpoint is what a user gets from
    ``changedet detect`` + ``changedet evaluate`` on it (at the threshold of the checkpoint's rule)."""
    result = evaluate_scenes(bundled.model, [bercy], bundled.normalization, **TILING)
    rule = bundled.spec.metadata.get("test_time", {}).get("threshold_rule", "fixed")
    threshold = scene_threshold(rule, bundled.threshold, result.scenes["bercy"])  # bercy is labelled everywhere
    assert threshold == pytest.approx(json.loads((detected / RUN_JSON).read_text())["threshold"])
    validated = result.metrics(threshold)["per_scene"]["bercy"]
    scored = evaluate_mask(detected / MASK, sample_city / "cm" / "bercy-cm.tif")
    assert validated["f1"] == pytest.approx(scored["f1"], abs=1e-6)
    for key in ("tp", "fp", "fn", "tn"):
        assert validated[key] == scored[key]


def test_trainer_validation_f1_of_its_checkpoint_equals_detect_then_evaluate(bercy, sample_city, tmp_path):
    """Train a tiny model for one epoch: the per-scene F1 its checkpoint records (validation, at the
    threshold tuned there) is the F1 of ``changedet detect --model best.safetensors`` + ``evaluate``."""
    torch.manual_seed(0)
    model = create_model("fc-siam-diff", in_channels=13, base_channels=4, dropout=0.0)
    stats = compute_normalization([bercy])
    data = PatchDataset([bercy], 32, stats, None, length=16, change_fraction=0.5, seed=0)
    settings = TrainSettings(epochs=1, batch_size=8, lr=3e-3, scheduler="constant", val_tile=TILING["tile"],
                             val_overlap=TILING["overlap"], progress=False)  # fmt: skip
    trainer = Trainer(model, "fc-siam-diff", {"base_channels": 4, "dropout": 0.0}, build_loss("bce"), data, [bercy],
                      stats, tmp_path / "run", settings, split={"train": ["bercy"], "val": ["bercy"]})  # fmt: skip
    result = trainer.fit()
    recorded = read_metadata(result.best_checkpoint)["metrics"]["per_scene"]["bercy"]
    out = tmp_path / "detect"
    args = ["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(out),
            "--model", str(result.best_checkpoint), "--tile", str(TILING["tile"]), "--overlap", str(TILING["overlap"]),
            "--runtime", "torch", "--quiet"]
    assert cli_main(args) == 0
    scored = evaluate_mask(out / MASK, sample_city / "cm" / "bercy-cm.tif")
    assert recorded["f1"] == pytest.approx(scored["f1"], abs=1e-6)
    assert [recorded[k] for k in ("tp", "fp", "fn", "tn")] == [scored[k] for k in ("tp", "fp", "fn", "tn")]


def test_runner_on_the_aligned_pair_is_the_detect_probability(bundled, detected, sample_city):
    params = DetectParams(model="oscd-s2", runtime="torch", **TILING)
    plan = plan_run(sample_city / "imgs_1", sample_city / "imgs_2", params)
    height, width = plan.pair.grid.shape
    with PairReader(plan.pair) as reader:
        norm = Normalization.of(bundled.normalization).for_scene(reader.read, height, width)
    runner = SceneRunner(bundled.model, norm, Tiling(**TILING))
    prob = np.full((height, width), np.nan, np.float32)

    def sink(row, p, _d, valid):
        prob[row : row + p.shape[0]] = np.where(valid, p, np.nan)

    with PairReader(plan.pair) as reader:
        runner.run(reader.read, (height, width), sink)
    with rasterio.open(detected / PROBABILITY) as ds:
        written = ds.read(1, masked=True).filled(np.nan)
    np.testing.assert_array_equal(written, prob)


def test_input_transform_sees_raw_tiles_and_labels_and_replaces_them(bundled, bercy):
    seen: list[TileBatch] = []

    def identity(runner: SceneRunner, batch: TileBatch):
        seen.append(batch)
        assert batch.label is not None and batch.label.shape == batch.valid.shape
        return batch.x1, batch.x2

    clean = evaluate_scenes(bundled.model, [bercy], bundled.normalization, **TILING)
    same = evaluate_scenes(bundled.model, [bercy], bundled.normalization, **TILING, transform=identity)
    assert seen and np.array_equal(clean.scenes["bercy"].pos, same.scenes["bercy"].pos)
    assert np.array_equal(clean.scenes["bercy"].neg, same.scenes["bercy"].neg)
    darker = evaluate_scenes(bundled.model, [bercy], bundled.normalization, **TILING,
                              transform=lambda runner, batch: (batch.x1, batch.x2 * 0.5))  # fmt: skip
    assert not np.array_equal(clean.scenes["bercy"].pos, darker.scenes["bercy"].pos)


def test_normalization_one_value_for_every_stored_form(bercy):
    stats = date_statistics(bercy.read, *bercy.shape)
    fixed = Normalization.of(stats)
    assert Normalization.of(fixed) is fixed and Normalization.of(fixed.to_metadata()).to_metadata() == fixed.to_metadata()
    assert fixed.to_metadata() == {d: {k: stats[d][k] for k in ("mean", "std")} for d in ("t1", "t2")}
    per_scene = Normalization.of("per-scene")
    assert per_scene.per_scene and Normalization.of({"mode": "per-scene", "scenes": {}}).per_scene
    resolved = per_scene.for_scene(bercy.read, *bercy.shape)
    training = Normalization.of(per_scene_normalization([bercy]))  # statistics computed once, found by name
    known = training.for_scene(bercy.read, *bercy.shape, "bercy")
    assert known is training.scenes["bercy"] and training.for_scene(bercy.read, *bercy.shape, "other") is not known
    for date in (0, 1):
        np.testing.assert_array_equal(resolved[date][0], fixed[date][0])
        np.testing.assert_array_equal(known[date][1], fixed[date][1])
    x1, x2, valid = bercy.read(Tiling().plan(*bercy.shape)[0].window)
    z = fixed.apply(x1[None], valid[None], 0)
    zt = fixed.apply_tensor(torch.from_numpy(x1[None]), torch.from_numpy(valid[None]), 0).numpy()
    np.testing.assert_array_equal(z, zt)
    assert (z[0][:, ~valid] == 0).all()
    with pytest.raises(Exception, match="per-scene"):
        per_scene.apply(x1[None], valid[None], 0)
