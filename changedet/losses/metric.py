"""Metric learning on ``(N, D)`` embeddings with integer identity labels.

:func:`pairwise_distances`, online triplet mining (:func:`mine_triplets`: ``batch-all``,
``batch-hard``, ``semi-hard``), :func:`triplet_loss`, :func:`quadruplet_loss` and
:func:`cross_modal_contrastive_loss` (:func:`~changedet.losses.pixel.contrastive_loss` on mined
positive and negative pairs). The modules that feed them bi-temporal pixel embeddings are in
:mod:`changedet.losses.embedding`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from changedet.losses.pixel import contrastive_loss

Mining = Literal["batch-all", "batch-hard", "semi-hard"]
MINING_STRATEGIES: tuple[str, ...] = ("batch-all", "batch-hard", "semi-hard")


def pairwise_distances(embeddings: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Euclidean distance matrix ``(N, N)`` of ``(N, D)`` embeddings (exact zeros on the diagonal).

    The square root has a safe gradient at 0 (identical embeddings do not produce NaN).
    """
    sq = (embeddings.unsqueeze(1) - embeddings.unsqueeze(0)).square().sum(-1)
    if squared:
        return sq
    zero = sq == 0
    dist = torch.sqrt(torch.where(zero, torch.ones_like(sq), sq))
    return torch.where(zero, torch.zeros_like(dist), dist)


