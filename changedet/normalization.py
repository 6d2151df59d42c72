"""Per-band standardisation of both dates: the one value type every path applies.

A :class:`Normalization` is ``(x - mean) / std`` per band and date, with invalid pixels set to 0. It
holds either fixed statistics (a checkpoint's training statistics, or samples of the scene for a
model stored without any) or the *per-scene* rule: every scene (and date) is standardised with its
own exact statistics (:meth:`Normalization.for_scene`), for models trained across sensors whose
radiometry differs. Checkpoint metadata stores it as ``{"t1": {"mean", "std"}, "t2": {...}}`` or the
string ``"per-scene"`` (:meth:`Normalization.to_metadata`, :meth:`Normalization.of`).

Placed below ``data/``, ``models/`` and ``pipeline/``: detect, training, validation and every evaluation
stage normalise through :meth:`Normalization.apply` (NumPy) or :meth:`Normalization.apply_tensor`
(differentiable, for attacks), so what validation scores is what ``changedet detect`` computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from changedet.errors import InputError

if TYPE_CHECKING:  # only the tensor form needs torch; detect through ONNX Runtime never imports it
    import torch

MIN_STD = 1e-6
PER_SCENE = "per-scene"

#: ``read(window) -> (x1 (C, h, w), x2 (C, h, w), valid (h, w))`` of an aligned pair
PairRead = Callable[[Window], tuple[np.ndarray, np.ndarray, np.ndarray]]
DateStats = tuple[np.ndarray, np.ndarray]  # mean, std (C,): float64 as stored, applied as float32


class Moments:
    """Streaming per-band count, sum and sum of squares (float64, shifted for numerical stability)."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self.ref: np.ndarray | None = None

    def update(self, pixels: np.ndarray) -> None:
        """Add ``pixels (C, N)`` valid samples."""
        if pixels.shape[1] == 0:
            return
        pixels = pixels.astype(np.float64)
        if self.ref is None:
            self.ref = pixels.mean(axis=1)
        centred = pixels - self.ref[:, None]
        self.n += pixels.shape[1]
        self.sum += centred.sum(axis=1)
        self.sumsq += np.square(centred).sum(axis=1)

    def __iadd__(self, other: "Moments") -> "Moments":
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
        """``{"mean": [...], "std": [...]}`` (std at least :data:`MIN_STD`)."""
        mean_c = self.sum / self.n
        var = np.maximum(self.sumsq / self.n - mean_c**2, 0.0)
        std = np.maximum(np.sqrt(var), MIN_STD)
        return {"mean": [float(v) for v in mean_c + self.ref], "std": [float(v) for v in std]}


def blocks(height: int, width: int, block: int) -> Iterator[Window]:
    """Row-major windows of at most ``block`` × ``block`` px covering the grid."""
    for r in range(0, height, block):
        for c in range(0, width, block):
            yield Window(c, r, min(block, width - c), min(block, height - r))


def date_statistics(read: PairRead, height: int, width: int, block: int = 512) -> dict[str, Any]:
    """Exact per-date mean/std of the valid pixels of a whole pair, streamed block by block.

    ``read`` is :meth:`changedet.data.scenes.ChangeScene.read` in training and
    :meth:`changedet.pipeline.align.PairReader.read` in inference, so both see identical statistics.
    """
    m1 = m2 = None
    for window in blocks(height, width, block):
        x1, x2, valid = read(window)
        if m1 is None:
            m1, m2 = Moments(x1.shape[0]), Moments(x2.shape[0])
        m1.update(x1[:, valid])
        m2.update(x2[:, valid])
    if m1 is None or m1.n == 0:
        raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    return {"t1": m1.result(), "t2": m2.result()}


def _date_stats(stats: dict[str, Any]) -> DateStats:
    return np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)


