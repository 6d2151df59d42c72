"""Weight-shared Siamese encoder-decoders: one encoder, both dates in one batched call.

The generic :func:`siamese` builder takes any encoder (:mod:`changedet.models.encoders`), fusion
(:mod:`changedet.models.fusion`) and decoder (:mod:`changedet.models.decoders`); the registered
``siam-<decoder>-<encoder>`` models fix the encoder and decoder.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from changedet.models.bitemporal import BitemporalNet, band_pair
from changedet.models.decoders import create_decoder
from changedet.models.encoders import FeatureEncoder
from changedet.models.fusion import Fusion
from changedet.models.registry import register_model


class SiameseNet(BitemporalNet):
    """One encoder applied to both dates (concatenated along the batch, split after).

    ``encoder`` needs ``in_channels``, ``out_channels``, ``reductions``, ``output_stride`` and
    ``forward(x) -> list of levels``; ``decoder`` gets the fused levels.
    """

    def __init__(self, encoder: nn.Module, fusion: Fusion, decoder: nn.Module) -> None:
        super().__init__(
            in_channels=(encoder.in_channels, encoder.in_channels),
            weights_shared=True,
            fusion=fusion,
            decoder=decoder,
            level_channels=encoder.out_channels,
            reductions=encoder.reductions,
            pad_multiple=encoder.output_stride,
        )
        self.encoder = encoder

    def encode_pair(self, t1: torch.Tensor, t2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = self.encoder(torch.cat([t1, t2], dim=0))
        batch = t1.shape[0]
        return [f[:batch] for f in features], [f[batch:] for f in features]


def siamese(
    encoder: str = "resnet18",
    decoder: str = "unet",
    fusion: str = "absdiff",
    in_channels: int | Sequence[int] = 3,
    decoder_channels: Sequence[int] | None = None,
) -> SiameseNet:
    """A weight-shared Siamese change model.

    Args:
        encoder: encoder name (alias, smp name or ``tu-<timm model>``), randomly initialised.
        decoder: ``"unet"`` or ``"fpn"``.
        fusion: per-level fusion, one of :data:`~changedet.models.fusion.FUSIONS`.
        in_channels: bands per date (an int, or an equal pair).
        decoder_channels: unet: one width per block; fpn: ``(pyramid, segmentation)`` widths.
    """
    bands, _ = band_pair(in_channels, shared=True)
    feature_encoder = FeatureEncoder(encoder, bands)
    fusion_module = Fusion(fusion)
    fused_channels = [fusion_module.out_channels(c) for c in feature_encoder.out_channels]
    return SiameseNet(feature_encoder, fusion_module, create_decoder(decoder, fused_channels, decoder_channels))


def _register(encoder: str, decoder: str, description: str) -> None:
    """Register ``siam-<decoder>-<encoder>``: :func:`siamese` with that encoder and decoder fixed."""

    def builder(
        in_channels: int | Sequence[int] = 3,
        fusion: str = "absdiff",
        decoder_channels: Sequence[int] | None = None,
    ) -> SiameseNet:
        return siamese(encoder, decoder, fusion=fusion, in_channels=in_channels, decoder_channels=decoder_channels)

    register_model(f"siam-{decoder}-{encoder}", family="siamese", description=f"Siamese {description}")(builder)


_register("resnet18", "unet", "ResNet-18 encoder, U-Net decoder")
_register("resnet34", "unet", "ResNet-34 encoder, U-Net decoder")
_register("efficientnet-b0", "unet", "EfficientNet-B0 encoder, U-Net decoder")
_register("mobilenetv3", "unet", "MobileNetV3-Large encoder, U-Net decoder")
_register("mit-b0", "unet", "SegFormer MiT-B0 transformer encoder, U-Net decoder")
_register("resnet18", "fpn", "ResNet-18 encoder, FPN decoder")
