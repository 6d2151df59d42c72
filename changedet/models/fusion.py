"""Fusion of the two dates' features at one pyramid level, and the per-pixel feature distance."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from changedet.errors import ModelError

FusionMode = Literal["diff", "absdiff", "concat", "sqdiff", "symmetric"]
#: Fusion modes: ``diff`` t2 - t1, ``absdiff`` |t1 - t2|, ``concat`` [t1, t2], ``sqdiff`` (t1 - t2)^2,
#: ``symmetric`` [|t1 - t2|, t1 + t2] (order-invariant, keeps both the change and the context).
FUSIONS: tuple[str, ...] = get_args(FusionMode)
_SYMMETRIC = frozenset({"absdiff", "sqdiff", "symmetric"})
_DOUBLING = frozenset({"concat", "symmetric"})


class Fusion(nn.Module):
    """Parameter-free fusion ``(a, b) -> fused`` of date-1 and date-2 features of one level."""

    def __init__(self, mode: str = "absdiff") -> None:
        super().__init__()
        if mode not in FUSIONS:
            raise ModelError(f"unknown fusion {mode!r}; use one of {', '.join(FUSIONS)}")
        self.mode = mode

    @property
    def symmetric(self) -> bool:
        """True when swapping the dates gives the same fused features."""
        return self.mode in _SYMMETRIC

    def out_channels(self, channels: int) -> int:
        """Channels of the fused features for ``channels``-channel inputs."""
        return 2 * channels if self.mode in _DOUBLING else channels

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.mode == "diff":
            return b - a
        if self.mode == "absdiff":
            return (a - b).abs()
        if self.mode == "sqdiff":
            return (a - b).square()
        if self.mode == "concat":
            return torch.cat([a, b], dim=1)
        return torch.cat([(a - b).abs(), a + b], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def feature_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-pixel distance ``(B, 1, h, w)`` in [0, 1] between feature maps ``(B, D, h, w)``.

    Half the L2 distance of the L2-normalised feature vectors, i.e. ``sqrt((1 - cos) / 2)``:
    exactly 0 for identical vectors (zero vectors included), 1 for opposite ones.
    """
    diff = F.normalize(a, dim=1, eps=eps) - F.normalize(b, dim=1, eps=eps)
    return torch.linalg.vector_norm(diff, dim=1, keepdim=True) / 2
