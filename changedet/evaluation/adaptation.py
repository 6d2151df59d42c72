"""Test-time adaptation to a target scene: AdaBN and per-band histogram matching.

* :func:`adabn` (Li et al., "Revisiting batch normalization for practical domain adaptation",
  2016): re-estimate every BatchNorm layer's running mean/variance on the target scene's tiles
  (tiled and normalised by the scene runner, as detect does); no other weight changes, no labels.
* :func:`match_histograms`: monotone per-band mapping of one date's values onto a reference
  distribution (quantiles), e.g. t2 onto t1 of the same scene (relative radiometric normalisation),
  or both dates onto the training data (:func:`reference_quantiles`) across sensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from changedet.data.scenes import ChangeScene
from changedet.harmonization import QUANTILES, QuantileMap, band_quantiles, sample_quantiles
from changedet.models import ChangeModel
from changedet.normalization import Normalization
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE, Tiling
from changedet.pipeline.validation import scene_runner

__all__ = ["QUANTILES", "adabn", "band_quantiles", "batchnorm_layers", "match_histograms", "match_scene", "reference_quantiles"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adabn(
    model: ChangeModel,
    scenes: Sequence[ChangeScene],
    normalization: Normalization | dict[str, Any] | str,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> ChangeModel:
    """A copy of ``model`` whose BatchNorm statistics are the cumulative averages over the tiles of
    ``scenes`` (labels unused); ``model`` itself is not modified.

    The tiles are the batches of the one scene runner (:meth:`SceneRunner.normalized_batches`):
    detect's tiling and normalisation. Statistics are gathered in training mode (dropout active,
    seeded), the regime in which the original running statistics were accumulated: with dropout
    off, the activations that follow a dropout layer have a smaller variance than the network was
    trained to expect.
    """
    adapted = copy.deepcopy(model)
    layers = batchnorm_layers(adapted)
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over all target batches
    tiling = Tiling(tile, overlap)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for scene in scenes:
            runner = scene_runner(adapted, scene, normalization, tiling, batch_size, device)
            adapted.train()
            try:
                with torch.no_grad():
                    for _batch, z1, z2 in runner.normalized_batches(scene.read, scene.shape):
                        adapted(z1, z2)
            finally:
                adapted.eval()
    for bn, momentum in zip(layers, momenta):
        bn.momentum = momentum
    return adapted.eval()


def reference_quantiles(scenes: Sequence[ChangeScene], n: int = QUANTILES) -> np.ndarray:
    """Quantiles of both dates of ``scenes`` pooled (a source domain's per-band distribution)."""
    pixels = []
    for scene in scenes:
        x1, x2, valid = scene.pixels()
        pixels += [x1[:, valid], x2[:, valid]]
    return sample_quantiles(np.concatenate(pixels, axis=1).T, n)


def match_histograms(x: np.ndarray, valid: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map each band of ``x (C, H, W)`` onto the ``reference (C, n)`` quantiles; invalid pixels untouched."""
    if reference.shape[0] != x.shape[0]:
        raise ValueError(f"reference has {reference.shape[0]} bands, the image {x.shape[0]}")
    return QuantileMap(band_quantiles(x, valid, reference.shape[1]), reference).apply(x, valid)


def match_scene(scene: ChangeScene, reference: np.ndarray | None = None) -> ChangeScene:
    """Histogram-matching baseline: ``reference=None`` maps t2 onto t1 of the same scene; otherwise
    both dates are mapped onto ``reference`` quantiles (:func:`reference_quantiles`)."""
    x1, x2, valid = scene.pixels()
    if reference is None:
        return scene.with_pixels(x1, match_histograms(x2, valid, band_quantiles(x1, valid)))
    return scene.with_pixels(match_histograms(x1, valid, reference), match_histograms(x2, valid, reference))
