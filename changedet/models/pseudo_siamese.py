"""Pseudo-Siamese models: one encoder per date, unshared, possibly different bands and architectures.

For heterogeneous pairs (144-band hyperspectral vs a 1-band LiDAR DSM, optical vs SAR) each
branch projects every pyramid level with a 1x1 conv + BatchNorm to a common width, so the two
dates' features can be fused and compared level by level.

Registered variants:

* ``pseudo-siamese-unet``: smp/timm encoders per date, U-Net decoder (24 M parameters by default);
* ``pseudo-siamese-fc``: two unshared FC-Siam encoders (Daudt et al. 2018 widths, ``base_channels``)
  and the FC decoder: small enough to train on a CPU in minutes;
* ``pseudo-siamese-pixel``: two unshared per-pixel encoders (1x1 convolutions, as the coupling
  layers of SCCN, Liu et al. 2018) into one embedding space; works on pixel vectors as ``(N, C, 1, 1)``
  tiles, e.g. hyperspectral spectra vs LiDAR feature vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import nn

from changedet.errors import ModelError
from changedet.models.bitemporal import BitemporalNet, band_pair
from changedet.models.decoders import create_decoder
from changedet.models.encoders import FeatureEncoder
from changedet.models.fc_siam import FCDecoder, FCEncoder
from changedet.models.fusion import Fusion
from changedet.models.registry import register_model


class _EmptyLevel(nn.Module):
    """Stands in for the projection of a level one of the encoders lacks: 0 channels out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


def _projection(in_channels: int, out_channels: int) -> nn.Module:
    if out_channels == 0:
        return _EmptyLevel()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))


