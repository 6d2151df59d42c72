"""Pseudo-Siamese models: unshared branches for heterogeneous dates (e.g. hyperspectral vs LiDAR DSM)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from changedet.errors import ModelError
from changedet.models import create_model
from changedet.models.pseudo_siamese import PseudoSiameseNet


def branch_tensors(model: PseudoSiameseNet, date: int) -> list[torch.Tensor]:
    """Parameters and buffers of one date's encoder and projections."""
    modules = (getattr(model, f"encoder_t{date}"), getattr(model, f"project_t{date}"))
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def test_hyperspectral_vs_dsm_forward_backward() -> None:
    torch.manual_seed(0)
    model = create_model(
        "pseudo-siamese-unet", in_channels=(144, 1), encoder_t1="resnet18", encoder_t2="mobilenetv3-small"
    ).train()
    assert model.in_channels == (144, 1) and not model.weights_shared
    assert model.encoder_t1.in_channels == 144 and model.encoder_t2.in_channels == 1
    t1, t2 = torch.randn(2, 144, 64, 72), torch.randn(2, 1, 64, 72)
    out = model(t1, t2)
    assert out.logits.shape == out.difference.shape == (2, 1, 64, 72)
    assert out.embeddings_t1.shape == out.embeddings_t2.shape
    F.binary_cross_entropy_with_logits(out.logits, torch.zeros_like(out.logits)).backward()
    for date in (1, 2):
        grads = [p.grad for p in branch_tensors(model, date) if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"branch {date} gets no gradient"


def test_branches_share_no_storage() -> None:
    model = create_model("pseudo-siamese-unet", in_channels=(144, 1))
    ptrs_t1 = {t.untyped_storage().data_ptr() for t in branch_tensors(model, 1)}
    ptrs_t2 = {t.untyped_storage().data_ptr() for t in branch_tensors(model, 2)}
    assert ptrs_t1 and ptrs_t2 and not ptrs_t1 & ptrs_t2
    n_params = sum(p.numel() for p in model.parameters())
    n_branches = sum(p.numel() for d in (1, 2) for p in branch_tensors(model, d) if isinstance(p, torch.nn.Parameter))
    assert n_branches < n_params  # plus decoder and head


def test_different_architectures_are_aligned() -> None:
    """A CNN (levels at strides 2..32) and a transformer (4..32) meet on their shared levels."""
    torch.manual_seed(0)
    model = create_model(
        "pseudo-siamese-unet", in_channels=(4, 2), encoder_t1="resnet18", encoder_t2="mit-b0",
        feature_channels=[16, 32, 48, 64],
    )  # fmt: skip
    out = model.predict(torch.randn(1, 4, 40, 56), torch.randn(1, 2, 40, 56))
    assert out.logits.shape == (1, 1, 40, 56)
    assert out.embeddings_t1.shape == (1, 16, 10, 14)  # stride-2 level dropped: mit-b0 lacks it


def test_bad_configurations() -> None:
    with pytest.raises(ModelError, match="feature_channels needs 5"):
        create_model("pseudo-siamese-unet", in_channels=3, feature_channels=[8, 8])
    with pytest.raises(ModelError, match="cannot build encoder"):
        create_model("pseudo-siamese-unet", in_channels=3, encoder_t2="no-such-net")
    model = create_model("pseudo-siamese-unet", in_channels=(5, 1))
    with pytest.raises(ModelError, match="5\\+1 bands"):
        model.predict(torch.randn(1, 5, 32, 32), torch.randn(1, 5, 32, 32))
