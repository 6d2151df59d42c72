"""White-box L∞ attacks (FGSM, PGD) on bi-temporal change models, evaluated on whole scenes.

Threat model: the attacker adds ``delta`` to the *raw* pixels of t1, t2 or both, with
``|delta|∞ <= eps`` in reflectance units (:mod:`changedet.evaluation.sensor`: ε = 1/255 is
10000/255 DN on Sentinel-2), never touches invalid (nodata) pixels and keeps every pixel inside
the sensor range. Normalisation (:meth:`Normalization.apply_tensor`: ``(x - mean) / std`` with the checkpoint
statistics, invalid pixels 0) happens inside the differentiable path, so the budget is physical, not in normalised units.

Modes (:data:`MODES`): untargeted on ``t1``, ``t2`` or ``both`` dates (maximise the BCE change loss
against the label), and two targeted goals on both dates: ``hide`` (push labelled changes to
no-change) and ``fake`` (push labelled no-change pixels to change). Scenes are attacked tile by
tile as an input transform of the one scene runner (:func:`attack_transform`, :func:`evaluate_attack`):
detect's tiling, normalisation and blending.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from changedet.data.scenes import IGNORE, ChangeScene
from changedet.errors import ChangeDetError
from changedet.evaluation.sensor import Sensor
from changedet.metrics import ValidationResult
from changedet.models import ChangeModel
from changedet.normalization import Normalization
from changedet.pipeline.inference import InputTransform, SceneRunner, TileBatch
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE
from changedet.pipeline.validation import evaluate_scenes

#: mode -> (goal, attacked dates)
MODES: dict[str, tuple[str, str]] = {
    "t1": ("untargeted", "t1"),
    "t2": ("untargeted", "t2"),
    "both": ("untargeted", "both"),
    "hide": ("hide", "both"),
    "fake": ("fake", "both"),
}
METHODS = ("fgsm", "pgd")


@dataclass(frozen=True)
class Attack:
    """One attack configuration.

    Attributes:
        method: ``fgsm`` (one step of size ``eps``) or ``pgd`` (``steps`` signed-gradient steps of
            ``step_size``, projected on the ε-ball and the sensor range after each step).
        eps: L∞ budget in reflectance units (e.g. ``4 / 255``).
        mode: one of :data:`MODES`.
        steps: PGD iterations.
        step_size: PGD step in reflectance units (None: ``2.5 * eps / steps``).
        random_start: PGD starts from a uniform random point of the ε-ball.
        seed: seed of the random start.
    """

    method: str = "pgd"
    eps: float = 4 / 255
    mode: str = "both"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ChangeDetError(f"unknown attack method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise ChangeDetError(f"unknown attack mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.eps < 0 or self.steps < 1:
            raise ChangeDetError(f"attack needs eps >= 0 and steps >= 1, got eps={self.eps}, steps={self.steps}")

    @property
    def goal(self) -> str:
        """``untargeted``, ``hide`` or ``fake``."""
        return MODES[self.mode][0]

    @property
    def dates(self) -> tuple[bool, bool]:
        """Whether t1 and t2 are attacked."""
        which = MODES[self.mode][1]
        return which in ("t1", "both"), which in ("t2", "both")

    @property
    def iterations(self) -> int:
        """Gradient steps (1 for FGSM)."""
        return 1 if self.method == "fgsm" else self.steps

    @property
    def alpha(self) -> float:
        """Step size in reflectance units."""
        if self.method == "fgsm":
            return self.eps
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (with ``eps_255``, the budget in 1/255 units)."""
        return {**asdict(self), "eps_255": round(self.eps * 255, 6), "goal": self.goal}