@dataclass(frozen=True, eq=False)
class Normalization:
    """Standardisation of both dates: fixed per-date statistics, or the per-scene rule.

    Attributes:
        dates: ``((mean1, std1), (mean2, std2))`` arrays ``(C,)`` as stored (float64; every path
            applies them as float32); None in per-scene mode.
        per_scene: statistics come from each scene itself (:meth:`for_scene`).
        scenes: per-scene mode: the statistics already computed for scenes, by scene name
            (:func:`changedet.data.stats.per_scene_normalization` of the training scenes), so a
            training run reads each scene's statistics once, not once per epoch.
    """

    dates: tuple[DateStats, DateStats] | None = None
    per_scene: bool = False
    scenes: dict[str, "Normalization"] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.dates is None) != self.per_scene or (self.scenes and not self.per_scene):
            raise ValueError("a Normalization has either fixed statistics or the per-scene rule")

    @classmethod
    def of(cls, value: "Normalization | dict[str, Any] | str") -> "Normalization":
        """Parse any stored form: a :class:`Normalization`, ``"per-scene"``, ``{"t1": {"mean", "std"},
        "t2": …}`` (checkpoint metadata, :func:`changedet.data.stats.compute_normalization`) or
        ``{"mode": "per-scene", …}`` (:func:`changedet.data.stats.per_scene_normalization`)."""
        if isinstance(value, Normalization):
            return value
        if value == PER_SCENE:
            return cls(per_scene=True)
        if isinstance(value, dict) and value.get("mode") == PER_SCENE:
            return cls(per_scene=True, scenes={name: cls.of(stats) for name, stats in value.get("scenes", {}).items()})
        if isinstance(value, dict) and "t1" in value and "t2" in value:
            return cls((_date_stats(value["t1"]), _date_stats(value["t2"])))
        raise InputError(f"normalisation must be {PER_SCENE!r} or {{t1: {{mean, std}}, t2: {{mean, std}}}}, got {value!r:.80}")

    @classmethod
    def from_samples(cls, x1: np.ndarray, x2: np.ndarray) -> "Normalization":
        """Statistics of valid pixel samples ``(N, C)`` of each date (std at least :data:`MIN_STD`)."""
        stats = ((x.mean(0).astype(np.float32), np.maximum(x.std(0), MIN_STD).astype(np.float32)) for x in (x1, x2))
        return cls(tuple((m.astype(np.float64), s.astype(np.float64)) for m, s in stats))

    @classmethod
    def of_pair(cls, read: PairRead, height: int, width: int) -> "Normalization":
        """Exact statistics of a whole pair (:func:`date_statistics`)."""
        return cls.of(date_statistics(read, height, width))

    def for_scene(self, read: PairRead, height: int, width: int, name: str | None = None) -> "Normalization":
        """The fixed statistics to apply to one scene: its own (per-scene rule: those already computed
        for scene ``name``, else computed now) or these."""
        if not self.per_scene:
            return self
        known = self.scenes.get(name) if name is not None else None
        return known if known is not None else Normalization.of_pair(read, height, width)

    def to_metadata(self) -> dict[str, Any] | str:
        """Checkpoint metadata form: ``"per-scene"`` or ``{"t1": {"mean", "std"}, "t2": …}``."""
        if self.per_scene:
            return PER_SCENE
        return {d: {"mean": [float(v) for v in m], "std": [float(v) for v in s]} for d, (m, s) in zip(("t1", "t2"), self.dates)}

    def _fixed(self) -> tuple[DateStats, DateStats]:
        if self.dates is None:
            raise InputError("per-scene normalisation has no statistics of its own: resolve it with for_scene")
        return self.dates

    @property
    def channels(self) -> tuple[int, int] | None:
        """Bands per date of fixed statistics (None in per-scene mode)."""
        return None if self.dates is None else (len(self.dates[0][0]), len(self.dates[1][0]))

    def __getitem__(self, date: int) -> DateStats:
        """``(mean, std)`` float32 ``(C,)`` of date 0 (t1) or 1 (t2)."""
        mean, std = self._fixed()[date]
        return mean.astype(np.float32), std.astype(np.float32)

    def arrays(self, date: int) -> DateStats:
        """``(mean, std)`` of date 0 or 1, shaped ``(C, 1, 1)`` for ``(C, h, w)`` or ``(B, C, h, w)`` data."""
        mean, std = self[date]
        return mean[:, None, None], std[:, None, None]

    def apply(self, x: np.ndarray, valid: np.ndarray, date: int) -> np.ndarray:
        """``(x - mean) / std`` of raw ``x (…, C, h, w)`` as float32, 0 where ``valid (…, h, w)`` is False."""
        mean, std = self.arrays(date)
        return np.where(valid[..., None, :, :], (x - mean) / std, 0).astype(np.float32)

    def apply_tensor(self, x: torch.Tensor, valid: torch.Tensor, date: int) -> torch.Tensor:
        """:meth:`apply` on tensors ``x (B, C, h, w)``, ``valid (B, h, w)``; differentiable in ``x``."""
        import torch

        mean, std = (torch.from_numpy(a).to(x.device) for a in self.arrays(date))
        return torch.where(valid[:, None], (x - mean) / std, 0.0)
