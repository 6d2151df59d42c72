"""A small bitemporal image transformer (BIT-like; Chen, Qi & Shi, IEEE TGRS 2021).

A shared CNN maps each date to a stride-4 feature map; a spatial-attention tokenizer pools each
map into a few semantic tokens; a transformer encoder relates the tokens of both dates; a
cross-attention decoder refines each date's pixels with that date's tokens; the refined maps are
fused (``absdiff`` by default) and classified.

Differences from the paper: the CNN features come from the encoder's stride-8 level (upsampled),
the token positional embedding is shared by both dates (so, with a symmetric fusion, swapping the
dates gives the same logits), the decoder has no fixed-size pixel positional embedding (any tile
size works), and the classifier runs at stride 4 with the logits upsampled.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from changedet.errors import ModelError
from changedet.models.bitemporal import BitemporalNet, band_pair
from changedet.models.encoders import FeatureEncoder
from changedet.models.fusion import Fusion
from changedet.models.registry import register_model


class SemanticTokenizer(nn.Module):
    """``(B, C, H, W) -> (B, L, C)``: L softmax spatial attention maps pool the pixels into tokens."""

    def __init__(self, channels: int, tokens: int) -> None:
        super().__init__()
        self.attention = nn.Conv2d(channels, tokens, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.attention(x).flatten(2).softmax(dim=-1)  # (B, L, HW)
        return weights @ x.flatten(2).transpose(1, 2)


class TokenDecoderLayer(nn.Module):
    """Pre-norm cross-attention (pixels query tokens) and MLP, both residual; no pixel self-attention."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm_pixels = nn.LayerNorm(channels)
        self.norm_tokens = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.norm_tokens(tokens)
        pixels = pixels + self.attention(self.norm_pixels(pixels), memory, memory, need_weights=False)[0]
        return pixels + self.mlp(self.norm_mlp(pixels))


class BITClassifier(nn.Module):
    """3x3 conv + BatchNorm + ReLU on the fused stride-4 map (the decoder of :class:`BITNet`)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.out_channels = out_channels

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.block(features[-1])


class BITNet(BitemporalNet):
    """Shared CNN + semantic tokens + transformer; one stride-4 level per date is fused and classified."""

    def __init__(
        self,
        encoder: FeatureEncoder,
        fusion: Fusion,
        token_channels: int = 32,
        tokens: int = 4,
        encoder_layers: int = 1,
        decoder_layers: int = 8,
        heads: int = 4,
    ) -> None:
        if token_channels % heads:
            raise ModelError(f"heads ({heads}) must divide token_channels ({token_channels})")
        super().__init__(
            in_channels=(encoder.in_channels, encoder.in_channels),
            weights_shared=True,
            fusion=fusion,
            decoder=BITClassifier(fusion.out_channels(token_channels), token_channels),
            level_channels=[token_channels],
            reductions=[encoder.output_stride // 2],
            pad_multiple=encoder.output_stride,
        )
        self.encoder = encoder
        self.reduce = nn.Conv2d(encoder.out_channels[-1], token_channels, 3, padding=1)
        self.tokenizer = SemanticTokenizer(token_channels, tokens)
        self.token_position = nn.Parameter(torch.randn(1, tokens, token_channels))
        layer = nn.TransformerEncoderLayer(
            token_channels, heads, dim_feedforward=2 * token_channels, dropout=0.0, batch_first=True, norm_first=True
        )
        self.token_encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        self.token_decoder = nn.ModuleList(TokenDecoderLayer(token_channels, heads) for _ in range(decoder_layers))

    def encode_pair(self, t1: torch.Tensor, t2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batch = t1.shape[0]
        x = self.reduce(self.encoder(torch.cat([t1, t2], dim=0))[-1])
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # stride 8 -> 4
        tokens = self.tokenizer(x) + self.token_position  # (2B, L, C), same positions for both dates
        tokens = self.token_encoder(torch.cat([tokens[:batch], tokens[batch:]], dim=1))  # (B, 2L, C)
        tokens = torch.cat(tokens.chunk(2, dim=1), dim=0)  # back to (2B, L, C)
        pixels = x.flatten(2).transpose(1, 2)
        for layer in self.token_decoder:
            pixels = layer(pixels, tokens)
        x = pixels.transpose(1, 2).reshape(x.shape)
        return [x[:batch]], [x[batch:]]


@register_model("siam-bit-resnet18", family="siamese")
def siam_bit_resnet18(
    in_channels: int | Sequence[int] = 3,
    fusion: str = "absdiff",
    token_channels: int = 32,
    tokens: int = 4,
    encoder_layers: int = 1,
    decoder_layers: int = 8,
    heads: int = 4,
) -> BITNet:
    """BIT-like transformer head on a shared ResNet-18 (stages up to stride 8).

    Args:
        in_channels: bands per date (an int, or an equal pair).
        fusion: fusion of the refined maps, one of :data:`~changedet.models.fusion.FUSIONS`.
        token_channels: width of the tokens and refined maps.
        tokens: semantic tokens per date.
        encoder_layers: transformer encoder layers over the tokens of both dates.
        decoder_layers: cross-attention decoder layers.
        heads: attention heads (must divide ``token_channels``).
    """
    bands, _ = band_pair(in_channels, shared=True)
    encoder = FeatureEncoder("resnet18", bands, depth=3)
    return BITNet(encoder, Fusion(fusion), token_channels, tokens, encoder_layers, decoder_layers, heads)