def attack_objective(logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, goal: str) -> torch.Tensor:
    """Per-tile objective the attacker maximises, ``(B,)``.

    ``untargeted``: mean BCE against the label over labelled valid pixels; ``hide``: minus the BCE
    towards no-change over labelled changes; ``fake``: minus the BCE towards change over labelled
    no-change pixels. Tiles without such pixels score 0 (no gradient).
    """
    known = valid & (label != IGNORE)
    changed = label == 1
    if goal == "untargeted":
        target, select, sign = changed.float(), known, 1.0
    elif goal == "hide":
        target, select, sign = torch.zeros_like(logits[:, 0]), known & changed, -1.0
    elif goal == "fake":
        target, select, sign = torch.ones_like(logits[:, 0]), known & ~changed, -1.0
    else:
        raise ChangeDetError(f"unknown attack goal {goal!r}")
    bce = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="none")
    weight = select.float()
    return sign * (bce * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1.0)


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters without gradients (input gradients only: about half the backward cost)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def perturb(
    model: ChangeModel,
    x1: torch.Tensor,
    x2: torch.Tensor,
    valid: torch.Tensor,
    label: torch.Tensor,
    normalization: Normalization,
    sensor: Sensor,
    attack: Attack,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial raw ``x1, x2`` for one batch (the model's train/eval mode is left as it is).

    ``x1, x2 (B, C, h, w)`` raw values, ``valid (B, h, w)`` bool, ``label (B, h, w)`` 0/1/IGNORE.
    Returns ``x + sensor.scale * delta`` with ``delta`` 0 on invalid pixels and on dates not attacked.
    """
    raws = (x1, x2)
    bounds = []
    for x, attacked in zip(raws, attack.dates):
        if not attacked:
            bounds.append(None)
            continue
        low, high = sensor.delta_bounds(x, attack.eps)
        mask = valid[:, None]
        bounds.append((torch.where(mask, low, 0.0), torch.where(mask, high, 0.0)))
    generator = torch.Generator(device=x1.device).manual_seed(attack.seed)
    deltas: list[torch.Tensor | None] = []
    for x, b in zip(raws, bounds):
        if b is None:
            deltas.append(None)
        elif attack.method == "pgd" and attack.random_start:
            start = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * attack.eps
            deltas.append(torch.minimum(torch.maximum(start, b[0]), b[1]))
        else:
            deltas.append(torch.zeros_like(x))

    def inputs(ds: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        return [x if d is None else sensor.clip_tensor(x + sensor.scale * d, x) for x, d in zip(raws, ds)]

    for _ in range(attack.iterations):
        live = [d.requires_grad_(True) if d is not None else None for d in deltas]
        a1, a2 = inputs(live)
        logits = model(normalization.apply_tensor(a1, valid, 0), normalization.apply_tensor(a2, valid, 1)).logits
        objective = attack_objective(logits, label, valid, attack.goal).sum()
        grads = torch.autograd.grad(objective, [d for d in live if d is not None])
        it = iter(grads)
        deltas = [
            None if d is None else torch.minimum(torch.maximum(d.detach() + attack.alpha * next(it).sign(), b[0]), b[1])
            for d, b in zip(live, bounds)
        ]
    a1, a2 = inputs(deltas)
    return a1.detach(), a2.detach()


def attack_transform(sensor: Sensor, attack: Attack) -> InputTransform:
    """An :data:`~changedet.pipeline.inference.InputTransform` that replaces each batch of raw tiles
    by its adversarial version (white-box, through the runner's model and normalisation)."""

    def transform(runner: SceneRunner, batch: TileBatch) -> tuple[np.ndarray, np.ndarray]:
        if batch.label is None:
            raise ChangeDetError("attacks need labelled scenes")
        device = runner.device
        t1, t2 = (torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device) for x in (batch.x1, batch.x2))
        v = torch.from_numpy(batch.valid).to(device)
        y = torch.from_numpy(batch.label.astype(np.int64)).to(device)
        with frozen(runner.model):
            a1, a2 = perturb(runner.model, t1, t2, v, y, runner.normalization, sensor, attack)
        return a1.cpu().numpy(), a2.cpu().numpy()

    return transform


def evaluate_attack(
    model: ChangeModel,
    scenes: Sequence[ChangeScene],
    normalization: Normalization | dict[str, Any],
    sensor: Sensor,
    attack: Attack,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> ValidationResult:
    """Attack every tile of every labelled scene (detect's tiling, normalisation and blending, through
    the one scene runner) and collect the per-scene probability histograms (metrics at any threshold:
    :meth:`ValidationResult.metrics`)."""
    transform = attack_transform(sensor, attack)
    return evaluate_scenes(model, scenes, normalization, tile, overlap, batch_size, device, progress=progress, transform=transform)
