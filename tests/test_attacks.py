"""Attack algorithms: APGD's checkpoints, every method inside the budget and the sensor range, restarts
never lose a tile's successes, the square attack needs no gradient and exposes a gradient-masking model,
and the robustness stage's sanity table flags what it should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from changedet.evaluation.adversarial import METHODS, MODES, Attack, attack_objective, attack_success, frozen, perturb
from changedet.evaluation.attacks import apgd_checkpoints, square_window_fraction
from changedet.evaluation.sensor import Sensor
from changedet.evaluation.stages.robustness import NOISE, RobustnessConfig, sanity_rows
from changedet.models import create_model
from changedet.normalization import Normalization

SCALE = 10000.0


def _batch(seed: int = 0, size: int = 32):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.rand((2, 3, size, size), generator=gen) * 12000  # some pixels above reflectance 1
    x2 = torch.rand((2, 3, size, size), generator=gen) * 12000
    x1[:, :, :2] = 0.0
    valid = torch.ones((2, size, size), dtype=torch.bool)
    valid[:, 10:14, 5:20] = False
    x2[:, :, 10:14, 5:20] = 65535.0  # nodata that must not move
    label = (torch.rand((2, size, size), generator=gen) > 0.8).long()
    return x1, x2, valid, label


def _model():
    torch.manual_seed(0)
    return create_model("fc-siam-diff", in_channels=3, base_channels=4).eval()


STATS = Normalization.of({"t1": {"mean": [3000.0] * 3, "std": [1500.0] * 3}, "t2": {"mean": [3000.0] * 3, "std": [1500.0] * 3}})


def _attacked(model, x1, x2, valid, label, attack: Attack) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: the successes and the margin objective after ``attack``."""
    with frozen(model):
        a1, a2 = perturb(model, x1, x2, valid, label, STATS, Sensor(SCALE), attack)
    with torch.no_grad():
        logits = model(STATS.apply_tensor(a1, valid, 0), STATS.apply_tensor(a2, valid, 1)).logits
    return attack_success(logits, label, valid, attack.goal), attack_objective(logits, label, valid, attack.goal, "margin")


def _success(model, x1, x2, valid, label, attack: Attack) -> torch.Tensor:
    return _attacked(model, x1, x2, valid, label, attack)[0]


def test_apgd_checkpoints_follow_the_paper_schedule():
    for n in (10, 50, 100, 1000):
        w = apgd_checkpoints(n)
        assert w[0] == math.ceil(0.22 * n) and w == sorted(set(w)) and w[-1] <= n
        gaps = np.diff([0, *w])
        assert all(g >= 0.06 * n - 1 for g in gaps)  # never shorter than 6 % of the budget (rounding)
    assert square_window_fraction(0.05, 0, 1000) == 0.05
    assert square_window_fraction(0.05, 999, 1000) == pytest.approx(0.05 / 2**9)  # 8000 < it <= 10000: p_init / 512


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_stays_in_budget_range_and_valid_mask(method):
    x1, x2, valid, label = _batch()
    model, eps = _model(), 8 / 255
    for mode in MODES:
        attack = Attack(method, eps, mode, steps=3, step_size=4 / 255, random_start=True, restarts=2, queries=20)
        with frozen(model):
            a1, a2 = perturb(model, x1, x2, valid, label, STATS, Sensor(SCALE), attack)
        for a, x, attacked in zip((a1, a2), (x1, x2), attack.dates):
            change = (a - x).abs()
            assert float(change.max()) <= eps * SCALE + 1e-2
            assert torch.equal(a[:, :, ~valid[0]], x[:, :, ~valid[0]])
            assert bool((a >= torch.clamp(x, max=0.0)).all()) and bool((a <= torch.clamp(x, min=SCALE)).all())
            assert (float(change.max()) > 0) == attacked


