"""Adversarial fine-tuning (PGD-AT) of a trained change model.

Each step attacks the batch with :func:`~changedet.evaluation.adversarial.perturb` (model in eval
mode, parameters frozen: the attacker of the evaluation), then trains on
``clean_weight * L(clean) + (1 - clean_weight) * L(adversarial)`` (Madry et al. 2018 with a clean
term, which keeps clean accuracy). An ε curriculum (``warmup_steps``) grows the attack's budget
linearly from ``eps / warmup_steps`` to ``eps`` over the first steps, so the model is not thrown at
the full budget before it has learnt anything robust (Cai et al. 2018, "Curriculum adversarial training"). Patches are raw values from a
:class:`~changedet.data.datasets.PatchDataset` built with ``normalization=None`` and normalised
inside the differentiable path, as in the evaluation. A per-scene checkpoint standardises each patch with
the statistics of the scene it was cut from (:class:`SceneStatistics`), as detect standardises a scene.
The step is an :class:`AdversarialObjective` of the one :class:`~changedet.train.trainer.Trainer`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from changedet.checkpoint import save_checkpoint
from changedet.data.augment import PairedAugment
from changedet.data.datasets import PatchDataset
from changedet.data.scenes import IGNORE
from changedet.errors import ChangeDetError
from changedet.evaluation.adversarial import (
    Attack,
    frozen,
    perturb,
)
from changedet.evaluation.loading import load_model, open_labelled_scenes
from changedet.evaluation.sensor import Sensor, scene_sensor
from changedet.losses import ChangeLoss, build_loss
from changedet.models import ChangeModel
from changedet.normalization import Normalization
from changedet.train.config import TrainSettings
from changedet.pipeline.validation import evaluate_scenes
from changedet.train.objectives import Batch, Objective, StepContext, loss_name
from changedet.train.trainer import Trainer


@dataclass(frozen=True)
class _BatchStatistics:
    """Per-sample ``(B, C)`` means and stds of both dates, applied like :meth:`Normalization.apply_tensor`."""

    mean: tuple[torch.Tensor, torch.Tensor]
    std: tuple[torch.Tensor, torch.Tensor]

    def apply_tensor(self, x: torch.Tensor, valid: torch.Tensor, date: int) -> torch.Tensor:
        mean, std = (v[date].to(x.device).reshape(x.shape[0], -1, 1, 1) for v in (self.mean, self.std))
        return torch.where(valid[:, None], (x - mean) / std, 0.0)


class SceneStatistics:
    """The per-scene rule over the scenes of a :class:`~changedet.data.datasets.PatchDataset`: every
    patch of a batch standardised with its own scene's statistics (``batch["scene"]`` indexes them)."""

    def __init__(self, per_scene: Sequence[Normalization]) -> None:
        stacked = [[np.stack(arrays) for arrays in zip(*(n.arrays(d) for n in per_scene))] for d in (0, 1)]
        self.mean = tuple(torch.from_numpy(stacked[d][0]) for d in (0, 1))
        self.std = tuple(torch.from_numpy(stacked[d][1]) for d in (0, 1))

    def for_batch(self, scenes: torch.Tensor) -> _BatchStatistics:
        """The statistics of each sample of a batch drawn from scenes ``scenes (B,)``."""
        index = scenes.long().cpu()
        return _BatchStatistics(tuple(m[index] for m in self.mean), tuple(s[index] for s in self.std))


