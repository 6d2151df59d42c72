"""Full-scene validation: labelled scenes through the scene-inference runner into probability histograms.

Every scene is tiled, predicted, blended (:class:`~changedet.pipeline.inference.SceneRunner`, the
path ``changedet detect`` takes) and compared row block by row block with its label; the per-scene
:class:`~changedet.metrics.ProbabilityHistogram` s give metrics at any threshold
(:class:`~changedet.metrics.ValidationResult`). Training validation, the evaluation stages and the
benchmarks score through :func:`evaluate_scenes`.

A *labelled scene* is anything with ``name``, ``shape``, ``read(window) -> (x1, x2, valid)``,
``label`` (``(H, W)`` uint8: 0 no change, 1 change, :data:`IGNORE` unknown) and
``label_window(window)`` — :class:`changedet.data.scenes.ChangeScene` in this package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from rasterio.windows import Window

from changedet.metrics import DEFAULT_BINS, IGNORE, ProbabilityHistogram, ValidationResult
from changedet.models import ChangeModel
from changedet.normalization import Normalization
from changedet.pipeline.inference import InputTransform, SceneRunner
from changedet.pipeline.smoothing import Smoothing
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE, Tiling


class LabelledScene(Protocol):
    """What validation needs of a scene (see the module docstring)."""

    name: str
    shape: tuple[int, int]
    label: np.ndarray

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...  # noqa: D102

    def label_window(self, window: Window) -> np.ndarray: ...  # noqa: D102


def scene_runner(
    model: ChangeModel,
    scene: LabelledScene,
    normalization: Normalization | dict[str, Any] | str,
    tiling: Tiling | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    amp: bool = False,
    transform: InputTransform | None = None,
    smoothing: Smoothing | None = None,
) -> SceneRunner:
    """The runner of ``model`` on ``scene`` (per-scene statistics resolved on the scene itself)."""
    norm = Normalization.of(normalization).for_scene(scene.read, *scene.shape, scene.name)
    return SceneRunner(model, norm, tiling, batch_size, device, amp, transform, smoothing)


def evaluate_scenes(
    model: ChangeModel,
    scenes: Sequence[LabelledScene],
    normalization: Normalization | dict[str, Any] | str,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    amp: bool = False,
    bins: int = DEFAULT_BINS,
    progress: Callable[[str], None] | None = None,
    transform: InputTransform | None = None,
    blend: str = "cosine",
    smoothing: Smoothing | None = None,
) -> ValidationResult:
    """Predict every labelled scene whole and collect per-scene probability histograms.

    Pixels count where the data are valid on both dates and the label is known. ``transform``
    replaces the raw tiles of each batch before normalisation (an attack, a shift); it sees the
    tiles' labels in :attr:`~changedet.pipeline.inference.TileBatch.label`. With ``smoothing`` the
    histograms are of the vote fractions (use ``blend="owner"``, as detect does).
    """
    tiling = Tiling(tile, overlap, blend)
    out: dict[str, ProbabilityHistogram] = {}
    for scene in scenes:
        hist = ProbabilityHistogram(bins)
        label = scene.label

        def sink(row_off: int, prob: np.ndarray, _diff: np.ndarray, valid: np.ndarray, label=label, hist=hist) -> None:
            rows = label[row_off : row_off + prob.shape[0]]
            hist.update(np.nan_to_num(prob, nan=0.0), rows == 1, valid & (rows != IGNORE))

        runner = scene_runner(model, scene, normalization, tiling, batch_size, device, amp, transform, smoothing)
        runner.run(scene.read, scene.shape, sink, scene.label_window if transform is not None else None)
        out[scene.name] = hist
        if progress:
            progress(scene.name)
    return ValidationResult(out, bins)
