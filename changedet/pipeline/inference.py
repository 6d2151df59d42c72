"""The scene-inference runner: one path from an aligned pair and a model to blended change
probability and difference.

For every batch of tiles of a :class:`~changedet.pipeline.tiling.Tiling`, :class:`SceneRunner`

1. reads the raw tiles of both dates and their valid mask (``read(window)``: a
   :class:`~changedet.pipeline.align.PairReader` in detect, a
   :class:`~changedet.data.scenes.ChangeScene` in training and evaluation);
2. applies the *input transform* hook, if any, to the raw values (an adversarial attack, a
   radiometric shift, a harmonisation), with the tiles' labels when the scene has them;
3. normalises both dates (:class:`~changedet.normalization.Normalization`: invalid pixels 0);
4. runs the model in eval mode without autograd, in calls of at most :data:`CPU_PIXELS_PER_CALL`
   pixels on the CPU: a torch :class:`~changedet.models.ChangeModel`, or an export run by ONNX
   Runtime on numpy arrays (:class:`~changedet.runtime.ort.OnnxArrays`, without importing torch);
5. blends the overlapping tiles (:class:`~changedet.pipeline.mosaic.StreamingMosaic`) and hands
   finished rows to a sink.

``changedet detect`` runs steps 1–4 per batch in its workers (:meth:`SceneRunner.predict`), keeps the
tiles in a tile store and blends them with the same mosaic when writing; training validation and the
evaluation stages run :meth:`SceneRunner.run`. Model adaptation (AdaBN) iterates the same normalised
batches (:meth:`SceneRunner.normalized_batches`). So what validation scores is what detect writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
from rasterio.windows import Window

from changedet.normalization import Normalization, PairRead
from changedet.runtime.ort import OnnxArrays
from changedet.pipeline.mosaic import StreamingMosaic
from changedet.pipeline.smoothing import Smoothing
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, Tile, Tiling

if TYPE_CHECKING:  # torch models bring torch; an ONNX Runtime export runs without it
    import torch

    from changedet.models import ChangeModel
    from changedet.models.output import ChangeOutput

CPU_PIXELS_PER_CALL = 1 << 17  # see SceneRunner._calls
#: what a runner runs: a torch change model, or an export on numpy arrays
RunnableModel = Union["ChangeModel", OnnxArrays]


@dataclass
class TileBatch:
    """Raw tiles of both dates: ``x1 (B, C1, h, w)``, ``x2 (B, C2, h, w)``, ``valid (B, h, w)`` and,
    for labelled scenes, ``label (B, h, w)`` (0 no change, 1 change, ``IGNORE`` unknown)."""

    tiles: list[Tile]
    x1: np.ndarray
    x2: np.ndarray
    valid: np.ndarray
    label: np.ndarray | None = None


LabelWindow = Callable[[Window], np.ndarray]


def read_batch(read: PairRead, tiles: list[Tile], label: LabelWindow | None = None) -> TileBatch:
    """The raw :class:`TileBatch` of ``tiles`` (with their labels when ``label`` is given)."""
    reads = [read(t.window) for t in tiles]
    x1, x2, valid = (np.stack([r[k] for r in reads]) for k in range(3))
    return TileBatch(tiles, x1, x2, valid, None if label is None else np.stack([label(t.window) for t in tiles]))


#: ``transform(runner, batch) -> (x1, x2)``: raw tiles to predict instead of ``batch.x1, batch.x2``
InputTransform = Callable[["SceneRunner", TileBatch], tuple[np.ndarray, np.ndarray]]
#: ``sink(row_off, probability (n, W), difference (n, W), valid (n, W))``: finished rows, top to bottom
SceneSink = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


class SceneRunner:
    """Runs a :class:`~changedet.models.ChangeModel` over the tiles of a scene (see the module docstring).

    Args:
        model: the change model: a torch :class:`~changedet.models.ChangeModel` (eager, or an ONNX
            export behind :class:`~changedet.runtime.onnx.OnnxChangeModel`) or an
            :class:`~changedet.runtime.ort.OnnxArrays` export run on numpy arrays.
        normalization: fixed statistics for this scene (resolve per-scene rules first with
            :meth:`Normalization.for_scene`).
        tiling: tile size, overlap and blend mode.
        batch_size: tiles read and transformed together.
        device: where the model runs.
        amp: CUDA autocast (ignored on the CPU).
        transform: input transform applied to the raw tiles of every batch.
        smoothing: randomized smoothing (:mod:`changedet.pipeline.smoothing`): :meth:`predict` returns the
            vote fraction of ``smoothing.samples`` noisy passes and their mean difference.
    """

    def __init__(
        self,
        model: RunnableModel,
        normalization: Normalization,
        tiling: Tiling | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: "torch.device | str" = "cpu",
        amp: bool = False,
        transform: InputTransform | None = None,
        smoothing: Smoothing | None = None,
    ) -> None:
        self.model = model
        self.normalization = normalization
        self.tiling = tiling or Tiling()
        self.batch_size = int(batch_size)
        self.device = str(device)
        self.device_type = self.device.partition(":")[0]
        self.amp = amp and self.device_type == "cuda"
        if isinstance(model, OnnxArrays) and self.device_type != "cpu":
            raise ValueError("an ONNX Runtime export runs on the CPU")
        self.transform = transform
        self.smoothing = smoothing
        self.model_seconds = 0.0

    def inputs(self, batch: TileBatch) -> tuple[np.ndarray, np.ndarray]:
        """Normalised model inputs of ``batch`` as float32 arrays (after the input transform)."""
        x1, x2 = self.transform(self, batch) if self.transform is not None else (batch.x1, batch.x2)
        return tuple(self.normalization.apply(x, batch.valid, d) for d, x in enumerate((x1, x2)))

    def tensors(self, batch: TileBatch) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Normalised model inputs of ``batch`` on the device (after the input transform)."""
        import torch

        z1, z2 = self.inputs(batch)
        return torch.from_numpy(z1).to(self.device), torch.from_numpy(z2).to(self.device)

    def _calls(self, tiles: int, pixels_per_tile: int) -> list[slice]:
        """Model calls of at most :data:`CPU_PIXELS_PER_CALL` pixels on the CPU (one call on a GPU).

        Activations of a large CPU batch outgrow glibc's mmap threshold (32 MiB at most), so every
        forward maps and zero-fills fresh pages: with 4 tiles of 512² about 40 % of the time went to
        page faults. Calls of ~128 k pixels stay in heap memory that
        :func:`changedet.runtime.memory.keep_freed_memory` keeps for the next call (1.7x faster for FC-Siam-diff).
        """
        step = tiles if self.device_type != "cpu" else max(1, CPU_PIXELS_PER_CALL // pixels_per_tile)
        return [slice(i, i + step) for i in range(0, tiles, step)]

    def forward(self, z1: "torch.Tensor", z2: "torch.Tensor") -> list["ChangeOutput"]:
        """The torch model's outputs for normalised inputs ``(B, C, h, w)`` (eval mode, no autograd), in the calls of :meth:`_calls`."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), torch.autocast(self.device_type, enabled=self.amp):
                return [self.model(z1[part], z2[part]) for part in self._calls(z1.shape[0], z1.shape[2] * z1.shape[3])]
        finally:
            self.model.train(was_training)

    def predict(self, batch: TileBatch) -> tuple[np.ndarray, np.ndarray]:
        """Change probability and difference ``(B, h, w)`` float32 of one batch (NaN for a batch
        without any valid pixel; values outside ``valid`` are not meaningful). With smoothing: the
        fraction of noisy passes above the threshold, and the mean difference."""
        if not batch.valid.any():
            empty = np.full(batch.valid.shape, np.nan, np.float32)
            return empty, empty.copy()
        if self.smoothing is None:
            return self._probabilities(batch)
        smoothing = self.smoothing
        generator = smoothing.generator(batch.tiles[0].index if batch.tiles else 0)
        votes = np.zeros(batch.valid.shape, np.int32)
        diff_sum = np.zeros(batch.valid.shape, np.float64)
        for _ in range(smoothing.samples):
            x1, x2 = (smoothing.noisy(x, batch.valid, generator) for x in (batch.x1, batch.x2))
            prob, diff = self._probabilities(TileBatch(batch.tiles, x1, x2, batch.valid, batch.label))
            votes += prob >= smoothing.threshold
            diff_sum += diff
        return (votes / smoothing.samples).astype(np.float32), (diff_sum / smoothing.samples).astype(np.float32)

    def _probabilities(self, batch: TileBatch) -> tuple[np.ndarray, np.ndarray]:
        return self.probabilities(*self.inputs(batch))

    def probabilities(self, z1: np.ndarray, z2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Change probability and difference ``(B, h, w)`` float32 of normalised inputs (:meth:`inputs`),
        by the model's calls alone (their seconds add to :attr:`model_seconds`)."""
        start = time.perf_counter()
        if isinstance(self.model, OnnxArrays):
            parts = [self.model.probabilities(z1[part], z2[part]) for part in self._calls(len(z1), z1.shape[2] * z1.shape[3])]
            prob, diff = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
        else:
            import torch

            outs = self.forward(*(torch.from_numpy(z).to(self.device) for z in (z1, z2)))
            prob = torch.cat([torch.sigmoid(o.logits.float())[:, 0] for o in outs]).cpu().numpy()
            diff = torch.cat([o.difference[:, 0].float() for o in outs]).cpu().numpy()
        self.model_seconds += time.perf_counter() - start
        return prob, diff

    def batches(self, read: PairRead, shape: tuple[int, int], label: LabelWindow | None = None) -> Iterator[TileBatch]:
        """Raw :class:`TileBatch` es of the scene's tiles, row-major, ``batch_size`` tiles each."""
        tiles = self.tiling.plan(*shape)
        for start in range(0, len(tiles), self.batch_size):
            yield read_batch(read, tiles[start : start + self.batch_size], label)

    def normalized_batches(
        self, read: PairRead, shape: tuple[int, int], label: LabelWindow | None = None
    ) -> Iterator[tuple[TileBatch, "torch.Tensor", "torch.Tensor"]]:
        """The tiles of each batch that hold a valid pixel, with their normalised model inputs (for
        model adaptation: tiles of nodata alone would bias the statistics towards zeros)."""
        for batch in self.batches(read, shape, label):
            live = batch.valid.any(axis=(1, 2))
            if live.any():
                if not live.all():
                    batch = TileBatch([t for t, keep in zip(batch.tiles, live) if keep], batch.x1[live], batch.x2[live],
                                      batch.valid[live], None if batch.label is None else batch.label[live])
                yield (batch, *self.tensors(batch))

    def mosaic(self, shape: tuple[int, int], tiles: list[Tile], sink: SceneSink) -> StreamingMosaic:
        """The blend of this runner's tiling for ``(probability, difference)`` tiles."""
        return StreamingMosaic.of(self.tiling, shape, tiles, 2, lambda row, values, valid: sink(row, values[0], values[1], valid))

    def run(self, read: PairRead, shape: tuple[int, int], sink: SceneSink, label: LabelWindow | None = None) -> None:
        """Predict every tile of a ``shape`` scene and blend them; ``sink`` gets every row once, in order."""
        mosaic = self.mosaic(shape, self.tiling.plan(*shape), sink)
        for batch in self.batches(read, shape, label):
            prob, diff = self.predict(batch)
            for i, tile in enumerate(batch.tiles):
                if batch.valid[i].any():
                    mosaic.add(tile, np.stack([prob[i], diff[i]]), batch.valid[i])
                else:
                    mosaic.skip(tile)