@pytest.mark.parametrize("method", ["pgd", "apgd-ce", "apgd-margin", "square"])
def test_more_restarts_never_lose_a_tiles_successes(method):
    x1, x2, valid, label = _batch(1)
    model = _model()
    one = _success(model, x1, x2, valid, label, Attack(method, 2 / 255, "both", steps=3, queries=15))
    three = _success(model, x1, x2, valid, label, Attack(method, 2 / 255, "both", steps=3, queries=15, restarts=3))
    assert bool((three >= one).all())


def test_attacks_raise_their_objective_and_apgd_beats_no_attack():
    x1, x2, valid, label = _batch(2)
    model = _model()
    with torch.no_grad():
        clean = attack_objective(model(STATS.apply_tensor(x1, valid, 0), STATS.apply_tensor(x2, valid, 1)).logits, label, valid, "untargeted", "margin")
    for method in ("apgd-margin", "square"):
        attack = Attack(method, 4 / 255, "both", steps=10, queries=60)
        with frozen(model):
            a1, a2 = perturb(model, x1, x2, valid, label, STATS, Sensor(SCALE), attack)
        with torch.no_grad():
            logits = model(STATS.apply_tensor(a1, valid, 0), STATS.apply_tensor(a2, valid, 1)).logits
        assert bool((attack_objective(logits, label, valid, "untargeted", "margin") > clean).all()), method


class _Quantised(torch.nn.Module):
    """A model that masks its gradients: inputs rounded (zero gradient almost everywhere)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, t1, t2):
        return self.model(torch.round(t1 * 8) / 8, torch.round(t2 * 8) / 8)


def test_square_exposes_a_gradient_masking_model_that_white_box_attacks_cannot_move():
    x1, x2, valid, label = _batch(3)
    masked = _Quantised(_model()).eval()
    clean = _attacked(masked, x1, x2, valid, label, Attack("fgsm", 0.0, "both"))[1]
    white = _attacked(masked, x1, x2, valid, label, Attack("apgd-margin", 8 / 255, "both", steps=5))[1]
    black = _attacked(masked, x1, x2, valid, label, Attack("square", 8 / 255, "both", queries=40))[1]
    assert torch.equal(white, clean)  # no gradient, no move
    assert bool((black > clean).all())


def test_sanity_table_flags_rises_and_black_box_wins():
    from changedet.evaluation.stages import get_stage

    cfg = RobustnessConfig(data="x", methods=["pgd", "square"], modes=["both"], eps=[0, 1, 2], steps=[10, 5], restarts=[3, 1], queries=50)
    settings = get_stage("robustness").settings(cfg)
    assert len(settings) == 1 + 2 * 2 * 2 + 2  # clean, pgd per (steps, restarts, ε), square per ε
    assert {(s["steps"], s["restarts"]) for s in settings if s["method"] == "pgd"} == {(5, 1), (5, 3), (10, 1), (10, 3)}
    assert {(s["steps"], s["restarts"]) for s in settings if s["method"] == "square"} == {(50, 1)}

    def row(method, steps, restarts, f1):
        return {"checkpoint": "m", "method": method, "mode": "both", "eps_255": 1.0, "steps": steps, "restarts": restarts, "f1": f1}

    report = {"checkpoints": ["m"], "rows": [
        {"checkpoint": "m", "method": "clean", "mode": "clean", "eps_255": 0.0, "steps": 0, "restarts": 0, "f1": 0.5},
        row("pgd", 5, 1, 0.30), row("pgd", 10, 1, 0.25), row("pgd", 5, 3, 0.28), row("pgd", 10, 3, 0.24), row("square", 500, 1, 0.27),
    ]}  # fmt: skip
    (ok,) = sanity_rows(report)
    assert ok[-1] == "ok" and ok[5] == "pgd 10×3: 0.2400"
    report["rows"][-1]["f1"] = 0.24 - 2 * NOISE  # the black-box attack beats every white-box one
    report["rows"][3]["f1"] = 0.30 + 2 * NOISE  # more restarts made F1 rise
    (bad,) = sanity_rows(report)
    assert "black-box beats white-box" in bad[-1] and "rises with more restarts" in bad[-1]
