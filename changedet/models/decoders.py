"""Decoders from fused feature pyramids to a dense map, and the one-logit segmentation head.

A decoder takes the fused features ``[level_0, ..., level_n]`` (finest first, level ``i`` at
stride ``2**(i+1)``, possibly 0-channel for levels an encoder lacks) and the padded input size,
and returns ``(B, out_channels, h, w)`` at the input size or at a fixed stride of it.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

from changedet.errors import ModelError

DecoderKind = Literal["unet", "fpn"]
DECODERS: tuple[str, ...] = get_args(DecoderKind)


class UNetDecoder(nn.Module):
    """U-Net decoder (smp's ``UnetDecoder`` blocks): upsample x2, concatenate the skip, two 3x3 convs.

    ``decoder_channels`` has one width per block; the last block works at the input size. The
    default narrows with resolution, ``max(16, min(128, 8 * stride))``, to stay cheap on CPU.
    """

    def __init__(self, channels: Sequence[int], decoder_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        strides = [2 ** (len(channels) - 1 - i) for i in range(len(channels))]  # each block's output stride
        widths = tuple(decoder_channels or (max(16, min(128, 8 * s)) for s in strides))
        if len(widths) != len(channels):
            raise ModelError(f"unet decoder_channels needs {len(channels)} widths (one per block), got {len(widths)}")
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder as SmpUnetDecoder  # lazy: ~300 MB

        # smp expects a stride-1 entry first; its channels are never used (the input is no skip).
        self.decoder = SmpUnetDecoder(encoder_channels=[0, *channels], decoder_channels=widths, n_blocks=len(widths))
        self.out_channels = widths[-1]

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        full = features[0].new_empty((features[0].shape[0], 0, *size))  # only its size is used
        return self.decoder([full, *features])


class FPNDecoder(nn.Module):
    """Feature Pyramid Network decoder (smp's ``FPNDecoder``) over the four coarsest levels; output at stride 4.

    ``decoder_channels = (pyramid_channels, segmentation_channels)``; the segmentation width must be
    a multiple of 32 and at least 64 (GroupNorm with 32 groups of at least two channels, so that a
    single 1x1 map at stride 32 can still be normalised).
    """

    def __init__(self, channels: Sequence[int], decoder_channels: Sequence[int] | None = None) -> None:
        super().__init__()
        widths = tuple(decoder_channels or (64, 64))
        if len(widths) != 2:
            raise ModelError(f"fpn decoder_channels is (pyramid, segmentation), got {list(widths)}")
        pyramid, segmentation = widths
        if len(channels) < 4 or 0 in channels[-4:]:
            raise ModelError(f"fpn decoder needs four non-empty coarsest levels, got channels {tuple(channels)}")
        if segmentation % 32 or segmentation < 64:
            raise ModelError(f"fpn segmentation channels must be a multiple of 32 and at least 64, got {segmentation}")
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder as SmpFPNDecoder  # lazy: ~300 MB

        self.decoder = SmpFPNDecoder(
            encoder_channels=list(channels[-4:]),
            encoder_depth=3,
            pyramid_channels=pyramid,
            segmentation_channels=segmentation,
        )
        self.out_channels = self.decoder.out_channels

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.decoder(list(features[-4:]))


class SegmentationHead(nn.Module):
    """3x3 convolution to one change logit, bilinearly upsampled to ``size`` when coarser."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.conv(x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def create_decoder(kind: str, channels: Sequence[int], decoder_channels: Sequence[int] | None = None) -> nn.Module:
    """Build the ``kind`` decoder (see :data:`DECODERS`) for fused level widths ``channels``."""
    if kind == "unet":
        return UNetDecoder(channels, decoder_channels)
    if kind == "fpn":
        return FPNDecoder(channels, decoder_channels)
    raise ModelError(f"unknown decoder {kind!r}; use one of {', '.join(DECODERS)}")
