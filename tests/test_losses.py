"""Losses against hand-computed values; online triplet mining on a constructed batch."""

from __future__ import annotations

import math

import pytest
import torch

from changedet.losses import (
    BCELoss,
    CompositeLoss,
    ContrastiveLoss,
    QuadrupletLoss,
    TripletLoss,
    bce_loss,
    build_loss,
    contrastive_loss,
    dice_loss,
    focal_loss,
    list_losses,
    mine_triplets,
    pair_embedding_samples,
    pairwise_distances,
    quadruplet_loss,
    triplet_loss,
)
from changedet.models import ChangeOutput

LN3 = math.log(3.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------
# pixel losses
# ------------------------------------------------------------------------------------------


def test_bce_hand_computed() -> None:
    logits, target = t(0.0, 2.0, -1.0), t(1, 0, 0)
    # -log s(0) = ln 2; -log(1 - s(2)) = ln(1 + e^2); -log(1 - s(-1)) = ln(1 + e^-1)
    terms = [math.log(2), math.log(1 + math.e**2), math.log(1 + math.e**-1)]
    assert bce_loss(logits, target).item() == pytest.approx(sum(terms) / 3, abs=1e-9)
    assert bce_loss(logits, target).item() == pytest.approx(1.044446, abs=1e-6)
    assert bce_loss(logits, target, pos_weight=3.0).item() == pytest.approx((3 * terms[0] + terms[1] + terms[2]) / 3, abs=1e-9)
    valid = torch.tensor([True, True, False])
    assert bce_loss(logits, target, valid).item() == pytest.approx((terms[0] + terms[1]) / 2, abs=1e-9)


def test_dice_hand_computed() -> None:
    logits, target = t(0.0, LN3), t(1, 0)  # p = 0.5, 0.75
    # 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 2 / 3.25, abs=1e-9)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - 1 / 2.25, abs=1e-9)
    # a masked pixel counts neither in the prediction nor in the target
    assert dice_loss(t(0.0, LN3, 5.0), t(1, 0, 1), torch.tensor([True, True, False])).item() == pytest.approx(1 - 2 / 3.25)


def test_focal_hand_computed() -> None:
    logits, target = t(0.0, LN3), t(1, 0)
    first = 0.25 * (1 - 0.5) ** 2 * math.log(2)  # change pixel, p_t = 0.5, alpha_t = 0.25
    second = 0.75 * (1 - 0.25) ** 2 * -math.log(0.25)  # no change, p = 0.75 so p_t = 0.25, alpha_t = 0.75
    assert focal_loss(logits, target, alpha=0.25, gamma=2.0).item() == pytest.approx((first + second) / 2, abs=1e-9)
    assert focal_loss(logits, target, alpha=None, gamma=0.0).item() == pytest.approx(bce_loss(logits, target).item())


def test_contrastive_hand_computed() -> None:
    d, y = t(0.2, 0.3, 0.7), t(0, 1, 1)
    # unchanged 1/2 * 0.2^2 = 0.02; changed 1/2 * (0.5 - 0.3)^2 = 0.02; changed beyond margin: 0
    assert contrastive_loss(d, y, margin=0.5).item() == pytest.approx(0.04 / 3, abs=1e-12)
    assert contrastive_loss(d, y, margin=0.5, balanced=True).item() == pytest.approx(0.5 * (0.02 + 0.01), abs=1e-12)
    assert contrastive_loss(d, y, torch.tensor([True, True, False]), margin=0.5).item() == pytest.approx(0.02)


def test_empty_mask_gives_zero_with_gradient() -> None:
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    loss = bce_loss(logits, torch.zeros(1, 4, 4), valid) + focal_loss(logits, torch.zeros(1, 4, 4), valid)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


# ------------------------------------------------------------------------------------------
# triplet mining: points on a line, labels [0, 0, 1, 1] at x = [0, 1, 0.5, 3]
#   d(0,1)=1  d(0,2)=0.5  d(0,3)=3  d(1,2)=0.5  d(1,3)=2  d(2,3)=2.5
# ------------------------------------------------------------------------------------------

X = torch.tensor([[0.0], [1.0], [0.5], [3.0]])
Y = torch.tensor([0, 0, 1, 1])


def triplets(strategy: str) -> set[tuple[int, int, int]]:
    a, p, n = mine_triplets(pairwise_distances(X), Y, strategy)
    return set(zip(a.tolist(), p.tolist(), n.tolist()))


def test_pairwise_distances() -> None:
    d = pairwise_distances(X)
    assert d[0, 3].item() == pytest.approx(3.0) and d[2, 3].item() == pytest.approx(2.5)
    assert torch.all(d.diagonal() == 0)
    assert pairwise_distances(X, squared=True)[1, 3].item() == pytest.approx(4.0)


def test_batch_all_selects_every_valid_triplet() -> None:
    expected = {(0, 1, 2), (0, 1, 3), (1, 0, 2), (1, 0, 3), (2, 3, 0), (2, 3, 1), (3, 2, 0), (3, 2, 1)}
    assert triplets("batch-all") == expected
    # losses (margin 0.2): 0.7, 0, 0.7, 0, 2.2, 2.2, 0, 0.7 -> mean over the 5 active ones
    assert triplet_loss(X, Y, 0.2, "batch-all").item() == pytest.approx(6.5 / 5)
    assert triplet_loss(X, Y, 0.2, "batch-all", average_active=False).item() == pytest.approx(6.5 / 8)


def test_batch_hard_selects_hardest_positive_and_negative() -> None:
    # anchor 2's negatives 0 and 1 tie at 0.5: the lower index wins
    assert triplets("batch-hard") == {(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 1)}
    assert triplet_loss(X, Y, 0.2, "batch-hard").item() == pytest.approx((0.7 + 0.7 + 2.2 + 0.7) / 4)


def test_semi_hard_selects_closest_negative_farther_than_positive() -> None:
    # (0,1): d_ap=1, negatives 2 (0.5, harder) and 3 (3, semi-hard) -> 3
    # (1,0): d_ap=1, negatives 2 (0.5) and 3 (2) -> 3
    # (2,3): d_ap=2.5, no negative farther -> farthest negative (0 and 1 tie at 0.5 -> 0)
    # (3,2): d_ap=2.5, negatives 0 (3) and 1 (2) -> 0
    assert triplets("semi-hard") == {(0, 1, 3), (1, 0, 3), (2, 3, 0), (3, 2, 0)}
    # margin 1.5: relu(1-3+1.5)=0, relu(1-2+1.5)=0.5, relu(2.5-0.5+1.5)=3.5, relu(2.5-3+1.5)=1
    assert triplet_loss(X, Y, 1.5, "semi-hard").item() == pytest.approx((0 + 0.5 + 3.5 + 1.0) / 4)


def test_semi_hard_prefers_negative_inside_margin_over_easier_one() -> None:
    x = torch.tensor([[0.0], [1.0], [1.2], [5.0]])  # anchor 0, positive 1; negatives at 1.2 and 5
    y = torch.tensor([0, 0, 1, 1])
    a, p, n = mine_triplets(pairwise_distances(x), y, "semi-hard")
    picked = {(ai, pi): ni for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist())}
    assert picked[(0, 1)] == 2  # 1 < 1.2 < 1 + margin: the semi-hard one, not the easy 5


