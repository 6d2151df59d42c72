"""Every registered model against the ChangeModel contract (tiny CPU inputs)."""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.nn.functional as F

from changedet.errors import ModelError
from changedet.models import ChangeModel, ChangeOutput, create_model, list_models, model_entry
from changedet.models.encoders import FeatureEncoder
from changedet.models.fc_siam import FCEncoder

MODELS = list_models()
NEURAL = [n for n in MODELS if model_entry(n).family != "classical"]
TILE = 64
BANDS = {"structure-refined": 3}  # models that take only some band counts (1 or 3): the count the fixed-band tests use


def pair(bands: int, h: int = TILE, w: int = TILE, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random dates ``(batch, bands, h, w)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, bands, h, w, generator=g), torch.randn(batch, bands, h, w, generator=g)


def check_output(out: ChangeOutput, batch: int, h: int, w: int) -> None:
    assert isinstance(out, ChangeOutput)
    assert out.logits.shape == (batch, 1, h, w)
    assert out.difference.shape == (batch, 1, h, w)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.difference).all()
    assert (out.difference >= 0).all()
    if out.embeddings_t1 is not None:
        assert out.embeddings_t1.shape == out.embeddings_t2.shape
        assert out.embeddings_t1.shape[0] == batch


def test_expected_models_registered() -> None:
    expected = {
        "cva", "fc-ef", "fc-siam-conc", "fc-siam-diff", "pseudo-siamese-unet", "siam-bit-resnet18",
        "siam-fpn-resnet18", "siam-unet-efficientnet-b0", "siam-unet-mit-b0", "siam-unet-mobilenetv3",
        "siam-unet-resnet18", "siam-unet-resnet34",
    }  # fmt: skip
    assert expected <= set(MODELS)
    assert list_models("fc-*") == ["fc-ef", "fc-siam-conc", "fc-siam-diff"]
    with pytest.raises(ModelError, match="registered models"):
        create_model("no-such-model")


@pytest.mark.parametrize("bands", [3, 4, 13])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, bands: int) -> None:
    if name in BANDS and bands != BANDS[name]:
        pytest.skip(f"{name} takes 1- or 3-band dates")
    torch.manual_seed(0)
    model = create_model(name, in_channels=bands).train()
    assert isinstance(model, ChangeModel)
    assert tuple(model.in_channels) == (bands, bands)
    t1, t2 = pair(bands)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # parameter-free (cva): gradients must reach the inputs
        t1.requires_grad_(True)
        t2.requires_grad_(True)
    out = model(t1, t2)
    check_output(out, 2, TILE, TILE)
    target = (torch.rand_like(out.logits) > 0.5).float()
    loss = F.binary_cross_entropy_with_logits(out.logits, target) + out.difference.mean()
    loss.backward()
    grads = [p.grad for p in params] if params else [t1.grad, t2.grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_any_tile_size(name: str) -> None:
    b = BANDS.get(name, 4)
    torch.manual_seed(0)
    model = create_model(name, in_channels=b)
    for h, w, batch in [(64, 64, 2), (72, 100, 2), (33, 47, 2), (20, 20, 1)]:
        check_output(model.predict(*pair(b, h, w, batch)), batch, h, w)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_bands_is_model_error(name: str) -> None:
    b = BANDS.get(name, 4)
    model = create_model(name, in_channels=b)
    if name == "cva":
        pytest.skip("cva standardises whatever bands it gets")
    with pytest.raises(ModelError, match="bands"):
        model.predict(*pair(b - 1))


@pytest.mark.parametrize("name", MODELS)
def test_identical_dates_zero_difference(name: str) -> None:
    b = BANDS.get(name, 4)
    torch.manual_seed(0)
    model = create_model(name, in_channels=b)
    if not model.weights_shared:
        pytest.skip("unshared branches map identical inputs to different features by design")
    t1, _ = pair(b)
    out = model.predict(t1, t1.clone())
    assert out.difference.abs().max() < 1e-5


@functools.cache
def date_orders(name: str) -> tuple[dict[str, bool], ChangeOutput, ChangeOutput]:
    """A seeded 4-band model's flags and its eval outputs for (t1, t2) and for the swapped (t2, t1)."""
    b = BANDS.get(name, 4)
    torch.manual_seed(0)
    model = create_model(name, in_channels=b)
    t1, t2 = pair(b)
    flags = {"swap_invariant": getattr(model, "swap_invariant", False), "weights_shared": model.weights_shared}
    return flags, model.predict(t1, t2), model.predict(t2, t1)


@pytest.mark.parametrize("name", MODELS)
def test_swap_invariance(name: str) -> None:
    flags, a, b = date_orders(name)
    if not flags["swap_invariant"]:
        pytest.skip("order-dependent fusion")
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.difference, b.difference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NEURAL)
def test_shared_weights_apply_one_function(name: str) -> None:
    """Weight-shared models embed a date the same way whichever slot it is in; unshared ones do not."""
    flags, a, b = date_orders(name)
    if a.embeddings_t1 is None:
        pytest.skip("no per-date embeddings (early fusion)")
    same = torch.allclose(a.embeddings_t1, b.embeddings_t2, atol=1e-5) and torch.allclose(
        a.embeddings_t2, b.embeddings_t1, atol=1e-5
    )
    assert same == flags["weights_shared"]


@pytest.mark.parametrize("name", NEURAL)
def test_shared_encoder_is_one_module(name: str) -> None:
    b = BANDS.get(name, 4)
    torch.manual_seed(0)
    model = create_model(name, in_channels=b)
    if not model.weights_shared or not hasattr(model, "embedding_level"):
        pytest.skip("no per-date encoder branches")
    encoders = [m for m in model.modules() if isinstance(m, (FeatureEncoder, FCEncoder))]
    assert encoders == [model.encoder]
    t1, t2 = pair(b)
    before = model.predict(t1, t2)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = model.predict(t1, t2)
    assert not torch.allclose(before.embeddings_t1, after.embeddings_t1)
    assert not torch.allclose(before.embeddings_t2, after.embeddings_t2)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name: str) -> None:
    b = BANDS.get(name, 4)
    torch.manual_seed(0)
    model = create_model(name, in_channels=b)
    t1, t2 = pair(b)
    if model.needs_scene_fit:
        flat1, flat2 = (t.movedim(1, -1).reshape(-1, b) for t in (t1, t2))
        model.fit_scene(flat1, flat2, torch.ones(flat1.shape[0], dtype=torch.bool))
    else:
        model.train()(t1, t2)  # move BatchNorm running statistics away from their initial values
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    fresh = create_model(name, in_channels=b)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    a, b = model.predict(t1, t2), fresh.predict(t1, t2)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.difference, b.difference, atol=0, rtol=0)


@pytest.mark.parametrize("name", [n for n in NEURAL if not model_entry(n).takes_different_inputs])
def test_unequal_bands_need_pseudo_siamese(name: str) -> None:
    with pytest.raises(ModelError, match="pseudo-siamese"):
        create_model(name, in_channels=(4, 2))
