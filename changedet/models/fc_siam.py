"""The fully convolutional change detection networks of Daudt, Le Saux & Boulch (ICIP 2018).

* ``fc-ef``: early fusion, the two dates concatenated along bands into one U-Net;
* ``fc-siam-conc``: a weight-shared encoder, the decoder gets the concatenated skips of both dates;
* ``fc-siam-diff``: a weight-shared encoder, the decoder gets the absolute difference of the skips.

Layer widths follow the paper (16-32-64-128, 2-2-3-3 convolutions per level, BatchNorm, ReLU,
Dropout 0.2, max-pooling, stride-2 transposed convolutions, output stride 16), with one change
logit instead of two-class log-softmax. The reference code feeds the decoder the bottleneck of
date 2 only; here the bottleneck is fused like the skips, which keeps ``fc-siam-diff`` swap-invariant.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from changedet.models.base import ChangeModel
from changedet.models.bitemporal import band_pair, check_pair, crop_to, pad_to_multiple
from changedet.models.decoders import SegmentationHead
from changedet.models.fusion import Fusion, feature_distance
from changedet.models.output import ChangeOutput
from changedet.models.registry import register_model
from changedet.models.siamese import SiameseNet


def _convs(widths: Sequence[int], dropout: float) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU + Dropout2d between consecutive ``widths``."""
    layers: list[nn.Module] = []
    for c_in, c_out in pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class FCEncoder(nn.Module):
    """Four conv stages with 2x2 max-pooling; levels at strides 1, 2, 4, 8 and the stride-16 bottleneck."""

    def __init__(self, in_channels: int, base_channels: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        w0, w1, w2, w3 = (base_channels * m for m in (1, 2, 4, 8))
        self.stages = nn.ModuleList(
            [
                _convs([in_channels, w0, w0], dropout),
                _convs([w0, w1, w1], dropout),
                _convs([w1, w2, w2, w2], dropout),
                _convs([w2, w3, w3, w3], dropout),
            ]
        )
        self.in_channels = in_channels
        self.out_channels: tuple[int, ...] = (w0, w1, w2, w3, w3)
        self.reductions: tuple[int, ...] = (1, 2, 4, 8, 16)
        self.output_stride = 16

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
            x = F.max_pool2d(x, 2)
        return [*levels, x]


class FCDecoder(nn.Module):
    """Transposed-conv upsampling from the bottleneck, concatenating each (fused) skip level."""

    def __init__(self, channels: Sequence[int], base_channels: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        w0, w1, w2, w3 = (base_channels * m for m in (1, 2, 4, 8))
        *skips, bottom = channels
        s0, s1, s2, s3 = skips
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
            for c_in, c_out in ((bottom, w3), (w2, w2), (w1, w1), (w0, w0))
        )
        self.blocks = nn.ModuleList(
            [
                _convs([w3 + s3, w3, w3, w2], dropout),
                _convs([w2 + s2, w2, w2, w1], dropout),
                _convs([w1 + s1, w1, w0], dropout),
                _convs([w0 + s0, w0], dropout),
            ]
        )
        self.out_channels = w0

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        *skips, x = features
        for up, block, skip in zip(self.up, self.blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return x


class FCEarlyFusion(ChangeModel):
    """FC-EF: one U-Net on the band-concatenated dates (one parameter set, not swap-invariant).

    It has no per-date features, so ``difference`` is :func:`feature_distance` of the input band
    vectors, and there are no embeddings.
    """

    weights_shared = True
    swap_invariant = False

    def __init__(self, in_channels: int, base_channels: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.in_channels = (in_channels, in_channels)
        self.encoder = FCEncoder(2 * in_channels, base_channels, dropout)
        self.decoder = FCDecoder(self.encoder.out_channels, base_channels, dropout)
        self.head = SegmentationHead(self.decoder.out_channels)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        check_pair(self, t1, t2)
        size = tuple(t1.shape[-2:])
        x = pad_to_multiple(torch.cat([t1, t2], dim=1), self.encoder.output_stride)
        padded = tuple(x.shape[-2:])
        logits = self.head(self.decoder(self.encoder(x), padded), padded)
        return ChangeOutput(logits=crop_to(logits, size), difference=feature_distance(t1, t2))


def _fc_siamese(in_channels: int | Sequence[int], fusion: str, base_channels: int, dropout: float) -> SiameseNet:
    bands, _ = band_pair(in_channels, shared=True)
    encoder = FCEncoder(bands, base_channels, dropout)
    fusion_module = Fusion(fusion)
    decoder = FCDecoder([fusion_module.out_channels(c) for c in encoder.out_channels], base_channels, dropout)
    return SiameseNet(encoder, fusion_module, decoder)


@register_model("fc-ef", family="fc-siam")
def fc_ef(in_channels: int | Sequence[int] = 3, base_channels: int = 16, dropout: float = 0.2) -> FCEarlyFusion:
    """FC-EF (Daudt et al. 2018): early fusion U-Net on the concatenated dates."""
    bands, _ = band_pair(in_channels, shared=True)
    return FCEarlyFusion(bands, base_channels, dropout)


@register_model("fc-siam-conc", family="fc-siam")
def fc_siam_conc(in_channels: int | Sequence[int] = 3, base_channels: int = 16, dropout: float = 0.2) -> SiameseNet:
    """FC-Siam-conc (Daudt et al. 2018): shared encoder, concatenated skips."""
    return _fc_siamese(in_channels, "concat", base_channels, dropout)


@register_model("fc-siam-diff", family="fc-siam")
def fc_siam_diff(in_channels: int | Sequence[int] = 3, base_channels: int = 16, dropout: float = 0.2) -> SiameseNet:
    """FC-Siam-diff (Daudt et al. 2018): shared encoder, absolute-difference skips."""
    return _fc_siamese(in_channels, "absdiff", base_channels, dropout)
