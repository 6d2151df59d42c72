"""L∞ attacks on bi-temporal change models (FGSM, PGD, APGD, Square), evaluated on whole scenes.

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

Methods (:data:`METHODS`; the algorithms are in :mod:`changedet.evaluation.attacks`): ``fgsm``,
``pgd`` (white-box, on the BCE objective), ``apgd-ce`` / ``apgd-margin`` (APGD's adaptive step with
momentum, on the BCE or on the capped margin objective, :func:`attack_objective`) and ``square``
(score-based black-box, margin objective: it sees the model's outputs only). ``restarts > 1`` runs
the attack again from random points of the ε-ball (seeds ``seed + r``; the first run starts where a
single run starts) and keeps, per tile, the run with the most pixels on the attacker's side of the
0.5 threshold (:func:`attack_success`), ties broken by the objective: more restarts never lose a
tile's successes.
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
from changedet.evaluation.attacks import Bounds, Score, pick, apgd, pgd, project, square
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
#: method -> objective it maximises
METHODS: dict[str, str] = {"fgsm": "ce", "pgd": "ce", "apgd-ce": "ce", "apgd-margin": "margin", "square": "margin"}
#: the margin objective stops rewarding a pixel once its logit is this far on the attacker's side
MARGIN_CAP = 2.0


@dataclass(frozen=True)
class Attack:
    """One attack configuration.

    Attributes:
        method: one of :data:`METHODS`: ``fgsm`` (one step of size ``eps``), ``pgd`` (``steps``
            signed-gradient steps of ``step_size``, projected on the ε-ball and the sensor range after
            each step), ``apgd-ce``/``apgd-margin`` (``steps`` APGD steps) or ``square`` (``queries``
            model evaluations, no gradients).
        eps: L∞ budget in reflectance units (e.g. ``4 / 255``).
        mode: one of :data:`MODES`.
        steps: PGD iterations.
        step_size: PGD step in reflectance units (None: ``2.5 * eps / steps``).
        random_start: PGD/APGD start from a uniform random point of the ε-ball.
        seed: seed of the random start (restart ``r`` uses ``seed + r``).
        restarts: runs per tile, the most successful kept (FGSM: always 1).
        queries: Square attack's query budget.
    """

    method: str = "pgd"
    eps: float = 4 / 255
    mode: str = "both"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = False
    seed: int = 0
    restarts: int = 1
    queries: int = 500

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ChangeDetError(f"unknown attack method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise ChangeDetError(f"unknown attack mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.eps < 0 or self.steps < 1 or self.restarts < 1 or self.queries < 1:
            raise ChangeDetError(
                f"attack needs eps >= 0 and steps, restarts, queries >= 1, got eps={self.eps}, steps={self.steps}, "
                f"restarts={self.restarts}, queries={self.queries}"
            )

    @property
    def loss(self) -> str:
        """The objective the method maximises: ``ce`` or ``margin``."""
        return METHODS[self.method]

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


def _goal_terms(label: torch.Tensor, valid: torch.Tensor, goal: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(target, attacked pixels, sign)``: the BCE target, the pixels the goal counts and +1 when the
    attacker moves away from the target (untargeted), -1 when towards it."""
    known = valid & (label != IGNORE)
    changed = label == 1
    if goal == "untargeted":
        target, select, sign = changed.float(), known, 1.0
    elif goal == "hide":
        target, select, sign = torch.zeros_like(like), known & changed, -1.0
    elif goal == "fake":
        target, select, sign = torch.ones_like(like), known & ~changed, -1.0
    else:
        raise ChangeDetError(f"unknown attack goal {goal!r}")
    return target, select, sign


