"""Change vector analysis (CVA): the no-training classical baseline, registered as ``cva``.

Method (Malila 1980; Bovolo & Bruzzone 2007):
1. each date is standardised per band with its own scene statistics (mean/std of valid pixels),
   which doubles as a relative radiometric normalisation between the two acquisitions;
2. the change magnitude is the Euclidean norm of the difference vector divided by sqrt(C);
3. the change/no-change threshold is Otsu's on the magnitude histogram of the scene.

The magnitude is the ``difference`` output. ``logits = (magnitude - otsu) / scale`` with
``scale = std(magnitude) / 4``: a monotone score with probability 0.5 exactly at Otsu's threshold
(so the default ``--threshold 0.5`` reproduces CVA+Otsu), not a calibrated probability.
"""

from __future__ import annotations

import numpy as np
import torch

from changedet.errors import InputError, ModelError
from changedet.metrics import otsu_from_histogram
from changedet.models.base import ChangeModel
from changedet.models.output import ChangeOutput
from changedet.models.registry import register_model


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("otsu_threshold needs at least one finite value")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return otsu_from_histogram(hist, edges)


NO_CHANGE_MAGNITUDE = 1e-3  # standardised units: below this every pixel is the same after normalisation (float rounding)


class ChangeVectorAnalysis(ChangeModel):
    """CVA magnitude with an Otsu threshold; parameter-free, fitted per scene."""

    needs_scene_fit = True

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = (in_channels, in_channels)
        for name in ("mean_t1", "std_t1", "mean_t2", "std_t2"):
            self.register_buffer(name, torch.zeros(in_channels))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _magnitude(self, t1: torch.Tensor, t2: torch.Tensor, stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        m1, s1, m2, s2 = (s.view(1, -1, 1, 1) for s in stats)
        z1 = (t1 - m1) / s1
        z2 = (t2 - m2) / s2
        return torch.linalg.vector_norm(z2 - z1, dim=1, keepdim=True) / t1.shape[1] ** 0.5

    @staticmethod
    def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(0), x.std(0).clamp_min(1e-6)

    def fit_scene(self, t1: torch.Tensor, t2: torch.Tensor, valid: torch.Tensor) -> None:
        """Fit per-date band statistics and Otsu's threshold on pixel samples ``(N, C)``.

        Degenerate scenes: identical dates, dates that differ only by a gain/offset that the per-date
        standardisation removes (magnitudes below :data:`NO_CHANGE_MAGNITUDE`, float rounding), or a
        magnitude without spread give no change at all (the threshold is put above every magnitude),
        never "all changed"; a date that is constant in every band while the other is not is refused,
        because standardising it by its own statistics erases whatever differs.
        """
        t1, t2 = t1[valid].double(), t2[valid].double()
        if t1.shape[0] < 2:
            raise InputError(f"cva needs at least two valid pixels to fit the scene, got {t1.shape[0]}")
        stats = (*self._stats(t1), *self._stats(t2))
        flat = [bool((x.std(0) <= 1e-12).all()) for x in (t1, t2)]
        if any(flat) and not torch.equal(t1, t2):
            date = "t1" if flat[0] else "t2"
            raise InputError(
                f"{date} is constant over the valid area (every band has one value): cva standardises each date by "
                "its own statistics and cannot compare it; use a model with stored statistics (--model CHECKPOINT)"
            )
        magnitude = self._magnitude(t1[..., None, None], t2[..., None, None], stats).ravel()
        spread = float(magnitude.max() - magnitude.min())
        if float(magnitude.max()) < NO_CHANGE_MAGNITUDE or spread <= 1e-9 * float(magnitude.max()):  # nothing to split
            threshold, scale = float(magnitude.max()) + 1.0, 1.0 / 16
        else:
            threshold, scale = otsu_threshold(magnitude.numpy()), max(float(magnitude.std()) / 4, 1e-6)
        for buf, value in zip(("mean_t1", "std_t1", "mean_t2", "std_t2"), stats):
            getattr(self, buf).copy_(value)
        self.threshold.fill_(threshold)
        self.scale.fill_(scale)
        self.fitted.fill_(True)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        if bool(self.fitted):
            stats = (self.mean_t1, self.std_t1, self.mean_t2, self.std_t2)
            threshold, scale = self.threshold, self.scale
        else:  # stateless fallback: statistics of this batch only
            flat1 = t1.detach().movedim(1, -1).reshape(-1, t1.shape[1]).double()
            flat2 = t2.detach().movedim(1, -1).reshape(-1, t2.shape[1]).double()
            stats = tuple(s.to(t1.dtype) for s in (*self._stats(flat1), *self._stats(flat2)))
            magnitude = self._magnitude(t1.detach(), t2.detach(), stats)
            threshold = torch.tensor(otsu_threshold(magnitude.cpu().numpy()), dtype=t1.dtype)
            scale = (magnitude.std() / 4).clamp_min(1e-6)
        magnitude = self._magnitude(t1, t2, tuple(s.to(t1) for s in stats))
        logits = (magnitude - threshold.to(t1)) / scale.to(t1)
        return ChangeOutput(logits=logits, difference=magnitude)


@register_model("cva", family="classical")
def cva(in_channels: int | tuple[int, int] = 3, **_: object) -> ChangeVectorAnalysis:
    """Change vector analysis magnitude + Otsu threshold (no training; the baseline)."""
    if not isinstance(in_channels, int):
        if len(set(in_channels)) != 1:
            raise ModelError(f"cva compares band vectors: both dates need the same bands, got {tuple(in_channels)}")
        in_channels = in_channels[0]
    return ChangeVectorAnalysis(in_channels=in_channels)