def test_no_triplet_gives_zero() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(x, torch.tensor([0, 1, 2]), mining="batch-hard")
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(x, torch.tensor([0, 0, 1]), mining="hardest")


# ------------------------------------------------------------------------------------------
# quadruplet: x = [0, 1, 0.5, 4], labels [0, 0, 1, 2]
#   d(0,1)=1  d(0,2)=0.5  d(0,3)=4  d(1,2)=0.5  d(1,3)=3  d(2,3)=3.5
# ------------------------------------------------------------------------------------------

QX = torch.tensor([[0.0], [1.0], [0.5], [4.0]])
QY = torch.tensor([0, 0, 1, 2])


def test_quadruplet_hand_computed() -> None:
    # triplet term: anchors 0 and 1, hardest positive d=1, hardest negative 2 (0.5): relu(1-0.5+0.2)=0.7
    # pair term: negative pair outside label 0 = (2,3), d=3.5: relu(1-3.5+3)=0.5
    for mining in ("batch-hard", "batch-all"):
        loss = quadruplet_loss(QX, QY, margin1=0.2, margin2=3.0, mining=mining, squared=False)
        assert loss.item() == pytest.approx(0.7 + 0.5), mining
    # squared distances (the paper): relu(1 - 0.25 + 0.2) = 0.95, relu(1 - 12.25 + 3) = 0
    assert quadruplet_loss(QX, QY, 0.2, 3.0, "batch-hard", squared=True).item() == pytest.approx(0.95)


def test_quadruplet_with_two_labels_is_the_triplet_term() -> None:
    q = quadruplet_loss(X, Y, margin1=0.2, margin2=10.0, mining="batch-hard", squared=False)
    assert q.item() == pytest.approx(triplet_loss(X, Y, 0.2, "batch-hard").item())


