"""The encode / fuse / decode skeleton shared by the neural change models, and tile helpers.

Models pad each tile (replicate) to a multiple of their output stride and crop every output
back, so any tile size works; see :func:`pad_to_multiple`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from changedet.errors import ModelError
from changedet.models.base import ChangeModel
from changedet.models.decoders import SegmentationHead
from changedet.models.fusion import Fusion, feature_distance
from changedet.models.output import ChangeOutput


def band_pair(in_channels: int | Sequence[int], shared: bool) -> tuple[int, int]:
    """``in_channels`` as ``(date-1 bands, date-2 bands)``; weight-shared models need them equal."""
    pair = (in_channels, in_channels) if isinstance(in_channels, int) else tuple(int(c) for c in in_channels)
    if len(pair) != 2 or min(pair) < 1:
        raise ModelError(f"in_channels must be a positive int or a pair of them, got {in_channels!r}")
    if shared and pair[0] != pair[1]:
        raise ModelError(
            f"a weight-shared model needs the same bands on both dates, got {pair}; use pseudo-siamese-unet"
        )
    return pair  # type: ignore[return-value]


def check_pair(model: ChangeModel, t1: torch.Tensor, t2: torch.Tensor) -> None:
    """Raise :class:`ModelError` unless ``t1``/``t2`` are ``(B, C, H, W)`` tiles the model accepts."""
    if t1.ndim != 4 or t2.ndim != 4:
        raise ModelError(f"expected (B, C, H, W) tiles, got shapes {tuple(t1.shape)} and {tuple(t2.shape)}")
    bands = (t1.shape[1], t2.shape[1])
    if bands != tuple(model.in_channels):
        expected = "+".join(map(str, model.in_channels))
        raise ModelError(f"model expects {expected} bands, got {bands[0]}+{bands[1]}")
    if t1.shape[0] != t2.shape[0] or t1.shape[-2:] != t2.shape[-2:]:
        raise ModelError(f"the two dates differ in batch or tile size: {tuple(t1.shape)} vs {tuple(t2.shape)}")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom/right of ``x`` so height and width are multiples of ``multiple``."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The top-left ``size`` window of ``x`` (undoes :func:`pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]


class BitemporalNet(ChangeModel):
    """Encode both dates to feature pyramids, fuse every level, decode, predict one change logit.

    Subclasses implement :meth:`encode_pair`. ``difference`` is :func:`feature_distance` at the
    finest non-empty level (the embeddings), upsampled to the tile size.

    Args:
        in_channels: bands of date 1 and date 2.
        weights_shared: both dates go through one parameter set.
        fusion: per-level fusion.
        decoder: ``decoder(fused_levels, padded_size)``, with an ``out_channels`` attribute.
        level_channels: per-date channels of each level (0: the level is empty).
        reductions: stride of each level.
        pad_multiple: tiles are padded to a multiple of this.
    """

    def __init__(
        self,
        in_channels: tuple[int, int],
        weights_shared: bool,
        fusion: Fusion,
        decoder: nn.Module,
        level_channels: Sequence[int],
        reductions: Sequence[int],
        pad_multiple: int,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.weights_shared = weights_shared
        self.fusion = fusion
        self.decoder = decoder
        self.head = SegmentationHead(decoder.out_channels)
        self.embedding_level = next(i for i, c in enumerate(level_channels) if c > 0)
        self.embedding_stride = reductions[self.embedding_level]
        self.pad_multiple = pad_multiple

    @property
    def swap_invariant(self) -> bool:
        """True when ``forward(t1, t2)`` and ``forward(t2, t1)`` give the same logits."""
        return self.weights_shared and self.fusion.symmetric

    def encode_pair(self, t1: torch.Tensor, t2: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Feature pyramids of both (padded) dates, level by level of equal shapes."""
        raise NotImplementedError

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        check_pair(self, t1, t2)
        size = tuple(t1.shape[-2:])
        t1, t2 = pad_to_multiple(t1, self.pad_multiple), pad_to_multiple(t2, self.pad_multiple)
        padded = tuple(t1.shape[-2:])
        features_t1, features_t2 = self.encode_pair(t1, t2)
        fused = [self.fusion(a, b) for a, b in zip(features_t1, features_t2)]
        logits = self.head(self.decoder(fused, padded), padded)
        e1, e2 = features_t1[self.embedding_level], features_t2[self.embedding_level]
        difference = F.interpolate(feature_distance(e1, e2), size=padded, mode="bilinear", align_corners=False)
        embedding_size = [math.ceil(s / self.embedding_stride) for s in size]
        return ChangeOutput(
            logits=crop_to(logits, size),
            difference=crop_to(difference, size),
            embeddings_t1=crop_to(e1, embedding_size),
            embeddings_t2=crop_to(e2, embedding_size),
        )