def _label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``positive[i, j]``: same label and ``i != j``; ``negative[i, j]``: different labels."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def mine_triplets(
    dist: torch.Tensor,
    labels: torch.Tensor,
    strategy: str = "batch-hard",
    margin: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online triplet mining on a distance matrix; returns index tensors ``(anchor, positive, negative)``.

    * ``batch-all``: every valid triplet ``(a, p, n)`` with ``y_a = y_p``, ``a != p``, ``y_n != y_a``
      (the loss then averages over the triplets with a positive loss);
    * ``batch-hard`` (Hermans et al. 2017): per anchor, its farthest positive and its closest
      negative (anchors without a positive or a negative are skipped);
    * ``semi-hard`` (Schroff et al. 2015, FaceNet): per positive pair ``(a, p)``, the closest
      negative farther than the positive, ``d(a,p) < d(a,n)`` (inside the margin for an active
      triplet); when no negative is farther, the farthest negative (as TensorFlow's
      ``triplet_semihard_loss``). Pairs without any negative are skipped.

    Ties pick the lowest index. ``margin`` is accepted for a uniform signature (selection does not
    depend on it). Memory: ``batch-all`` builds an ``(N, N, N)`` mask, the others ``(N, N)``;
    keep ``N`` in the hundreds (see :func:`pair_embedding_samples`).
    """
    del margin
    positive, negative = _label_masks(labels)
    if strategy == "batch-all":
        valid = positive.unsqueeze(2) & negative.unsqueeze(1)
        a, p, n = valid.nonzero(as_tuple=True)
        return a, p, n
    if strategy == "batch-hard":
        has = positive.any(1) & negative.any(1)
        anchors = has.nonzero(as_tuple=True)[0]
        d = dist.detach()
        hardest_pos = torch.where(positive, d, torch.full_like(d, -math.inf)).argmax(1)
        hardest_neg = torch.where(negative, d, torch.full_like(d, math.inf)).argmin(1)
        return anchors, hardest_pos[anchors], hardest_neg[anchors]
    if strategy == "semi-hard":
        a, p = positive.nonzero(as_tuple=True)
        keep = negative[a].any(1)
        a, p = a[keep], p[keep]
        d = dist.detach()
        d_ap = d[a, p].unsqueeze(1)
        d_an = d[a]
        neg = negative[a]
        farther = neg & (d_an > d_ap)
        semi = torch.where(farther, d_an, torch.full_like(d_an, math.inf)).argmin(1)
        fallback = torch.where(neg, d_an, torch.full_like(d_an, -math.inf)).argmax(1)
        n = torch.where(farther.any(1), semi, fallback)
        return a, p, n
    raise ValueError(f"unknown mining strategy {strategy!r}; choose one of {', '.join(MINING_STRATEGIES)}")


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    mining: str = "batch-hard",
    squared: bool = False,
    normalize: bool = False,
    average_active: bool = True,
) -> torch.Tensor:
    """Triplet loss ``max(0, d(a,p) - d(a,n) + margin)`` over mined triplets (:func:`mine_triplets`).

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` integer identities.
        margin: the margin ``alpha``.
        mining: ``batch-all``, ``batch-hard`` or ``semi-hard``.
        squared: use squared Euclidean distances (FaceNet) instead of distances (Hermans et al.).
        normalize: L2-normalise the embeddings first (points on the unit hypersphere, as FaceNet).
        average_active: for ``batch-all``, average over triplets with a positive loss only
            (Hermans et al.'s "BA≠0"; otherwise the many easy triplets dilute the gradient).
            ``batch-hard`` and ``semi-hard`` always average over all mined triplets.

    Returns 0 (with a gradient path) when no triplet exists.
    """
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    dist = pairwise_distances(embeddings, squared=squared)
    a, p, n = mine_triplets(dist, labels, mining, margin)
    if a.numel() == 0:
        return embeddings.sum() * 0.0
    losses = F.relu(dist[a, p] - dist[a, n] + margin)
    if mining == "batch-all" and average_active:
        active = (losses > 1e-16).to(losses.dtype)
        return (losses * active).sum() / active.sum().clamp_min(1.0)
    return losses.mean()


def quadruplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin1: float = 0.2,
    margin2: float = 0.1,
    mining: str = "batch-hard",
    squared: bool = True,
    normalize: bool = False,
) -> torch.Tensor:
    """Quadruplet loss of Chen et al. (CVPR 2017, "Beyond triplet loss").

    ``L = sum [d(i,j) - d(i,k) + a1]_+ + sum [d(i,j) - d(l,k) + a2]_+`` over ``y_i = y_j``,
    ``y_l != y_k``, ``y_i != y_l``, ``y_i != y_k`` (``d``: squared distances as in the paper by
    default). The first term is a triplet loss; the second pushes a positive pair below any
    negative pair that does not involve the anchor's class, with a smaller margin ``a2 < a1``.

    * ``batch-all``: average of each term over its valid tuples with a positive loss;
    * ``batch-hard``: per anchor ``i``, the farthest positive ``j``, the closest negative ``k``
      and the closest negative pair ``(l, k')`` among labels other than ``y_i`` (the paper's
      margin-based online hard negative mining); the terms are averaged over anchors.

    With only two distinct labels the second term has no tuple and contributes 0.
    """
    if normalize:
        embeddings = F.normalize(embeddings, dim=1)
    dist = pairwise_distances(embeddings, squared=squared)
    positive, negative = _label_masks(labels)
    zero = embeddings.sum() * 0.0
    if mining == "batch-all":
        a, p, n = mine_triplets(dist, labels, "batch-all")
        first = zero
        if a.numel():
            t = F.relu(dist[a, p] - dist[a, n] + margin1)
            first = t.sum() / (t > 0).sum().clamp_min(1)
        pi, pj = positive.nonzero(as_tuple=True)
        li, lk = negative.nonzero(as_tuple=True)
        second = zero
        if pi.numel() and li.numel():
            # (positive pair) x (negative pair) with both members of the negative pair outside y_i
            outside = (labels[li].unsqueeze(0) != labels[pi].unsqueeze(1)) & (labels[lk].unsqueeze(0) != labels[pi].unsqueeze(1))
            t = F.relu(dist[pi, pj].unsqueeze(1) - dist[li, lk].unsqueeze(0) + margin2) * outside
            second = t.sum() / (t > 0).sum().clamp_min(1)
        return first + second
    if mining != "batch-hard":
        raise ValueError(f"quadruplet mining must be 'batch-all' or 'batch-hard', got {mining!r}")
    a, p, n = mine_triplets(dist, labels, "batch-hard")
    if a.numel() == 0:
        return zero
    first = F.relu(dist[a, p] - dist[a, n] + margin1).mean()
    # closest negative pair (l, k) with y_l != y_k and both labels != y_a, per anchor
    other = labels.unsqueeze(0) != labels[a].unsqueeze(1)  # (A, N): point outside the anchor's class
    pair_ok = negative.unsqueeze(0) & other.unsqueeze(2) & other.unsqueeze(1)  # (A, N, N)
    has_pair = pair_ok.flatten(1).any(1)
    if not has_pair.any():
        return first
    masked = torch.where(pair_ok, dist.detach().unsqueeze(0), torch.full_like(pair_ok, math.inf, dtype=dist.dtype))
    flat = masked.flatten(1).argmin(1)
    li, lk = flat // len(labels), flat % len(labels)
    second = F.relu(dist[a, p] - dist[li, lk] + margin2)[has_pair].mean()
    return first + second


def cross_modal_contrastive_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.5,
    mining: str = "batch-hard",
) -> torch.Tensor:
    """:func:`contrastive_loss` on mined positive and negative pairs of ``(N, D)`` embeddings.

    Distances are half the L2 distance of the L2-normalised embeddings (in [0, 1], like the
    models' difference map). Every triplet ``(a, p, n)`` of :func:`mine_triplets` gives a positive
    pair ``(a, p)`` (pulled to 0) and a negative pair ``(a, n)`` (pushed beyond ``margin``); the
    two classes are averaged separately (``balanced``). Returns 0 (with a gradient path) when
    no triplet exists.
    """
    dist = pairwise_distances(F.normalize(embeddings, dim=1)) / 2
    a, p, n = mine_triplets(dist, labels, mining)
    if a.numel() == 0:
        return embeddings.sum() * 0.0
    pairs = torch.cat([dist[a, p], dist[a, n]])
    negative = torch.cat([torch.zeros_like(dist[a, p]), torch.ones_like(dist[a, n])])
    return contrastive_loss(pairs, negative, margin=margin, balanced=True)


__all__ = [
    "MINING_STRATEGIES",
    "cross_modal_contrastive_loss",
    "mine_triplets",
    "pairwise_distances",
    "quadruplet_loss",
    "triplet_loss",
]
