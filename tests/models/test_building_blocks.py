"""Encoders, fusions and decoders behind the registered models."""

from __future__ import annotations

import pytest
import torch

from changedet.errors import ModelError
from changedet.models import create_model
from changedet.models.bitemporal import pad_to_multiple
from changedet.models.encoders import FeatureEncoder
from changedet.models.fusion import FUSIONS, Fusion, feature_distance
from changedet.models.siamese import siamese


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3-small", "mit-b0", "pvt-v2-b0"])
def test_encoder_any_band_count_and_levels(name: str) -> None:
    encoder = FeatureEncoder(name, in_channels=7)
    features = encoder(torch.randn(1, 7, 64, 64))
    assert [f.shape[1] for f in features] == list(encoder.out_channels)
    assert [64 // f.shape[-1] for f in features] == list(encoder.reductions) == [2, 4, 8, 16, 32]


def test_unknown_encoder() -> None:
    with pytest.raises(ModelError, match="cannot build encoder 'resnet9000'"):
        FeatureEncoder("resnet9000", in_channels=3)


@pytest.mark.parametrize("mode", FUSIONS)
def test_fusion_modes(mode: str) -> None:
    fusion = Fusion(mode)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fused = fusion(a, b)
    assert fused.shape[1] == fusion.out_channels(3)
    assert torch.equal(fused, fusion(b, a)) == fusion.symmetric


def test_unknown_fusion() -> None:
    with pytest.raises(ModelError, match="unknown fusion 'max'"):
        create_model("siam-unet-mobilenetv3", in_channels=3, fusion="max")


@pytest.mark.parametrize("mode", FUSIONS)
def test_siamese_fusion_choice(mode: str) -> None:
    torch.manual_seed(0)
    model = create_model("siam-unet-mit-b0", in_channels=3, fusion=mode)
    assert model.swap_invariant == Fusion(mode).symmetric
    t1, t2 = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    a, b = model.predict(t1, t2).logits, model.predict(t2, t1).logits
    assert torch.allclose(a, b, atol=1e-5) == model.swap_invariant


def test_feature_distance_range() -> None:
    a = torch.randn(2, 8, 5, 5)
    assert feature_distance(a, a).abs().max() == 0
    assert torch.allclose(feature_distance(a, -a), torch.ones(2, 1, 5, 5))
    zeros = torch.zeros(1, 8, 2, 2)
    assert feature_distance(zeros, zeros).abs().max() == 0


def test_generic_builder_and_decoder_options() -> None:
    model = siamese(
        encoder="pvt-v2-b0", decoder="fpn", fusion="symmetric", in_channels=(2, 2), decoder_channels=(32, 64)
    )
    assert model.predict(torch.randn(1, 2, 40, 40), torch.randn(1, 2, 40, 40)).logits.shape == (1, 1, 40, 40)
    with pytest.raises(ModelError, match="multiple of 32 and at least 64"):
        siamese(decoder="fpn", decoder_channels=(32, 16))
    with pytest.raises(ModelError, match="is \\(pyramid, segmentation\\)"):
        siamese(decoder="fpn", decoder_channels=(128, 64, 32))
    with pytest.raises(ModelError, match="needs 5 widths"):
        siamese(decoder="unet", decoder_channels=(64, 32))
    with pytest.raises(ModelError, match="unknown decoder"):
        siamese(decoder="deeplab")


def test_pad_to_multiple() -> None:
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    padded = pad_to_multiple(x, 8)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :3, :4], x) and torch.equal(padded[..., 7, 7], x[..., 2, 3])
    assert pad_to_multiple(x, 1) is x
