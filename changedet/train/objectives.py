"""What a training step minimises: the :class:`Objective` protocol of :class:`~changedet.train.trainer.Trainer`.

The Trainer owns the loop (data loading, device, AMP, optimiser and schedule, gradient clipping,
EMA, checkpoints, resume, validation, early stopping, history, progress); an objective owns only
the step: ``step(model, batch, ctx) -> (loss, parts)``. Objectives:

* :class:`SupervisedObjective` — a :class:`~changedet.losses.ChangeLoss` on the model output
  (supervised change detection; with :class:`~changedet.losses.CrossModalLoss`, cross-modal
  representation learning, see :func:`~changedet.train.crossmodal.train_cross_modal`);
* :class:`~changedet.train.simsiam.SimSiamObjective` — self-supervised encoder pretraining;
* :class:`~changedet.evaluation.defence.AdversarialObjective` — PGD adversarial fine-tuning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from changedet.losses import ChangeLoss, CompositeLoss
from changedet.models import ChangeModel

#: A batch of :func:`~changedet.data.datasets.collate_patches` (``t1``, ``t2``, ``target``, ``valid``), on the device.
Batch = dict[str, Any]


@dataclass(frozen=True)
class StepContext:
    """Where a step runs: the device and whether mixed precision is on."""

    device: torch.device
    amp: bool

    def autocast(self) -> AbstractContextManager[Any]:
        """The autocast context for forward passes (a no-op without AMP)."""
        return torch.autocast(self.device.type, enabled=self.amp)


class Objective(ABC):
    """One training step's loss. Only :meth:`step` is required; the other hooks have neutral defaults."""

    #: short name (progress bars, and the ``loss`` of the checkpoint's training metadata by default)
    name = "objective"

    def setup(self, device: torch.device) -> None:
        """Move the objective's own modules and tensors to ``device`` (called once, before :meth:`param_groups`)."""

    def param_groups(self, model: ChangeModel) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (default: the trainable parameters of ``model``).

        A group with ``"fixed_lr": True`` keeps its learning rate out of the schedule.
        """
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    @abstractmethod
    def step(self, model: ChangeModel, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of ``batch`` (the Trainer back-propagates it) and named floats averaged per epoch
        into the history's ``loss_parts``. Forward passes belong in ``ctx.autocast()``."""

    def epoch_metrics(self) -> dict[str, Any]:
        """Extra history fields at the end of an epoch (e.g. statistics gathered by :meth:`step`)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the checkpoint's training metadata records about the objective."""
        return {"loss": self.name}

    def state_dict(self) -> dict[str, Any]:
        """State besides the model and optimiser that a resumed run needs (tensors, numbers; saved with the optimiser)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class SupervisedObjective(Objective):
    """``loss(model(t1, t2), target, valid)``; the parts of a :class:`~changedet.losses.CompositeLoss` are logged."""

    name = "supervised"

    def __init__(self, loss: ChangeLoss) -> None:
        self.loss = loss

    def step(self, model: ChangeModel, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward in autocast, the loss in full precision."""
        with ctx.autocast():
            output = model(batch["t1"], batch["t2"])
        loss = self.loss(output, batch["target"], batch["valid"])
        return loss, dict(getattr(self.loss, "last", {}))

    def describe(self) -> dict[str, Any]:
        """The loss name."""
        return {"loss": loss_name(self.loss)}


def loss_name(loss: ChangeLoss) -> str:
    """The name of ``loss`` (e.g. ``bce+0.5*dice`` for a composite loss)."""
    if isinstance(loss, CompositeLoss):
        return "+".join(f"{w:g}*{k}" if w != 1 else k for k, w in loss.weights.items())
    return getattr(loss, "name", type(loss).__name__)


def as_objective(objective: Objective | ChangeLoss) -> Objective:
    """``objective`` itself, or a :class:`SupervisedObjective` of a loss."""
    return objective if isinstance(objective, Objective) else SupervisedObjective(objective)
