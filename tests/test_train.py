"""Training: config, full-scene validation, a tiny end-to-end run on the bundled OSCD city,
checkpoint round-trip through the predictor, resume, early stopping, SimSiam."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from changedet.checkpoint import load_state_dict, read_metadata
from changedet.data import ChangeScene, PairedAugment, PatchDataset, collate_patches, compute_normalization, discover_scenes, open_scenes
from changedet.errors import ModelError
from changedet.losses import build_loss
from changedet.metrics import Confusion
from changedet.models import create_model
from changedet.pipeline.predictor import TilePredictor, resolve_model
from changedet.train import (
    ConfigError,
    ProbabilityHistogram,
    Trainer,
    TrainSettings,
    embedding_std,
    evaluate_scenes,
    find_encoders,
    load_encoder_weights,
    load_train_config,
    prepare_data,
    pretrain_simsiam,
    train_from_config,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"base_channels": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def bercy(sample_city: Path) -> ChangeScene:
    (scene,) = open_scenes(discover_scenes(sample_city), cache_bytes=2**30)
    return scene


@pytest.fixture(scope="module")
def stats(bercy: ChangeScene) -> dict:
    return compute_normalization([bercy])


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("fc-siam-diff", in_channels=13, **TINY)


def make_trainer(bercy, stats, out_dir, epochs=3, lr=3e-3, val=True, length=40, **settings) -> Trainer:
    data = PatchDataset([bercy], 32, stats, PairedAugment(gain=0.05, offset=0.05, noise=0.01), length=length, change_fraction=0.5, seed=0)
    kwargs = dict(epochs=epochs, batch_size=8, lr=lr, scheduler="constant", val_tile=256, val_overlap=16, val_batch_size=4, progress=False)
    kwargs.update(settings)
    return Trainer(
        tiny_model(), "fc-siam-diff", TINY, build_loss("bce+dice", pos_weight=5.0), data, [bercy] if val else [],
        stats, out_dir, TrainSettings(**kwargs), split={"train": ["bercy"], "val": ["bercy"]},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------


def test_bundled_config_validates() -> None:
    cfg = load_train_config(REPO / "configs" / "train" / "oscd.yaml")
    assert cfg.model.name == "fc-siam-diff" and cfg.data.layout == "oscd" and cfg.data.val
    assert cfg.loss.name == "bce+dice" and cfg.loss.kwargs() == {"pos_weight": 5.0}
    assert cfg.data.root.parts[-3:] == ("shared", "data", "oscd")
    over = load_train_config(REPO / "configs" / "train" / "oscd.yaml", overrides={"epochs": 2, "data": {"patch_size": 32}})
    assert over.epochs == 2 and over.data.patch_size == 32 and over.data.val == cfg.data.val


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_train_config(path)
    assert all(source.val for source in cfg.data.source_list()) and cfg.output_dir.parts[0] == "outputs"


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"model": {"name": "no-such-model"}}, "unknown model"),
        ({"model": {"name": "fc-siam-diff", "config": {"in_channels": 3}}}, "in_channels"),
        ({"model": {"name": "fc-siam-diff", "config": {"depth": 3}}}, "does not take"),
        ({"loss": {"name": "bce+nope"}}, "loss"),
        ({"data": {"root": "x", "patch_size": 4}}, "patch_size"),
        ({"epochs": 0}, "epochs"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_invalid_configs_are_refused(patch: dict, match: str) -> None:
    base = {"data": {"root": "data/sample/oscd_bercy"}, "model": {"name": "fc-siam-diff"}}
    with pytest.raises(ConfigError, match=match):
        load_train_config(data={**base, **patch})


# ------------------------------------------------------------------------------------------
# full-scene validation
# ------------------------------------------------------------------------------------------


def test_histogram_confusion_matches_direct_count() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random(5000).astype(np.float32)
    target = rng.random(5000) < 0.1
    valid = rng.random(5000) < 0.9
    hist = ProbabilityHistogram(1000)
    hist.update(prob, target, valid)
    for threshold in (0.0, 0.25, 0.5, 0.731, 1.0):
        direct = Confusion().update(prob >= threshold, target, valid)
        assert hist.confusion(threshold) == direct, threshold
        assert Confusion.from_metrics(json.loads(json.dumps(direct.metrics()))) == direct  # counts survive metadata
    best = hist.best_threshold()
    f1 = hist.confusion(best).metrics()["f1"]
    assert all(f1 >= hist.confusion(t).metrics()["f1"] - 1e-12 for t in np.linspace(0.001, 0.999, 97))


def test_validation_covers_the_whole_scene(bercy: ChangeScene, stats: dict) -> None:
    model = tiny_model()
    result = evaluate_scenes(model, [bercy], stats, tile=128, overlap=16)
    hist = result.scenes["bercy"]
    assert hist.pos.sum() + hist.neg.sum() == 395 * 360  # every pixel, not centre crops
    assert hist.pos.sum() == 1046
    metrics = result.metrics(0.5)
    assert set(metrics["pooled"]) >= {"precision", "recall", "f1", "iou", "oa", "kappa", "tp", "fp", "fn", "tn"}
    assert metrics["per_scene"]["bercy"]["tp"] + metrics["per_scene"]["bercy"]["fn"] == 1046
    json.dumps(metrics)  # JSON-safe (undefined ratios are None)


# ------------------------------------------------------------------------------------------
# end to end on the bundled city
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(bercy: ChangeScene, stats: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("train")
    data = PatchDataset([bercy], 32, stats, None, length=16, change_fraction=0.5, seed=123)
    fixed = collate_patches([data[i] for i in range(16)])
    trainer = make_trainer(bercy, stats, out, epochs=3, val_every=2)  # validates epochs 2 and 3
    loss = build_loss("bce+dice", pos_weight=5.0)

    def fixed_loss(model) -> float:
        model.train()  # batch statistics, dropout is 0
        with torch.no_grad():
            return float(loss(model(fixed["t1"], fixed["t2"]), fixed["target"], fixed["valid"]))

    before = fixed_loss(trainer.model.cpu())
    result = trainer.fit()
    after = fixed_loss(trainer.model.cpu())
    return trainer, result, before, after


def test_training_lowers_the_loss(trained) -> None:
    trainer, result, before, after = trained
    assert after < before
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.epochs_completed == 3 and not result.stopped_early
    assert [("val" in h) for h in result.history] == [False, True, True]
    assert 0 < result.threshold < 1 and result.best_score is not None and result.best_epoch >= 1
    for name in ("best.safetensors", "last.safetensors", "last.optim.pt", "trainer_state.json"):
        assert (result.out_dir / name).is_file(), name


def test_checkpoint_round_trip_through_predictor(trained, bercy: ChangeScene, stats: dict) -> None:
    trainer, result, _, _ = trained
    meta = read_metadata(result.best_checkpoint)
    assert meta["model"] == "fc-siam-diff" and meta["config"] == TINY
    assert meta["bands"]["t1"] == bercy.bands[0] and len(meta["normalization"]["t2"]["std"]) == 13
    assert meta["threshold"] == pytest.approx(result.threshold)
    assert meta["split"] == {"train": ["bercy"], "val": ["bercy"]}
    assert meta["metrics"]["pooled"]["f1"] == pytest.approx(result.best_score)
    assert meta["stats"]["scenes"] == ["bercy"] and meta["training"]["loss"] == "bce+dice"
    spec = resolve_model(str(result.best_checkpoint))
    predictor = TilePredictor(spec, (13, 13))
    assert not predictor.needs_samples
    x1, x2, valid = bercy.read(Window(40, 60, 64, 64))
    prob, _ = predictor.predict(x1[None], x2[None], valid[None])
    # the same weights, normalised as in training
    model = create_model("fc-siam-diff", in_channels=13, **TINY)
    model.load_state_dict(load_state_dict(result.best_checkpoint))
    m, s = (np.asarray(stats["t1"][k], np.float32)[:, None, None] for k in ("mean", "std"))
    z1 = torch.from_numpy(np.where(valid[None], (x1 - m) / s, 0).astype(np.float32))[None]
    z2 = torch.from_numpy(np.where(valid[None], (x2 - m) / s, 0).astype(np.float32))[None]
    expected = model.predict(z1, z2).probability[0, 0].numpy()
    np.testing.assert_allclose(prob[0], expected, atol=1e-5)


def test_resume_continues_after_the_last_epoch(bercy: ChangeScene, stats: dict, tmp_path: Path) -> None:
    first = make_trainer(bercy, stats, tmp_path, epochs=1, val=False, length=24).fit()
    assert first.epochs_completed == 1 and first.resumed_from is None
    state = torch.load(tmp_path / "last.optim.pt", weights_only=True)
    steps = state["optimizer"]["state"][0]["step"]
    second = make_trainer(bercy, stats, tmp_path, epochs=2, val=False, length=24)
    result = second.fit()
    assert result.resumed_from == 1 and result.epochs_completed == 2 and len(result.history) == 2
    assert torch.load(tmp_path / "last.optim.pt", weights_only=True)["optimizer"]["state"][0]["step"] == 2 * steps
    # an uninterrupted two-epoch run gives the same weights
    straight = make_trainer(bercy, stats, tmp_path / "straight", epochs=2, val=False, length=24).fit()
    a, b = load_state_dict(result.last_checkpoint), load_state_dict(straight.last_checkpoint)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(ModelError, match="trained as"):
        other = make_trainer(bercy, stats, tmp_path, epochs=3, val=False, length=24)
        other.model_config = {"base_channels": 8}
        other.fit()


def test_weight_average_is_scored_shipped_and_resumed(bercy: ChangeScene, stats: dict, tmp_path: Path) -> None:
    make_trainer(bercy, stats, tmp_path, epochs=1, val=False, length=24, ema_decay=0.9).fit()
    result = make_trainer(bercy, stats, tmp_path, epochs=2, val=False, length=24, ema_decay=0.9).fit()
    assert result.resumed_from == 1
    straight = make_trainer(bercy, stats, tmp_path / "straight", epochs=2, val=False, length=24, ema_decay=0.9).fit()
    ema, best, raw = (load_state_dict(tmp_path / name) for name in ("last.ema.safetensors", "best.safetensors", "last.safetensors"))
    assert all(torch.equal(ema[k], best[k]) for k in ema)  # best (no validation: the last epoch) is the average
    assert any(not torch.allclose(ema[k].float(), raw[k].float()) for k in ema if ema[k].is_floating_point())
    straight_ema = load_state_dict(straight.out_dir / "last.ema.safetensors")
    assert all(torch.allclose(ema[k].float(), straight_ema[k].float(), atol=1e-5) for k in ema)  # resume keeps averaging
    assert read_metadata(result.best_checkpoint)["training"]["ema_decay"] == 0.9
    (tmp_path / "last.ema.safetensors").unlink()
    with pytest.raises(ModelError, match="no last.ema.safetensors"):
        make_trainer(bercy, stats, tmp_path, epochs=3, val=False, length=24, ema_decay=0.9).fit()


class ScriptedTrainer(Trainer):
    """Validation F1 follows a script; no real training (tests the early-stopping bookkeeping)."""

    scores = [0.30, 0.50, 0.40, 0.45, 0.60, 0.70]

    def train_epoch(self) -> dict:
        return {"train_loss": 1.0, "loss_parts": {}, "lr": 0.0, "steps": 0, "skipped_steps": 0, "train_seconds": 0.0}

    def validate(self):
        f1 = self.scores[self.epoch - 1]
        pooled = {"f1": f1, "precision": f1, "recall": f1, "iou": f1 / 2, "oa": 0.99, "kappa": f1}
        return None, 0.1 * self.epoch, {"pooled": pooled, "pooled_at_0.5": pooled, "mean_f1": f1, "per_scene": {}}


def test_early_stopping_on_validation_f1(bercy: ChangeScene, stats: dict, tmp_path: Path) -> None:
    trainer = make_trainer(bercy, stats, tmp_path, epochs=6, patience=2)
    trainer.__class__ = ScriptedTrainer
    result = trainer.fit()
    # best at epoch 2 (0.50); epochs 3 and 4 do not improve -> stop before the 0.60 of epoch 5
    assert result.stopped_early and result.epochs_completed == 4 and result.best_epoch == 2
    assert result.best_score == 0.5 and result.threshold == pytest.approx(0.2)
    assert read_metadata(result.best_checkpoint)["threshold"] == pytest.approx(0.2)
    assert read_metadata(result.last_checkpoint)["training"]["epoch"] == 4
    assert [bool(h.get("best")) for h in result.history] == [True, True, False, False]


def test_train_from_config_on_the_sample(tmp_path: Path) -> None:
    cfg = {
        "data": {"root": str(REPO / "data" / "sample" / "oscd_bercy"), "patch_size": 32, "samples_per_epoch": 16,
                 "bands": ["B02", "B03", "B04", "B08"]},
        "model": {"name": "fc-siam-diff", "config": TINY},
        "loss": {"name": "bce+0.5*contrastive", "contrastive": {"margin": 0.5}},
        "epochs": 1, "batch_size": 8, "output_dir": str(tmp_path / "run"), "progress": False,
        "simsiam": {"enabled": True, "epochs": 1, "samples_per_epoch": 16, "batch_size": 8, "patch_size": 32,
                    "proj_dim": 32, "pred_hidden": 8},
    }  # fmt: skip
    result = train_from_config(load_train_config(data=cfg))
    assert result.pretraining["method"] == "simsiam" and (tmp_path / "run" / "simsiam.safetensors").is_file()
    assert result.pretraining["embedding_std"]["encoder"] > 0
    meta = read_metadata(result.best_checkpoint)
    assert meta["pretraining"]["method"] == "simsiam"
    assert meta["bands"] == {"t1": ["B02", "B03", "B04", "B08"], "t2": ["B02", "B03", "B04", "B08"]}
    assert meta["split"]["train"] == ["bercy"] and meta["split"]["val"] == []
    assert json.loads((tmp_path / "run" / "result.json").read_text())["epochs_completed"] == 1


def test_train_from_config_on_shared_oscd(shared_data: Path, tmp_path: Path) -> None:
    overrides = {
        "data": {"train": ["bercy"], "val": ["paris"], "patch_size": 32, "samples_per_epoch": 16, "stats_max_pixels": 20000},
        "model": {"config": TINY}, "epochs": 1, "batch_size": 8, "output_dir": str(tmp_path / "oscd"),
        "progress": False, "validation": {"tile": 128, "overlap": 16},
    }  # fmt: skip
    result = train_from_config(REPO / "configs" / "train" / "oscd.yaml", overrides)
    assert result.split["train"] == ["bercy"] and result.split["val"] == ["paris"]
    assert set(result.metrics["per_scene"]) == {"paris"}
    assert result.metrics["per_scene"]["paris"]["tp"] + result.metrics["per_scene"]["paris"]["fn"] == 458
    # SimSiam may use unlabelled cities, never the validation cities
    cfg = load_train_config(REPO / "configs" / "train" / "oscd.yaml", overrides={"simsiam": {"enabled": True}, "data": {"train": ["bercy"], "cache_mb": 0}})
    data = prepare_data(cfg)
    assert [s.name for s in data.unlabelled] == ["brasilia", "montpellier", "norcia", "rio"]
    assert not {s.group for s in data.train + data.unlabelled} & {s.group for s in data.val}
    assert data.normalization["scenes"] == [s.name for s in data.train]  # statistics from training cities only


# ------------------------------------------------------------------------------------------
# SimSiam
# ------------------------------------------------------------------------------------------


def test_embedding_std_detects_collapse() -> None:
    z = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert embedding_std(z) == pytest.approx(1 / math.sqrt(64), rel=0.1)
    assert embedding_std(torch.ones(512, 64) + 1e-3 * z) < 0.01


def test_simsiam_pretrains_the_encoder_and_fine_tuning_loads_it(bercy: ChangeScene, stats: dict, tmp_path: Path) -> None:
    model = tiny_model(1)
    assert list(find_encoders(model)) == ["encoder"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = PatchDataset([bercy], 32, stats, None, length=16, require_label=False, seed=2)
    result = pretrain_simsiam(
        model, data, epochs=2, batch_size=8, lr=0.5, proj_dim=32, pred_hidden=8, out_path=tmp_path / "ss.safetensors",
        metadata={"model": "fc-siam-diff", "config": TINY}, progress=False,
    )  # fmt: skip
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) and -1 <= h["loss"] <= 1 for h in result.history)
    std = result.final_std["encoder"]
    assert 0 < std <= 1 and result.healthy_std["encoder"] == pytest.approx(1 / math.sqrt(32))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)  # only the encoder was trained
    assert read_metadata(tmp_path / "ss.safetensors")["pretraining"]["method"] == "simsiam"
    fresh = tiny_model(2)
    decoder_before = {k: v.clone() for k, v in fresh.state_dict().items() if not k.startswith("encoder.")}
    keys = load_encoder_weights(fresh, tmp_path / "ss.safetensors")
    assert keys and all(k.startswith("encoder.") for k in keys)
    state = fresh.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in keys)
    assert all(torch.equal(state[k], v) for k, v in decoder_before.items())
    with pytest.raises(ModelError):
        find_encoders(create_model("fc-ef", in_channels=13, base_channels=4))
    wider = create_model("fc-siam-diff", in_channels=13, base_channels=8)
    with pytest.raises(ModelError, match="incompatible"):
        load_encoder_weights(wider, tmp_path / "ss.safetensors")


def test_byol_target_is_an_ema_of_the_online_branch_and_only_the_encoder_is_kept(bercy: ChangeScene, stats: dict, tmp_path: Path) -> None:
    from changedet.train.simsiam import SimSiam

    head = SimSiam(tiny_model(3).encoder, proj_dim=16, pred_hidden=8, target_decay=0.75)
    assert head.target is not None and not any(p.requires_grad for p in head.target.parameters())
    online = [p for n, p in head.named_parameters() if not n.startswith("target.")]
    target_before = [t.clone() for t in head.target.parameters()]
    with torch.no_grad():
        for p in online:
            p.add_(1.0)
    head.update_target()
    online_now = list(head.encoder.parameters()) + list(head.projector.parameters())
    for t, before, o in zip(head.target.parameters(), target_before, online_now):
        assert torch.allclose(t, 0.75 * before + 0.25 * o)  # the decay, not a copy
    model = tiny_model(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = PatchDataset([bercy], 32, stats, None, length=16, require_label=False, seed=2)
    result = pretrain_simsiam(
        model, data, epochs=2, batch_size=8, lr=0.5, proj_dim=32, pred_hidden=8, method="byol", target_decay=0.9,
        out_path=tmp_path / "byol.safetensors", metadata={"model": "fc-siam-diff", "config": TINY}, progress=False,
    )  # fmt: skip
    assert all(math.isfinite(h["loss"]) and -1 <= h["loss"] <= 1 for h in result.history)
    meta = read_metadata(tmp_path / "byol.safetensors")["pretraining"]
    assert meta["method"] == "byol" and meta["target_decay"] == 0.9
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("encoder.") for k in changed)
    assert set(load_state_dict(tmp_path / "byol.safetensors")) == set(model.state_dict())  # no target weights saved
