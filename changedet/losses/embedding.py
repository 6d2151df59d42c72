"""Metric losses on bi-temporal pixel embeddings: sampling and the ``triplet``, ``quadruplet``, ``crossmodal`` modules.

:func:`pair_embedding_samples` turns the embeddings of ``K`` sampled locations of date 1 and
date 2 into ``2K`` points; a location's two embeddings share an identity label when it is
unchanged and get two different labels when it changed. A triplet then pulls together the two
dates of an unchanged pixel and pushes away other points (in particular the other date of a
changed pixel); the quadruplet's second term asks every unchanged pair to be closer than any pair
of points with two other labels (e.g. both dates of a changed pixel).

Cross-modal representation learning (``crossmodal``, for pseudo-Siamese encoders of two
modalities): the same sampled identities, with *other locations* as negatives. Online mining
(:func:`~changedet.losses.metric.mine_triplets`, hard negatives by default) picks for every
location's date-1 and date-2 embedding its cross-date positive and its hardest negative;
:func:`~changedet.losses.metric.cross_modal_contrastive_loss` applies
:func:`~changedet.losses.pixel.contrastive_loss` to those positive and negative pairs and
:func:`~changedet.losses.metric.triplet_loss` is added on the same sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from changedet.losses.base import ChangeLoss
from changedet.losses.metric import MINING_STRATEGIES, cross_modal_contrastive_loss, quadruplet_loss, triplet_loss
from changedet.losses.registry import register_loss
from changedet.models.output import ChangeOutput


def pair_embedding_samples(
    embeddings_t1: torch.Tensor,
    embeddings_t2: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    max_per_class: int = 64,
    generator: torch.Generator | None = None,
    patch: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample pixel (or patch) embeddings of both dates with identity labels for triplet/quadruplet losses.

    Args:
        embeddings_t1, embeddings_t2: ``(B, D, h, w)`` per-date embeddings (any stride).
        target: change label ``(B, H, W)``; pooled to the embedding grid (a cell is changed when
            at least half of its pixels are).
        valid: ``(B, H, W)``; a cell is valid only when all its pixels are.
        max_per_class: at most this many changed and this many unchanged locations (random).
        patch: average the embeddings over ``patch × patch`` cells first (patch embeddings).

    Returns:
        ``embeddings (2K, D)`` (date-1 rows then date-2 rows), ``labels (2K,)`` and the sampled
        locations' change flags ``(K,)``. Location ``k`` has label ``k`` for both dates when
        unchanged and labels ``k`` / ``K + k`` when changed.
    """
    if patch > 1:
        embeddings_t1 = F.avg_pool2d(embeddings_t1, patch, ceil_mode=True)
        embeddings_t2 = F.avg_pool2d(embeddings_t2, patch, ceil_mode=True)
    b, d, h, w = embeddings_t1.shape
    target = target.reshape(b, 1, *target.shape[-2:]).float()
    valid_f = torch.ones_like(target) if valid is None else valid.reshape(target.shape).float()
    if target.shape[-2:] != (h, w):
        size = target.shape[-2:]
        stride = (math.ceil(size[0] / h), math.ceil(size[1] / w))
        pad = (0, stride[1] * w - size[1], 0, stride[0] * h - size[0])
        target = F.avg_pool2d(F.pad(target, pad), stride)
        valid_f = F.avg_pool2d(F.pad(valid_f, pad), stride)
    changed = (target >= 0.5).flatten()
    ok = (valid_f >= 1.0 - 1e-6).flatten()
    e1 = embeddings_t1.permute(0, 2, 3, 1).reshape(-1, d)
    e2 = embeddings_t2.permute(0, 2, 3, 1).reshape(-1, d)
    picks = []
    for flag in (True, False):
        idx = (ok & (changed == flag)).nonzero(as_tuple=True)[0]
        if idx.numel() > max_per_class:
            perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:max_per_class].to(idx.device)
            idx = idx[perm]
        picks.append(idx)
    idx = torch.cat(picks)
    k = idx.numel()
    flags = changed[idx]
    base = torch.arange(k, device=idx.device)
    labels = torch.cat([base, torch.where(flags, base + k, base)])
    return torch.cat([e1[idx], e2[idx]]), labels, flags


