"""Test-time combinations of change models: dihedral test-time augmentation and ensembles.

Both average change *probabilities* (and difference maps) and return the logit of the average, so a
combined model is a :class:`ChangeModel` like any other: it runs through the one scene runner, on
either runtime, and its ``sigmoid(logits)`` is the averaged probability.

* :class:`DihedralTTA` (``changedet detect --tta dihedral``): the 8 flips/rotations of the square
  (the dihedral group D4) applied to both dates, each prediction mapped back, averaged. The result is
  equivariant under those 8 transforms; for a model that already is (a per-pixel one) it is a no-op.
* ``ensemble`` (registry name; bundled ensembles are checkpoints with ``model: ensemble``): members
  built from ``members: [{model, config}, …]`` with one normalisation, their probabilities averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from changedet.models.base import ChangeModel
from changedet.models.output import ChangeOutput
from changedet.models.registry import create_model, register_model

DIHEDRAL = 8
DEFAULT_MEMBERS = [{"model": "fc-siam-diff", "config": {"base_channels": 8}}] * 2
LOGIT_EPS = 1e-7  # probabilities are clamped to [eps, 1 - eps] before the logit of their average


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` (0-7) of D4 on the last two axes: ``k % 4`` quarter turns, then a left-right flip if ``k >= 4``."""
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if k >= 4 else y


def undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`dihedral` ``k``."""
    if k >= 4:
        y = torch.flip(y, dims=(-1,))
    return torch.rot90(y, -(k % 4), dims=(-2, -1))


def average_outputs(outputs: Sequence[ChangeOutput]) -> ChangeOutput:
    """One output whose probability and difference are the means of ``outputs``'."""
    prob = torch.stack([torch.sigmoid(o.logits.float()) for o in outputs]).mean(0)
    diff = torch.stack([o.difference.float() for o in outputs]).mean(0)
    return ChangeOutput(torch.logit(prob.clamp(LOGIT_EPS, 1 - LOGIT_EPS)), diff)


class DihedralTTA(ChangeModel):
    """``model`` averaged over the 8 dihedral transforms of its input tiles (see the module docstring)."""

    def __init__(self, model: ChangeModel) -> None:
        super().__init__()
        self.model = model
        self.in_channels = model.in_channels
        self.weights_shared = model.weights_shared
        self.needs_scene_fit = model.needs_scene_fit

    @property
    def min_input_size(self) -> int:
        """The wrapped model's."""
        return self.model.min_input_size

    def fit_view(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The wrapped model's."""
        return self.model.fit_view(x1, x2, valid)

    def fit_scene(self, t1: torch.Tensor, t2: torch.Tensor, valid: torch.Tensor) -> None:
        """The wrapped model's scene fit (pixel samples are orientation-free)."""
        self.model.fit_scene(t1, t2, valid)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        """Mean of ``undo(model(g t1, g t2))`` over the 8 transforms ``g``."""
        outs = []
        for k in range(DIHEDRAL):
            out = self.model(dihedral(t1, k), dihedral(t2, k))
            outs.append(ChangeOutput(undo_dihedral(out.logits, k), undo_dihedral(out.difference, k)))
        return average_outputs(outs)


class Ensemble(ChangeModel):
    """Members with the same inputs, their probabilities averaged (``state_dict`` keys ``members.<i>.…``)."""

    def __init__(self, members: Sequence[ChangeModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if len({m.in_channels for m in members}) != 1:
            raise ValueError(f"ensemble members take different inputs: {[m.in_channels for m in members]}")
        self.members = nn.ModuleList(members)
        self.in_channels = members[0].in_channels
        self.weights_shared = all(m.weights_shared for m in members)

    @property
    def min_input_size(self) -> int:
        """The largest of the members'."""
        return max(m.min_input_size for m in self.members)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        """Mean probability and difference of the members."""
        return average_outputs([m(t1, t2) for m in self.members])


@register_model("ensemble", family="ensemble")
def ensemble(members: list[dict[str, Any]] | None = None, in_channels: int | tuple[int, int] = 3) -> ChangeModel:
    """Average of trained members ``[{model: name, config: {…}}, …]`` (checkpoints with ``model: ensemble``;
    default: two FC-Siam-diff with 8 base channels)."""
    members = DEFAULT_MEMBERS if members is None else members
    if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("model"), str) for m in members):
        raise ValueError("ensemble members must be a list of {model: name, config: {...}}")
    return Ensemble([create_model(m["model"], in_channels=in_channels, **m.get("config", {})) for m in members])
