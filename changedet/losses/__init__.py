"""Training losses for change detection: pixel classification losses and metric-learning losses.

Two layers:

* **pure functions** on tensors, each documented with its formula: :func:`bce_loss`,
  :func:`dice_loss`, :func:`focal_loss`, :func:`contrastive_loss` (on a difference map;
  :mod:`changedet.losses.pixel`), :func:`triplet_loss` with online mining (:func:`mine_triplets`:
  ``batch-all``, ``batch-hard``, ``semi-hard``) and :func:`quadruplet_loss` on ``(N, D)``
  embeddings with labels (:mod:`changedet.losses.metric`);
* **thin modules** with one signature, ``loss(output: ChangeOutput, target, valid) -> scalar``
  (:mod:`changedet.losses.base`, :mod:`changedet.losses.pixel`,
  :mod:`changedet.losses.embedding`), registered with :func:`register_loss` and built by name
  through :func:`build_loss` (``"bce"``, ``"dice"``, ``"focal"``, ``"contrastive"``,
  ``"triplet"``, ``"quadruplet"``, ``"crossmodal"`` and weighted sums such as ``"bce+dice"`` or
  ``"bce+0.5*contrastive"``; :mod:`changedet.losses.registry`).

``target`` is the change label ``(B, H, W)`` (or ``(B, 1, H, W)``) in {0, 1}; ``valid`` an optional
boolean mask of the same shape (nodata and ignored label pixels are False). Every pixel loss
averages over valid pixels only; a batch without any valid pixel gives a zero loss that still
carries a gradient path (so ``backward`` never fails).

Metric losses on bi-temporal pixel embeddings (:func:`pair_embedding_samples`) and cross-modal
representation learning (``crossmodal``) are described in :mod:`changedet.losses.embedding`.
"""

from __future__ import annotations

from changedet.losses.base import ChangeLoss, CompositeLoss
from changedet.losses.embedding import CrossModalLoss, QuadrupletLoss, TripletLoss, pair_embedding_samples
from changedet.losses.metric import (
    MINING_STRATEGIES,
    Mining,
    cross_modal_contrastive_loss,
    mine_triplets,
    pairwise_distances,
    quadruplet_loss,
    triplet_loss,
)
from changedet.losses.pixel import (
    BCELoss,
    ContrastiveLoss,
    DiceLoss,
    FocalLoss,
    bce_loss,
    contrastive_loss,
    dice_loss,
    focal_loss,
)
from changedet.losses.registry import LOSSES, build_loss, list_losses, register_loss

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
    "Mining",
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
    "register_loss",
    "triplet_loss",
]
