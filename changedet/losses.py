"""Training losses for change detection: pixel classification losses and metric-learning losses.

Two layers:

* **pure functions** on tensors, each documented with its formula: :func:`bce_loss`,
  :func:`dice_loss`, :func:`focal_loss`, :func:`contrastive_loss` (on a difference map),
  :func:`triplet_loss` with online mining (:func:`mine_triplets`: ``batch-all``, ``batch-hard``,
  ``semi-hard``) and :func:`quadruplet_loss` on ``(N, D)`` embeddings with labels;
* **thin modules** with one signature, ``loss(output: ChangeOutput, target, valid) -> scalar``,
  built by name through :func:`build_loss` (``"bce"``, ``"dice"``, ``"focal"``, ``"contrastive"``,
  ``"triplet"``, ``"quadruplet"``, ``"crossmodal"`` and weighted sums such as ``"bce+dice"`` or
  ``"bce+0.5*contrastive"``).

``target`` is the change label ``(B, H, W)`` (or ``(B, 1, H, W)``) in {0, 1}; ``valid`` an optional
boolean mask of the same shape (nodata and ignored label pixels are False). Every pixel loss
averages over valid pixels only; a batch without any valid pixel gives a zero loss that still
carries a gradient path (so ``backward`` never fails).

Metric losses on bi-temporal pixel embeddings (:func:`pair_embedding_samples`): the embeddings of
``K`` sampled locations of date 1 and date 2 form ``2K`` points; a location's two embeddings
share an identity label when it is unchanged and get two different labels when it changed. A
triplet then pulls together the two dates of an unchanged pixel and pushes away other points
(in particular the other date of a changed pixel); the quadruplet's second term asks every
unchanged pair to be closer than any pair of points with two other labels (e.g. both dates of a
changed pixel).

Cross-modal representation learning (``crossmodal``, for pseudo-Siamese encoders of two
modalities): the same sampled identities, with *other locations* as negatives. Online mining
(:func:`mine_triplets`, hard negatives by default) picks for every location's date-1 and date-2
embedding its cross-date positive and its hardest negative; :func:`cross_modal_contrastive_loss`
applies :func:`contrastive_loss` to those positive and negative pairs and :func:`triplet_loss` is
added on the same sample.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from changedet.models.output import ChangeOutput

Mining = Literal["batch-all", "batch-hard", "semi-hard"]
MINING_STRATEGIES: tuple[str, ...] = ("batch-all", "batch-hard", "semi-hard")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _prepare(target: torch.Tensor, valid: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target`` as float and ``valid`` as a float weight, both shaped like ``like``."""
    target = target.reshape(like.shape).to(like.dtype)
    if valid is None:
        weight = torch.ones_like(like)
    else:
        weight = valid.reshape(like.shape).to(like.dtype)
    return target, weight


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean; 0 (with a gradient path) when the weights sum to 0."""
    total = weight.sum()
    return (values * weight).sum() / total.clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# pixel classification losses (on logits)
# --------------------------------------------------------------------------------------------


def bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    pos_weight: float | None = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over valid pixels.

    ``l = -[w_p * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))]`` with ``w_p = pos_weight``
    (1 when None): ``pos_weight > 1`` up-weights the rare change class (e.g. #negatives/#positives).
    """
    target, weight = _prepare(target, valid, logits)
    pw = None if pos_weight is None else torch.as_tensor(float(pos_weight), dtype=logits.dtype, device=logits.device)
    values = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
    return _masked_mean(values, weight)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft Dice loss of the change class over all valid pixels of the batch.

    ``1 - (2 * sum(p * y) + s) / (sum(p) + sum(y) + s)`` with ``p = sigmoid(logits)`` and
    smoothing ``s`` (a batch without change and without predicted change scores 0).
    """
    target, weight = _prepare(target, valid, logits)
    prob = torch.sigmoid(logits) * weight
    target = target * weight
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), averaged over valid pixels.

    ``l = -a_t * (1 - p_t)^gamma * log(p_t)`` where ``p_t = p`` for change pixels and ``1 - p``
    otherwise, ``a_t = alpha`` for change pixels and ``1 - alpha`` otherwise (1 when alpha is None).
    ``gamma = 0`` and ``alpha = None`` give plain BCE.
    """
    target, weight = _prepare(target, valid, logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    values = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        values = values * (alpha * target + (1 - alpha) * (1 - target))
    return _masked_mean(values, weight)


def contrastive_loss(
    distance: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    margin: float = 0.5,
    balanced: bool = False,
) -> torch.Tensor:
    """Pixel-wise contrastive loss on a difference map ``D`` (Hadsell et al. 2006; as in DASNet).

    ``l = (1 - Y) * 1/2 * D^2 + Y * 1/2 * max(0, m - D)^2``: unchanged pixels (Y=0) are pulled to
    distance 0, changed pixels (Y=1) pushed beyond the margin ``m``. The models'
    ``difference`` is in [0, 1] (half the L2 distance of unit vectors), so ``m <= 1``.
    ``balanced`` averages the two classes separately and sums the halves (changes are rare).
    """
    target, weight = _prepare(target, valid, distance)
    unchanged = 0.5 * distance.square()
    changed = 0.5 * F.relu(margin - distance).square()
    if not balanced:
        return _masked_mean((1 - target) * unchanged + target * changed, weight)
    return 0.5 * (_masked_mean(unchanged, weight * (1 - target)) + _masked_mean(changed, weight * target))


# --------------------------------------------------------------------------------------------
# metric learning on (N, D) embeddings
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# modules: loss(output, target, valid)
# --------------------------------------------------------------------------------------------


class ChangeLoss(nn.Module):
    """Base class: ``forward(output: ChangeOutput, target (B,H,W), valid (B,H,W) | None) -> scalar``."""

    name = "loss"

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class BCELoss(ChangeLoss):
    """:func:`bce_loss` on ``output.logits``."""

    name = "bce"

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return bce_loss(output.logits.float(), target, valid, self.pos_weight)


class DiceLoss(ChangeLoss):
    """:func:`dice_loss` on ``output.logits``."""

    name = "dice"

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return dice_loss(output.logits.float(), target, valid, self.smooth)


class FocalLoss(ChangeLoss):
    """:func:`focal_loss` on ``output.logits``."""

    name = "focal"

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return focal_loss(output.logits.float(), target, valid, self.alpha, self.gamma)


class ContrastiveLoss(ChangeLoss):
    """:func:`contrastive_loss` on ``output.difference``."""

    name = "contrastive"

    def __init__(self, margin: float = 0.5, balanced: bool = False) -> None:
        super().__init__()
        self.margin, self.balanced = margin, balanced

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return contrastive_loss(output.difference.float(), target, valid, self.margin, self.balanced)


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


LOSSES: dict[str, Callable[..., ChangeLoss]] = {
    "bce": BCELoss,
    "dice": DiceLoss,
    "focal": FocalLoss,
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "quadruplet": QuadrupletLoss,
    "crossmodal": CrossModalLoss,
}

_TERM = re.compile(r"^\s*(?:(?P<weight>\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")


def list_losses() -> list[str]:
    """Names usable in :func:`build_loss` (and in sums such as ``bce+dice``)."""
    return sorted(LOSSES)


def _accepts(cls: Callable[..., ChangeLoss], key: str) -> bool:
    import inspect

    return key in inspect.signature(cls).parameters


def build_loss(name: str, **kwargs: Any) -> ChangeLoss:
    """Build a loss by name.

    ``name`` is one registered loss (``bce``, ``dice``, ``focal``, ``contrastive``, ``triplet``,
    ``quadruplet``) or a ``+``-separated sum with optional weights: ``"bce+dice"``,
    ``"bce+0.5*contrastive"``. Keyword arguments go to the losses that accept them
    (``build_loss("bce+dice", pos_weight=10)``); a nested dict under a part's name sets that part
    only (``build_loss("bce+triplet", triplet={"margin": 0.3})``); ``weights={"dice": 2}``
    overrides the weights written in the name.

    Raises:
        ValueError: unknown loss, malformed sum, or an argument no part accepts.
    """
    terms = [t for t in name.split("+")]
    parsed: list[tuple[str, float]] = []
    for term in terms:
        match = _TERM.match(term.lower())
        if not match or match["name"] not in LOSSES:
            raise ValueError(f"unknown loss term {term.strip()!r} in {name!r}; losses: {', '.join(list_losses())}")
        parsed.append((match["name"], float(match["weight"]) if match["weight"] else 1.0))
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"loss {name!r} names a part twice")
    kwargs = dict(kwargs)
    weights = {n: w for n, w in parsed}
    override = kwargs.pop("weights", None) or {}
    unknown_weights = set(override) - set(names)
    if unknown_weights:
        raise ValueError(f"weights for losses not in {name!r}: {', '.join(sorted(unknown_weights))}")
    weights.update({k: float(v) for k, v in override.items()})
    nested = {n: dict(kwargs.pop(n)) for n in names if isinstance(kwargs.get(n), dict)}
    parts: dict[str, ChangeLoss] = {}
    used: set[str] = set()
    for n in names:
        cls = LOSSES[n]
        own = {k: v for k, v in kwargs.items() if _accepts(cls, k)}
        used |= set(own)
        own.update(nested.get(n, {}))
        try:
            parts[n] = cls(**own)
        except TypeError as exc:
            raise ValueError(f"bad arguments for loss {n!r}: {exc}") from None
    unused = set(kwargs) - used
    if unused:
        raise ValueError(f"loss {name!r} takes no argument {', '.join(sorted(unused))}")
    if len(parts) == 1 and weights[names[0]] == 1.0:
        return parts[names[0]]
    return CompositeLoss(parts, weights)


__all__ = [
    "LOSSES",
    "MINING_STRATEGIES",
    "BCELoss",
    "ChangeLoss",
    "CompositeLoss",
    "ContrastiveLoss",
    "CrossModalLoss",
    "DiceLoss",
    "FocalLoss",
    "QuadrupletLoss",
    "TripletLoss",
    "bce_loss",
    "build_loss",
    "contrastive_loss",
    "cross_modal_contrastive_loss",
    "dice_loss",
    "focal_loss",
    "list_losses",
    "mine_triplets",
    "pair_embedding_samples",
    "pairwise_distances",
    "quadruplet_loss",
    "triplet_loss",
]