class AdversarialObjective(Objective):
    """PGD-AT step of :class:`~changedet.train.trainer.Trainer`: attack the raw batch, then train on
    ``clean_weight * L(clean) + (1 - clean_weight) * L(adversarial)``; logs both terms and the budget.
    Step ``i`` (from 0) attacks with ``attack.eps * min(1, (i + 1) / warmup_steps)``."""

    name = "pgd-at"

    def __init__(
        self, normalization: Normalization | SceneStatistics | dict[str, Any], sensor: Sensor, attack: Attack, loss: ChangeLoss,
        clean_weight: float = 0.5, warmup_steps: int = 0,
    ) -> None:
        self.normalization = normalization if isinstance(normalization, SceneStatistics) else Normalization.of(normalization)
        self.sensor = sensor
        self.attack = attack
        self.loss = loss
        self.clean_weight = clean_weight
        self.warmup_steps = warmup_steps
        self.steps_done = 0

    def budget(self) -> float:
        """The ε of the next step (the curriculum)."""
        return self.attack.eps * min(1.0, (self.steps_done + 1) / self.warmup_steps) if self.warmup_steps > 0 else self.attack.eps

    def _statistics(self, batch: Batch) -> Normalization | _BatchStatistics:
        norm = self.normalization
        return norm.for_batch(batch["scene"]) if isinstance(norm, SceneStatistics) else norm

    def _loss(self, model: ChangeModel, x1: torch.Tensor, x2: torch.Tensor, batch: Batch, ctx: StepContext) -> torch.Tensor:
        """The loss of raw ``x1, x2``, normalised inside the differentiable path."""
        valid, norm = batch["valid"], self._statistics(batch)
        with ctx.autocast():
            output = model(norm.apply_tensor(x1, valid, 0), norm.apply_tensor(x2, valid, 1))
        return self.loss(output, batch["target"], valid)

    def step(self, model: ChangeModel, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Attack with the model in eval mode and frozen (as the evaluation does), train on both terms."""
        x1, x2, target, valid = (batch[k] for k in ("t1", "t2", "target", "valid"))
        label = torch.where(valid, target.long(), IGNORE)
        eps = self.budget()
        model.eval()
        with frozen(model):
            a1, a2 = perturb(model, x1, x2, valid, label, self._statistics(batch), self.sensor, replace(self.attack, eps=eps))
        model.train()
        self.steps_done += 1
        clean = self._loss(model, x1, x2, batch, ctx)
        adversarial = self._loss(model, a1, a2, batch, ctx)
        total = self.clean_weight * clean + (1 - self.clean_weight) * adversarial
        return total, {"clean": float(clean.detach()), "adversarial": float(adversarial.detach()), "eps_255": eps * 255}

    def describe(self) -> dict[str, Any]:
        """Loss, attack, clean weight and curriculum."""
        return {"loss": loss_name(self.loss), "attack": self.attack.to_dict(), "clean_weight": self.clean_weight,
                "warmup_steps": self.warmup_steps}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The curriculum's position."""
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the curriculum where it stopped."""
        self.steps_done = int(state.get("steps_done", 0))


def adversarial_finetune(
    model: ChangeModel,
    data: PatchDataset,
    normalization: Normalization | SceneStatistics | dict[str, Any],
    sensor: Sensor,
    attack: Attack,
    loss: ChangeLoss,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    clean_weight: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float], None] | None = None,
    warmup_steps: int = 0,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place for ``steps`` optimiser steps; returns the per-step losses.

    :class:`AdversarialObjective` in the :class:`~changedet.train.trainer.Trainer`: AdamW (torch's
    default weight decay 0.01) at a constant ``lr``, as many epochs of ``data`` as ``steps`` needs.
    ``progress(step, loss)`` is called after every step.
    """
    if data.normalization is not None:
        raise ChangeDetError("adversarial fine-tuning needs raw patches: build the PatchDataset with normalization=None")
    per_epoch = len(data) // batch_size
    if not per_epoch:
        raise ChangeDetError(f"adversarial fine-tuning needs at least batch_size ({batch_size}) patches, not {len(data)}")
    settings = TrainSettings(
        epochs=math.ceil(steps / per_epoch), max_steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01,
        scheduler="constant", seed=seed, device=str(device), amp=False, progress=False, resume=False,
    )  # fmt: skip
    history: list[dict[str, float]] = []

    def record(step: int, value: float, parts: dict[str, float]) -> None:
        history.append({"loss": value, **parts})
        if progress:
            progress(step, value)

    objective = AdversarialObjective(normalization, sensor, attack, loss, clean_weight, warmup_steps)
    Trainer(model, type(model).__name__, {}, objective, data, settings=settings, on_step=record).fit()
    model.to(device).eval()
    return history


def finetune_checkpoint(
    source: str,
    out: str | Path,
    data_root: str | Path,
    train_scenes: Sequence[str] | None = None,
    attack: Attack | None = None,
    steps: int = 200,
    lr: float = 1e-4,
    patch_size: int = 96,
    batch_size: int = 8,
    clean_weight: float = 0.5,
    loss: str = "bce+dice",
    loss_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[int, float], None] | None = None,
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """PGD-AT from checkpoint ``source`` on its training scenes (``split.train`` unless given); writes ``out``.

    The new threshold is tuned on the *training* scenes (clean), never on validation scenes.
    Returns the ``adversarial_training`` block stored in the new checkpoint's metadata.
    """
    start = time.perf_counter()
    loaded = load_model(source, device)
    names = list(train_scenes or (loaded.spec.metadata.get("split") or {}).get("train") or [])
    if not names:
        raise ChangeDetError(f"{source} records no training scenes: pass train_scenes")
    scenes = open_labelled_scenes(data_root, names, loaded.bands)
    attack = attack or Attack("pgd", 4 / 255, "both", steps=3)
    augment = PairedAugment(gain=0.0, offset=0.0, noise=0.0, swap=0.5 if loaded.bands[0] == loaded.bands[1] else 0.0)
    data = PatchDataset(scenes, patch_size, None, augment, length=steps * batch_size, change_fraction=0.5, seed=seed)
    criterion = build_loss(loss, **({"pos_weight": 5.0} if loss_kwargs is None else loss_kwargs))
    model = loaded.model
    rule = Normalization.of(loaded.normalization)
    norm = SceneStatistics([rule.for_scene(s.read, *s.shape, s.name) for s in scenes]) if rule.per_scene else rule
    history = adversarial_finetune(
        model, data, norm, scene_sensor(scenes[0]), attack, criterion, steps, lr, batch_size,
        clean_weight, seed, device, progress, warmup_steps,
    )  # fmt: skip
    threshold = evaluate_scenes(model, scenes, loaded.normalization, device=device).tune_threshold()
    block = {
        "method": "pgd-at",
        "source": str(loaded.spec.checkpoint),
        "attack": attack.to_dict(),
        "steps": steps, "lr": lr, "patch_size": patch_size, "batch_size": batch_size, "clean_weight": clean_weight,
        "warmup_steps": warmup_steps, "loss": loss, "train_scenes": names, "threshold_tuned_on": "training scenes (clean)",
        "final_loss": history[-1] if history else None, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    meta = {**loaded.spec.metadata, "threshold": threshold, "metrics": None, "adversarial_training": block}
    save_checkpoint(out, model, meta)
    return block
