"""Per-band normalisation statistics from training scenes, in the checkpoint metadata format.

:func:`compute_normalization` streams every scene block by block (never a whole scene in memory
unless it is cached), accumulating per-band sums of valid pixels in float64, and returns::

    {"t1": {"mean": [...], "std": [...]}, "t2": {"mean": [...], "std": [...]}}

which :class:`changedet.predictor.TilePredictor` applies as ``(x - mean) / std`` on raw values.
Compute it on the *training* scenes only: validation/test statistics must not leak into training.

:func:`per_scene_normalization` instead standardises every scene (and date) with its own statistics
(:func:`date_statistics`), for models trained across sensors whose radiometry differs (8-bit RGB
next to Sentinel-2 reflectance). Such checkpoints store ``"normalization": "per-scene"`` and
inference computes the same exact statistics on the scene it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from rasterio.windows import Window

from changedet.data.scenes import ChangeScene
from changedet.errors import InputError

MIN_STD = 1e-6
PER_SCENE = "per-scene"


class _Moments:
    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self.ref: np.ndarray | None = None  # shift for numerically stable variance

    def update(self, pixels: np.ndarray) -> None:
        """``pixels (C, N)`` valid samples."""
        if pixels.shape[1] == 0:
            return
        pixels = pixels.astype(np.float64)
        if self.ref is None:
            self.ref = pixels.mean(axis=1)
        centred = pixels - self.ref[:, None]
        self.n += pixels.shape[1]
        self.sum += centred.sum(axis=1)
        self.sumsq += np.square(centred).sum(axis=1)

    def __iadd__(self, other: "_Moments") -> "_Moments":
        if other.n == 0:
            return self
        if self.ref is None:
            self.n, self.sum, self.sumsq, self.ref = other.n, other.sum.copy(), other.sumsq.copy(), other.ref
            return self
        shift = other.ref - self.ref  # re-centre other's sums on self.ref
        self.sumsq += other.sumsq + 2 * shift * other.sum + other.n * shift**2
        self.sum += other.sum + other.n * shift
        self.n += other.n
        return self

    def result(self) -> dict[str, list[float]]:
        mean_c = self.sum / self.n
        var = np.maximum(self.sumsq / self.n - mean_c**2, 0.0)
        mean = mean_c + self.ref
        std = np.maximum(np.sqrt(var), MIN_STD)
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _blocks(height: int, width: int, block: int) -> list[Window]:
    return [
        Window(c, r, min(block, width - c), min(block, height - r))
        for r in range(0, height, block)
        for c in range(0, width, block)
    ]


def is_per_scene(normalization: dict[str, Any]) -> bool:
    """True for :func:`per_scene_normalization` output (each scene its own statistics)."""
    return normalization.get("mode") == PER_SCENE


def date_statistics(
    read: Callable[[Window], tuple[np.ndarray, np.ndarray, np.ndarray]], height: int, width: int, block: int = 512
) -> dict[str, Any]:
    """Exact per-date mean/std of the valid pixels of a whole pair, streamed block by block.

    ``read(window) -> (x1, x2, valid)`` is :meth:`ChangeScene.read` in training and
    :meth:`changedet.align.PairReader.read` in inference, so both see identical statistics.
    """
    m1 = m2 = None
    for window in _blocks(height, width, block):
        x1, x2, valid = read(window)
        if m1 is None:
            m1, m2 = _Moments(x1.shape[0]), _Moments(x2.shape[0])
        m1.update(x1[:, valid])
        m2.update(x2[:, valid])
    if m1 is None or m1.n == 0:
        raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    return {"t1": m1.result(), "t2": m2.result()}


def per_scene_normalization(scenes: Sequence[ChangeScene]) -> dict[str, Any]:
    """Every scene's own :func:`date_statistics`, keyed by scene name (names must be unique)."""
    names = [s.name for s in scenes]
    if len(set(names)) != len(names):
        raise InputError(f"per-scene statistics need unique scene names: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    channels = {s.channels for s in scenes}
    if len(channels) > 1:
        raise InputError(f"scenes have different band counts {sorted(channels)}: select the same number of bands in every source")
    return {"mode": PER_SCENE, "scenes": {s.name: date_statistics(s.read, *s.shape) for s in scenes}}


def scene_normalization_arrays(
    normalization: dict[str, Any], scene: ChangeScene
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:func:`normalization_arrays` of ``scene``: its own statistics in per-scene mode, else the shared ones."""
    if is_per_scene(normalization):
        stats = normalization["scenes"].get(scene.name)
        if stats is None:
            raise InputError(f"no per-scene statistics for scene {scene.name}")
        return normalization_arrays(stats)
    return normalization_arrays(normalization)


def compute_normalization(
    scenes: Sequence[ChangeScene],
    shared: bool | None = None,
    block: int = 512,
    max_pixels_per_scene: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean and standard deviation per band of valid pixels of ``scenes``.

    Args:
        scenes: the training scenes (all with the same bands).
        shared: pool both dates into one set of statistics (stored for ``t1`` and ``t2``). This
            keeps date swap and weight sharing consistent; ``None`` pools when both dates have
            the same band names, per-date statistics otherwise.
        block: streaming block size in pixels.
        max_pixels_per_scene: subsample each scene's valid pixels (None: every pixel).
        seed: subsampling seed.

    Returns:
        ``{"t1": {"mean", "std"}, "t2": {"mean", "std"}}``, plus ``"pixels"`` (count per date)
        and ``"scenes"`` (names).
    """
    if not scenes:
        raise InputError("normalisation statistics need at least one training scene")
    bands = scenes[0].bands
    for s in scenes[1:]:
        if s.bands != bands:
            raise InputError(f"scene {s.name} has bands {s.bands}, {scenes[0].name} has {bands}")
    if shared is None:
        shared = bands[0] == bands[1]
    if shared and len(bands[0]) != len(bands[1]):
        raise InputError("shared statistics need the same bands on both dates")
    rng = np.random.default_rng(seed)
    m1, m2 = _Moments(len(bands[0])), _Moments(len(bands[1]))
    for scene in scenes:
        s1, s2 = _Moments(len(bands[0])), _Moments(len(bands[1]))
        h, w = scene.shape
        keep = None if max_pixels_per_scene is None else min(1.0, max_pixels_per_scene / float(h * w))
        for window in _blocks(h, w, block):
            x1, x2, valid = scene.read(window)
            if keep is not None and keep < 1.0:
                valid = valid & (rng.random(valid.shape) < keep)
            s1.update(x1[:, valid])
            s2.update(x2[:, valid])
        if s1.n == 0:
            raise InputError(f"scene {scene.name} has no valid pixel")
        m1 += s1
        m2 += s2
    if shared:
        pooled = _Moments(len(bands[0]))
        pooled += m1
        pooled += m2
        stats = pooled.result()
        out = {"t1": stats, "t2": {k: list(v) for k, v in stats.items()}}
    else:
        out = {"t1": m1.result(), "t2": m2.result()}
    out["pixels"] = {"t1": m1.n, "t2": m2.n}
    out["scenes"] = [s.name for s in scenes]
    out["shared"] = bool(shared)
    return out


def normalization_arrays(normalization: dict[str, Any]) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((mean1, std1), (mean2, std2))`` float32 arrays shaped ``(C, 1, 1)``."""
    if is_per_scene(normalization):
        raise InputError("per-scene normalisation has no shared statistics: use scene_normalization_arrays")
    out = []
    for d in ("t1", "t2"):
        mean = np.asarray(normalization[d]["mean"], np.float32)[:, None, None]
        std = np.asarray(normalization[d]["std"], np.float32)[:, None, None]
        out.append((mean, std))
    return out[0], out[1]


def checkpoint_normalization(normalization: dict[str, Any]) -> dict[str, Any]:
    """Only the ``t1``/``t2`` mean/std part (what checkpoint metadata stores); ``"per-scene"`` in that mode."""
    if is_per_scene(normalization):
        return PER_SCENE
    return {d: {"mean": list(normalization[d]["mean"]), "std": list(normalization[d]["std"])} for d in ("t1", "t2")}
