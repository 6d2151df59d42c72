"""Pixel classification losses: BCE, Dice, focal (on logits) and contrastive (on a difference map).

Pure functions on tensors, each documented with its formula (:func:`bce_loss`, :func:`dice_loss`,
:func:`focal_loss`, :func:`contrastive_loss`), and their thin registered
:class:`~changedet.losses.base.ChangeLoss` modules (``bce``, ``dice``, ``focal``, ``contrastive``).

Every pixel loss averages over valid pixels only; a batch without any valid pixel gives a zero
loss that still carries a gradient path (so ``backward`` never fails).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from changedet.losses.base import ChangeLoss
from changedet.losses.registry import register_loss
from changedet.models.output import ChangeOutput


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


@register_loss
class BCELoss(ChangeLoss):
    """:func:`bce_loss` on ``output.logits``."""

    name = "bce"

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return bce_loss(output.logits.float(), target, valid, self.pos_weight)


@register_loss
class DiceLoss(ChangeLoss):
    """:func:`dice_loss` on ``output.logits``."""

    name = "dice"

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return dice_loss(output.logits.float(), target, valid, self.smooth)


@register_loss
class FocalLoss(ChangeLoss):
    """:func:`focal_loss` on ``output.logits``."""

    name = "focal"

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return focal_loss(output.logits.float(), target, valid, self.alpha, self.gamma)


@register_loss
class ContrastiveLoss(ChangeLoss):
    """:func:`contrastive_loss` on ``output.difference``."""

    name = "contrastive"

    def __init__(self, margin: float = 0.5, balanced: bool = False) -> None:
        super().__init__()
        self.margin, self.balanced = margin, balanced

    def forward(self, output: ChangeOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return contrastive_loss(output.difference.float(), target, valid, self.margin, self.balanced)


__all__ = [
    "BCELoss",
    "ContrastiveLoss",
    "DiceLoss",
    "FocalLoss",
    "bce_loss",
    "contrastive_loss",
    "dice_loss",
    "focal_loss",
]
