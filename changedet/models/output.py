"""Typed model output shared by every change model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChangeOutput:
    """What every change model returns.

    Attributes:
        logits: change logits, ``(B, 1, H, W)``; ``sigmoid(logits)`` is the change probability.
        difference: per-pixel difference map ``(B, 1, H, W)`` (e.g. normalised feature distance), >= 0.
        embeddings_t1: optional per-pixel embeddings of date 1 ``(B, D, h, w)`` for metric losses.
        embeddings_t2: optional per-pixel embeddings of date 2, same shape as ``embeddings_t1``.
    """

    logits: torch.Tensor
    difference: torch.Tensor
    embeddings_t1: torch.Tensor | None = None
    embeddings_t2: torch.Tensor | None = None

    @property
    def probability(self) -> torch.Tensor:
        """Change probability ``sigmoid(logits)``."""
        return torch.sigmoid(self.logits)
