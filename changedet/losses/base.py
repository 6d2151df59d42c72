"""Base classes of the change losses: :class:`ChangeLoss` and the weighted sum :class:`CompositeLoss`.

Every loss module has one signature, ``loss(output: ChangeOutput, target, valid) -> scalar``:
``target`` is the change label ``(B, H, W)`` (or ``(B, 1, H, W)``) in {0, 1} and ``valid`` an
optional boolean mask of the same shape (nodata and ignored label pixels are False).
"""

from __future__ import annotations

import torch
from torch import nn

from changedet.models.output import ChangeOutput


class ChangeLoss(nn.Module):
    """Base class: ``forward(output: ChangeOutput, target (B,H,W), valid (B,H,W) | None) -> scalar``."""

    name = "loss"

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class CompositeLoss(ChangeLoss):
    """A weighted sum of named losses; :attr:`last` holds the latest value of each part (floats)."""

    name = "composite"

    def __init__(self, parts: dict[str, ChangeLoss], weights: dict[str, float]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)
        self.last: dict[str, float] = {}

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        last = {}
        for key, loss in self.parts.items():
            value = loss(output, target, valid)
            last[key] = float(value.detach())
            term = self.weights[key] * value
            total = term if total is None else total + term
        self.last = last
        return total


__all__ = ["ChangeLoss", "CompositeLoss"]