class PseudoSiameseNet(BitemporalNet):
    """Two unshared encoders whose levels are projected to common widths before fusion.

    Encoders need ``in_channels``, ``out_channels``, ``reductions``, ``output_stride`` and
    ``forward(x) -> list of levels`` (:class:`FeatureEncoder`, :class:`FCEncoder`, :class:`PixelEncoder`).
    ``decoder`` is a decoder name (:func:`create_decoder`) or a factory ``fused widths -> module``.
    """

    def __init__(
        self,
        encoder_t1: nn.Module,
        encoder_t2: nn.Module,
        fusion: Fusion,
        decoder: str | Callable[[list[int]], nn.Module] = "unet",
        feature_channels: Sequence[int] | None = None,
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        widths = _level_widths(encoder_t1.out_channels, encoder_t2.out_channels, feature_channels)
        fused = [fusion.out_channels(w) for w in widths]
        super().__init__(
            in_channels=(encoder_t1.in_channels, encoder_t2.in_channels),
            weights_shared=False,
            fusion=fusion,
            decoder=create_decoder(decoder, fused, decoder_channels) if isinstance(decoder, str) else decoder(fused),
            level_channels=widths,
            reductions=encoder_t1.reductions,
            pad_multiple=math.lcm(encoder_t1.output_stride, encoder_t2.output_stride),
        )
        self.encoder_t1 = encoder_t1
        self.encoder_t2 = encoder_t2
        self.project_t1 = nn.ModuleList(_projection(c, w) for c, w in zip(encoder_t1.out_channels, widths))
        self.project_t2 = nn.ModuleList(_projection(c, w) for c, w in zip(encoder_t2.out_channels, widths))

    def encode_pair(self, t1: torch.Tensor, t2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        f1 = [p(f) for p, f in zip(self.project_t1, self.encoder_t1(t1))]
        f2 = [p(f) for p, f in zip(self.project_t2, self.encoder_t2(t2))]
        return f1, f2


def _level_widths(
    channels_t1: Sequence[int], channels_t2: Sequence[int], feature_channels: Sequence[int] | None
) -> list[int]:
    """Common width per level: ``feature_channels`` for the levels both encoders have, else the smaller."""
    if len(channels_t1) != len(channels_t2):
        raise ModelError(f"the two encoders have different depths: {len(channels_t1)} vs {len(channels_t2)} levels")
    shared = [i for i, (a, b) in enumerate(zip(channels_t1, channels_t2)) if a and b]
    if feature_channels is None:
        chosen = [min(channels_t1[i], channels_t2[i]) for i in shared]
    elif len(feature_channels) == len(shared) and min(feature_channels, default=1) > 0:
        chosen = list(feature_channels)
    else:
        raise ModelError(
            f"feature_channels needs {len(shared)} positive widths (one per level both encoders have), "
            f"got {list(feature_channels)}"
        )
    widths = [0] * len(channels_t1)
    for i, width in zip(shared, chosen):
        widths[i] = width
    return widths


@register_model("pseudo-siamese-unet", family="pseudo-siamese")
def pseudo_siamese_unet(
    in_channels: int | Sequence[int] = 3,
    encoder_t1: str = "resnet18",
    encoder_t2: str = "resnet18",
    fusion: str = "absdiff",
    feature_channels: Sequence[int] | None = None,
    decoder_channels: Sequence[int] | None = None,
) -> PseudoSiameseNet:
    """Pseudo-Siamese U-Net: unshared per-date encoders, 1x1-projected to common widths.

    Args:
        in_channels: bands of both dates (int) or ``(date-1 bands, date-2 bands)``.
        encoder_t1: encoder of date 1 (see :mod:`changedet.models.encoders`).
        encoder_t2: encoder of date 2.
        fusion: per-level fusion, one of :data:`~changedet.models.fusion.FUSIONS`.
        feature_channels: projected width of each level both encoders have (default: the smaller).
        decoder_channels: U-Net width per decoder block.
    """
    bands_t1, bands_t2 = band_pair(in_channels, shared=False)
    return PseudoSiameseNet(
        FeatureEncoder(encoder_t1, bands_t1),
        FeatureEncoder(encoder_t2, bands_t2),
        Fusion(fusion),
        decoder="unet",
        feature_channels=feature_channels,
        decoder_channels=decoder_channels,
    )


@register_model("pseudo-siamese-fc", family="pseudo-siamese")
def pseudo_siamese_fc(
    in_channels: int | Sequence[int] = 3,
    base_channels: int = 8,
    fusion: str = "absdiff",
    dropout: float = 0.0,
) -> PseudoSiameseNet:
    """Light pseudo-Siamese FC network: two unshared FC-Siam encoders, projected levels, FC decoder.

    Args:
        in_channels: bands of both dates (int) or ``(date-1 bands, date-2 bands)``.
        base_channels: width of the first level (levels are 1, 2, 4, 8, 8 times it).
        fusion: per-level fusion, one of :data:`~changedet.models.fusion.FUSIONS`.
        dropout: Dropout2d after every convolution.
    """
    bands_t1, bands_t2 = band_pair(in_channels, shared=False)
    return PseudoSiameseNet(
        FCEncoder(bands_t1, base_channels, dropout),
        FCEncoder(bands_t2, base_channels, dropout),
        Fusion(fusion),
        decoder=lambda fused: FCDecoder(fused, base_channels, dropout),
    )


class PixelEncoder(nn.Module):
    """Per-pixel encoder: ``depth`` 1x1 conv + BatchNorm + ReLU layers, one level at stride 1."""

    def __init__(self, in_channels: int, width: int = 64, embedding_channels: int = 32, depth: int = 2) -> None:
        super().__init__()
        widths = [in_channels] + [width] * (depth - 1) + [embedding_channels]
        layers: list[nn.Module] = []
        for c_in, c_out in pairwise(widths):
            layers += [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers[:-1])  # the embedding itself is not rectified
        self.in_channels = in_channels
        self.out_channels: tuple[int, ...] = (embedding_channels,)
        self.reductions: tuple[int, ...] = (1,)
        self.output_stride = 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.layers(x)]


class _FusedPassthrough(nn.Module):
    """The "decoder" of the per-pixel model: the fused embedding level itself."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return features[0]


@register_model("pseudo-siamese-pixel", family="pseudo-siamese")
def pseudo_siamese_pixel(
    in_channels: int | Sequence[int] = 3,
    base_channels: int = 64,
    feature_channels: Sequence[int] | None = None,
    fusion: str = "absdiff",
) -> PseudoSiameseNet:
    """Per-pixel pseudo-Siamese network: two unshared 1x1-conv encoders into one embedding space.

    Args:
        in_channels: bands of both dates (int) or ``(date-1 bands, date-2 bands)``.
        base_channels: hidden width of each encoder.
        feature_channels: ``[embedding width]`` (default 32).
        fusion: fusion of the two embeddings before the 3x3 change head.
    """
    bands_t1, bands_t2 = band_pair(in_channels, shared=False)
    width = feature_channels[0] if feature_channels else 32
    return PseudoSiameseNet(
        PixelEncoder(bands_t1, base_channels, width),
        PixelEncoder(bands_t2, base_channels, width),
        Fusion(fusion),
        decoder=lambda fused: _FusedPassthrough(fused[0]),
        feature_channels=feature_channels,
    )
