"""Adversarial robustness: ε = 0 is the clean evaluation exactly, PGD at least as strong as FGSM on the
bundled (trained) model, the budget, valid mask and sensor range hold, gradients reach both dates,
and PGD fine-tuning updates a model (the budget and range of every attack: ``test_attacks.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from changedet.data.augment import PairedAugment
from changedet.data.datasets import PatchDataset
from changedet.evaluation.adversarial import (
    Attack,
    attack_objective,
    evaluate_attack,
    frozen,
    perturb,
)
from changedet.evaluation.defence import adversarial_finetune
from changedet.evaluation.sensor import Sensor, scene_sensor
from changedet.losses import build_loss
from changedet.models import create_model
from changedet.normalization import Normalization
from changedet.pipeline.validation import evaluate_scenes

SCALE = 10000.0


def _crops(scene, size: int = 64, count: int = 2):
    """``count`` windows of ``size`` px centred on labelled changes, as batched tensors."""
    x1, x2, valid = scene.pixels()
    rows, cols = np.nonzero(scene.label == 1)
    picks = np.linspace(0, len(rows) - 1, count).astype(int)
    h, w = scene.shape
    out = []
    for i in picks:
        r = int(np.clip(rows[i] - size // 2, 0, h - size))
        c = int(np.clip(cols[i] - size // 2, 0, w - size))
        win = (slice(r, r + size), slice(c, c + size))
        out.append((x1[:, win[0], win[1]], x2[:, win[0], win[1]], valid[win], scene.label[win]))
    dtypes = (np.float32, np.float32, bool, np.int64)
    return [torch.from_numpy(np.stack([o[k] for o in out]).astype(dtypes[k])) for k in range(4)]


def _tiny_model(bands: int = 3):
    torch.manual_seed(0)
    return create_model("fc-siam-diff", in_channels=bands, base_channels=4).eval()


def _norm(bands: int) -> dict:
    stats = {"mean": [3000.0] * bands, "std": [1500.0] * bands}
    return {"t1": stats, "t2": stats}


def test_eps_zero_equals_clean_metrics_exactly(bercy):
    model, norm = _tiny_model(13), _norm(13)
    clean = evaluate_scenes(model, [bercy], norm)
    for attack in (Attack("fgsm", 0.0, "both"), Attack("pgd", 0.0, "hide", steps=2, random_start=True)):
        attacked = evaluate_attack(model, [bercy], norm, scene_sensor(bercy), attack)
        assert np.array_equal(attacked.scenes["bercy"].pos, clean.scenes["bercy"].pos)
        assert np.array_equal(attacked.scenes["bercy"].neg, clean.scenes["bercy"].neg)
        assert attacked.metrics(0.5)["pooled"] == clean.metrics(0.5)["pooled"]


@pytest.mark.parametrize("mode", ["both", "hide"])
def test_pgd_at_least_as_strong_as_fgsm_on_the_trained_model(bundled, bercy, mode):
    x1, x2, valid, label = _crops(bercy, size=48)
    stats = Normalization.of(bundled.normalization).for_scene(bercy.read, *bercy.shape, bercy.name)
    model, sensor = bundled.model, scene_sensor(bercy)

    def objective(attack: Attack) -> float:
        with frozen(model):
            a1, a2 = perturb(model, x1, x2, valid, label, stats, sensor, attack)
        with torch.no_grad():
            logits = model(stats.apply_tensor(a1, valid, 0), stats.apply_tensor(a2, valid, 1)).logits
        return float(attack_objective(logits, label, valid, attack.goal).sum())

    eps = 2 / 255
    clean, fgsm, pgd = objective(Attack("fgsm", 0.0, mode)), objective(Attack("fgsm", eps, mode)), objective(Attack("pgd", eps, mode, steps=5))
    assert clean < fgsm <= pgd + 1e-6


def test_gradients_flow_through_both_branches(bercy):
    model = _tiny_model(13)
    x1, x2, valid, label = _crops(bercy, size=32, count=1)
    stats = Normalization.of(_norm(13))
    d1 = torch.zeros_like(x1, requires_grad=True)
    d2 = torch.zeros_like(x2, requires_grad=True)
    logits = model(stats.apply_tensor(x1 + SCALE * d1, valid, 0), stats.apply_tensor(x2 + SCALE * d2, valid, 1)).logits
    g1, g2 = torch.autograd.grad(attack_objective(logits, label, valid, "untargeted").sum(), [d1, d2])
    assert float(g1.abs().sum()) > 0 and float(g2.abs().sum()) > 0
    a1, a2 = perturb(model, x1, x2, valid, label, stats, Sensor(SCALE), Attack("fgsm", 1 / 255, "both"))
    assert not torch.equal(a1, x1) and not torch.equal(a2, x2)


def test_adversarial_finetune_updates_the_model(bercy):
    model = _tiny_model(13)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = PatchDataset([bercy], 32, None, PairedAugment(gain=0, offset=0, noise=0), length=4, change_fraction=0.5)
    history = adversarial_finetune(model, data, _norm(13), Sensor(SCALE), Attack("pgd", 2 / 255, "both", steps=2),
                                   build_loss("bce"), steps=3, lr=1e-3, batch_size=2, warmup_steps=2)  # fmt: skip
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert [h["eps_255"] for h in history] == pytest.approx([1.0, 2.0, 2.0])  # the ε curriculum, then the full budget
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("weight"))
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_adversarial_finetune_of_a_per_scene_checkpoint_uses_each_patchs_scene_statistics(tmp_path):
    from changedet.checkpoint import load_state_dict, read_metadata
    from changedet.evaluation.defence import SceneStatistics, finetune_checkpoint
    from changedet.weights import bundled_checkpoint

    stats = [Normalization.of(_norm(2)), Normalization.of({"t1": {"mean": [1.0, 2.0], "std": [2.0, 4.0]},
                                                          "t2": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}})]  # fmt: skip
    batch = SceneStatistics(stats).for_batch(torch.tensor([1, 0]))
    x, valid = torch.full((2, 2, 1, 1), 5.0), torch.ones((2, 1, 1), dtype=torch.bool)
    z = batch.apply_tensor(x, valid, 0)[:, :, 0, 0]  # sample 0 from scene 1, sample 1 from scene 0
    assert z[0].tolist() == [2.0, 0.75] and z[1].tolist() == pytest.approx([(5 - 3000) / 1500] * 2)
    out = tmp_path / "at.safetensors"
    block = finetune_checkpoint("oscd-s2", out, Path(__file__).parents[1] / "data" / "sample", ["bercy"], steps=2, batch_size=2, patch_size=32)
    meta = read_metadata(out)
    assert meta["normalization"] == "per-scene" and meta["adversarial_training"]["train_scenes"] == ["bercy"] == block["train_scenes"]
    before, after = load_state_dict(bundled_checkpoint("oscd-s2")), load_state_dict(out)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
