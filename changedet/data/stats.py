"""Per-band normalisation statistics of training scenes, in the checkpoint metadata format.

:func:`compute_normalization` streams every scene block by block (never a whole scene in memory
unless it is cached), accumulating per-band sums of valid pixels in float64, and returns::

    {"t1": {"mean": [...], "std": [...]}, "t2": {"mean": [...], "std": [...]}}

(plus the pixel counts and scene names), which :meth:`changedet.normalization.Normalization.of`
turns into the value every path applies. Compute it on the *training* scenes only:
validation/test statistics must not leak into training.

:func:`per_scene_normalization` instead standardises every scene (and date) with its own statistics
(:func:`changedet.normalization.date_statistics`), for models trained across sensors whose
radiometry differs (8-bit RGB next to Sentinel-2 reflectance). Such checkpoints store
``"normalization": "per-scene"`` and inference computes the same exact statistics on the scene it is given.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from changedet.data.scenes import ChangeScene
from changedet.errors import InputError
from changedet.normalization import (
    PER_SCENE,
    Moments,
    Normalization,
    blocks,
    date_statistics,
)


def per_scene_normalization(scenes: Sequence[ChangeScene]) -> dict[str, Any]:
    """Every scene's own :func:`date_statistics`, keyed by scene name (names must be unique)."""
    names = [s.name for s in scenes]
    if len(set(names)) != len(names):
        raise InputError(f"per-scene statistics need unique scene names: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    channels = {s.channels for s in scenes}
    if len(channels) > 1:
        raise InputError(f"scenes have different band counts {sorted(channels)}: select the same number of bands in every source")
    return {"mode": PER_SCENE, "scenes": {s.name: date_statistics(s.read, *s.shape) for s in scenes}}


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
    m1, m2 = Moments(len(bands[0])), Moments(len(bands[1]))
    for scene in scenes:
        s1, s2 = Moments(len(bands[0])), Moments(len(bands[1]))
        h, w = scene.shape
        keep = None if max_pixels_per_scene is None else min(1.0, max_pixels_per_scene / float(h * w))
        for window in blocks(h, w, block):
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
        pooled = Moments(len(bands[0]))
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


def checkpoint_normalization(normalization: dict[str, Any]) -> dict[str, Any] | str:
    """Only the ``t1``/``t2`` mean/std part (what checkpoint metadata stores); ``"per-scene"`` in that mode."""
    return Normalization.of(normalization).to_metadata()