def attack_objective(logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, goal: str, loss: str = "ce") -> torch.Tensor:
    """Per-tile objective the attacker maximises, ``(B,)``: a mean over the goal's pixels.

    ``ce`` — ``untargeted``: the BCE against the label over labelled valid pixels; ``hide``: minus
    the BCE towards no-change over labelled changes; ``fake``: minus the BCE towards change over
    labelled no-change pixels. ``margin`` — the logit ``z`` signed towards the attacker's side,
    ``min(-(2y - 1) z, MARGIN_CAP)`` untargeted and ``min((2t - 1) z, MARGIN_CAP)`` towards a target
    ``t``: bounded, so pixels already flipped by the cap stop drawing the attack. Tiles without such
    pixels score 0 (no gradient).
    """
    z = logits[:, 0].float()
    target, select, sign = _goal_terms(label, valid, goal, z)
    if loss == "ce":
        values = sign * F.binary_cross_entropy_with_logits(z, target, reduction="none")
    elif loss == "margin":
        values = (-sign * (2 * target - 1) * z).clamp(max=MARGIN_CAP)
    else:
        raise ChangeDetError(f"unknown attack loss {loss!r}; choose ce or margin")
    weight = select.float()
    return (values * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1.0)


def attack_success(logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, goal: str) -> torch.Tensor:
    """Per tile, the goal's pixels on the attacker's side of the 0.5 threshold, ``(B,)``."""
    z = logits[:, 0].float()
    target, select, sign = _goal_terms(label, valid, goal, z)
    return ((-sign * (2 * target - 1) * z > 0) & select).sum((1, 2))


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
    attacked = [i for i, on in enumerate(attack.dates) if on]
    bounds = []
    for i in attacked:
        low, high = sensor.delta_bounds(raws[i], attack.eps)
        mask = valid[:, None]
        bounds.append((torch.where(mask, low, 0.0), torch.where(mask, high, 0.0)))

    def inputs(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = list(raws)
        for i, d in zip(attacked, deltas):
            out[i] = sensor.clip_tensor(raws[i] + sensor.scale * d, raws[i])
        return out

    def logits_of(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        a1, a2 = inputs(deltas)
        return model(normalization.apply_tensor(a1, valid, 0), normalization.apply_tensor(a2, valid, 1)).logits

    def score(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
        return attack_objective(logits_of(deltas), label, valid, attack.goal, attack.loss)

    def merit(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = logits_of(deltas)
        return (attack_success(logits, label, valid, attack.goal).double(),
                attack_objective(logits, label, valid, attack.goal, attack.loss).double())  # fmt: skip

    runs = 1 if attack.method == "fgsm" else attack.restarts
    best = _run(attack, score, bounds, torch.Generator().manual_seed(attack.seed), attack.random_start)
    best_merit = merit(best) if runs > 1 else None  # one run: nothing to compare, no extra forward
    for r in range(1, runs):
        deltas = _run(attack, score, bounds, torch.Generator().manual_seed(attack.seed + r), random_start=True)
        new = merit(deltas)
        take = (new[0] > best_merit[0]) | ((new[0] == best_merit[0]) & (new[1] > best_merit[1]))
        best = pick(take, deltas, best)
        best_merit = tuple(torch.where(take, m, b) for m, b in zip(new, best_merit))
    a1, a2 = inputs(best)
    return a1.detach(), a2.detach()


def _run(attack: Attack, score: Score, bounds: Bounds, generator: torch.Generator, random_start: bool) -> list[torch.Tensor]:
    """One run of the attack's algorithm from zero or from a random point of the ε-ball."""
    if attack.method == "square":
        return square(score, bounds, attack.eps, attack.queries, generator)
    start = [torch.zeros_like(low) for low, _ in bounds]
    if random_start and attack.method != "fgsm":
        noise = [(torch.rand(low.shape, generator=generator) * 2 - 1).to(low) * attack.eps for low, _ in bounds]
        start = project(noise, bounds)
    if attack.method.startswith("apgd"):
        return apgd(score, start, bounds, attack.eps, attack.steps)
    return pgd(score, start, bounds, attack.iterations, attack.alpha)


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