class _EmbeddingLoss(ChangeLoss):
    """Shared sampling of pixel embeddings (:func:`pair_embedding_samples`)."""

    def __init__(self, max_per_class: int = 64, normalize: bool = True, seed: int = 0, patch: int = 1) -> None:
        super().__init__()
        self.max_per_class = max_per_class
        self.normalize = normalize
        self.patch = patch
        self.generator = torch.Generator().manual_seed(seed)

    def samples(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if output.embeddings_t1 is None or output.embeddings_t2 is None:
            raise ValueError(f"the {self.name} loss needs a model that returns per-date embeddings")
        emb, labels, _ = pair_embedding_samples(
            output.embeddings_t1.float(), output.embeddings_t2.float(), target, valid, self.max_per_class, self.generator,
            self.patch,
        )
        return emb, labels


@register_loss
class TripletLoss(_EmbeddingLoss):
    """:func:`triplet_loss` on sampled bi-temporal pixel embeddings (see the module docstring)."""

    name = "triplet"

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "batch-hard",
        squared: bool = False,
        max_per_class: int = 64,
        normalize: bool = True,
        seed: int = 0,
        patch: int = 1,
    ) -> None:
        super().__init__(max_per_class, normalize, seed, patch)
        if mining not in MINING_STRATEGIES:
            raise ValueError(f"unknown mining strategy {mining!r}; choose one of {', '.join(MINING_STRATEGIES)}")
        self.margin, self.mining, self.squared = margin, mining, squared

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        emb, labels = self.samples(output, target, valid)
        return triplet_loss(emb, labels, self.margin, self.mining, self.squared, self.normalize)


@register_loss
class QuadrupletLoss(_EmbeddingLoss):
    """:func:`quadruplet_loss` on sampled bi-temporal pixel embeddings."""

    name = "quadruplet"

    def __init__(
        self,
        margin1: float = 0.2,
        margin2: float = 0.1,
        mining: str = "batch-hard",
        squared: bool = True,
        max_per_class: int = 64,
        normalize: bool = True,
        seed: int = 0,
        patch: int = 1,
    ) -> None:
        super().__init__(max_per_class, normalize, seed, patch)
        if mining not in ("batch-all", "batch-hard"):
            raise ValueError(f"quadruplet mining must be 'batch-all' or 'batch-hard', got {mining!r}")
        self.margin1, self.margin2, self.mining, self.squared = margin1, margin2, mining, squared

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        emb, labels = self.samples(output, target, valid)
        return quadruplet_loss(emb, labels, self.margin1, self.margin2, self.mining, self.squared, self.normalize)


@register_loss
class CrossModalLoss(_EmbeddingLoss):
    """Cross-modal representation loss on sampled per-date embeddings (see the module docstring):
    :func:`cross_modal_contrastive_loss` + ``triplet_weight`` * :func:`triplet_loss`, one mining."""

    name = "crossmodal"

    def __init__(
        self,
        margin: float = 0.2,
        contrastive_margin: float = 0.5,
        mining: str = "batch-hard",
        triplet_weight: float = 1.0,
        max_per_class: int = 64,
        seed: int = 0,
        patch: int = 1,
    ) -> None:
        super().__init__(max_per_class, True, seed, patch)
        if mining not in MINING_STRATEGIES:
            raise ValueError(f"unknown mining strategy {mining!r}; choose one of {', '.join(MINING_STRATEGIES)}")
        self.margin, self.contrastive_margin, self.mining, self.triplet_weight = margin, contrastive_margin, mining, triplet_weight

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        emb, labels = self.samples(output, target, valid)
        contrastive = cross_modal_contrastive_loss(emb, labels, self.contrastive_margin, self.mining)
        return contrastive + self.triplet_weight * triplet_loss(emb, labels, self.margin, self.mining, normalize=True)


__all__ = ["CrossModalLoss", "QuadrupletLoss", "TripletLoss", "pair_embedding_samples"]