# ------------------------------------------------------------------------------------------
# bi-temporal embeddings, modules, registry
# ------------------------------------------------------------------------------------------


def test_pair_embedding_samples_identity_labels() -> None:
    e1 = torch.arange(8.0).reshape(1, 2, 2, 2)
    e2 = e1 + 100
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    emb, labels, changed = pair_embedding_samples(e1, e2, target, valid)
    k = len(changed)
    assert k == 3 and changed.tolist() == [True, False, False]  # changed first, the invalid cell dropped
    assert emb.shape == (6, 2)
    assert torch.equal(emb[0], e1[0, :, 0, 0]) and torch.equal(emb[k], e2[0, :, 0, 0])
    # changed location: two labels; unchanged ones: one label shared by both dates
    assert labels[0] != labels[k] and labels[1] == labels[k + 1] and labels[2] == labels[k + 2]
    assert len(set(labels.tolist())) == 4


def test_pair_embedding_samples_pools_label_to_embedding_stride() -> None:
    e = torch.zeros(1, 3, 2, 2)
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1  # top-left 2x2 cell fully changed
    target[0, 2, 2] = 1  # a quarter of the bottom-right cell: unchanged
    _, _, changed = pair_embedding_samples(e, e, target)
    assert changed.sum().item() == 1 and len(changed) == 4
    # patch embeddings: 4x4 pixel embeddings averaged over 2x2 cells
    e1 = torch.arange(16.0).reshape(1, 1, 4, 4)
    emb, _, changed = pair_embedding_samples(e1, e1, target, patch=2)
    assert changed.tolist() == [True, False, False, False]
    assert emb[:4, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # changed cell first, then the others in order


def _output(requires_grad: bool = True) -> tuple[ChangeOutput, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g, requires_grad=requires_grad)
    e1 = torch.randn(2, 6, 4, 4, generator=g, requires_grad=requires_grad)
    e2 = torch.randn(2, 6, 4, 4, generator=g, requires_grad=requires_grad)
    target = (torch.rand(2, 8, 8, generator=g) > 0.7).float()
    valid = torch.rand(2, 8, 8, generator=g) > 0.1
    difference = torch.rand(2, 1, 8, 8, generator=g, requires_grad=requires_grad)
    return ChangeOutput(logits, difference, e1, e2), target, valid


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_module_backpropagates(name: str) -> None:
    out, target, valid = _output()
    loss = build_loss(name)(out, target, valid)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    used = {"bce": out.logits, "dice": out.logits, "focal": out.logits, "contrastive": out.difference,
            "triplet": out.embeddings_t1, "quadruplet": out.embeddings_t1, "crossmodal": out.embeddings_t1}[name]  # fmt: skip
    assert used.grad is not None and used.grad.abs().sum() > 0


def test_build_loss_sums_weights_and_routes_arguments() -> None:
    out, target, valid = _output(requires_grad=False)
    loss = build_loss("bce + 0.5*dice", pos_weight=4.0)
    assert isinstance(loss, CompositeLoss) and loss.weights == {"bce": 1.0, "dice": 0.5}
    assert loss.parts["bce"].pos_weight == 4.0
    expected = bce_loss(out.logits, target, valid, 4.0) + 0.5 * dice_loss(out.logits, target, valid)
    assert loss(out, target, valid).item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(loss.last) == {"bce", "dice"}
    nested = build_loss("bce+contrastive+triplet", contrastive={"margin": 0.8}, triplet={"mining": "semi-hard"}, weights={"bce": 2})
    assert nested.parts["contrastive"].margin == 0.8 and nested.parts["triplet"].mining == "semi-hard"
    assert nested.weights == {"bce": 2.0, "contrastive": 1.0, "triplet": 1.0}
    assert isinstance(build_loss("bce"), BCELoss) and isinstance(build_loss("contrastive", margin=0.3), ContrastiveLoss)
    assert isinstance(build_loss("triplet"), TripletLoss) and isinstance(build_loss("quadruplet"), QuadrupletLoss)
    for bad, kwargs in (("bce+nope", {}), ("bce+bce", {}), ("bce", {"margin": 1.0}), ("dice", {"weights": {"bce": 1}})):
        with pytest.raises(ValueError):
            build_loss(bad, **kwargs)


def test_metric_loss_needs_embeddings() -> None:
    out, target, valid = _output(requires_grad=False)
    with pytest.raises(ValueError, match="embeddings"):
        build_loss("triplet")(ChangeOutput(out.logits, out.difference), target, valid)
