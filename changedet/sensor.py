"""The physical value range of a sensor: raw units per unit reflectance and the valid range.

Scenes are read as raw values (Sentinel-2 L1C: top-of-atmosphere reflectance × 10000; 8-bit
imagery: 0–255). :class:`Sensor` says how many raw units make one unit of *reflectance* (``scale``),
so that attack budgets ε, shift amplitudes and smoothing noise are expressed in reflectance in
[0, 1]: ε = 1/255 means 10000/255 ≈ 39 DN on Sentinel-2 and 1 DN on 8-bit images.

Perturbed values are clipped to ``[0, max_reflectance]`` reflectance. Pixels that are already
outside that range in the data (bright TOA reflectance above 1) may not move further out but keep
their value otherwise, so a zero perturbation is always the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from changedet.io.scene import SENTINEL2_ORDER

if TYPE_CHECKING:  # the tensor methods serve attacks, which have torch loaded
    import torch


@dataclass(frozen=True)
class Sensor:
    """Raw units per unit reflectance (``scale``) and the upper end of the valid range in reflectance."""

    scale: float = 10000.0
    max_reflectance: float = 1.0

    @property
    def high(self) -> float:
        """Upper end of the range in raw units."""
        return self.scale * self.max_reflectance

    def clip(self, new: np.ndarray, orig: np.ndarray) -> np.ndarray:
        """``new`` clipped to ``[min(orig, 0), max(orig, high)]`` (raw units, numpy)."""
        return np.clip(new, np.minimum(orig, 0.0), np.maximum(orig, self.high)).astype(np.float32)

    def clip_tensor(self, new: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        """:meth:`clip` for tensors (differentiable inside the range)."""
        import torch

        return torch.minimum(torch.maximum(new, orig.clamp(max=0.0)), orig.clamp(min=self.high))

    def delta_bounds(self, orig: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest perturbation of ``orig`` (raw tensor) in reflectance units: within
        ``±eps`` and keeping ``orig + scale * delta`` in the range of :meth:`clip`."""
        import torch

        low = torch.clamp((orig.clamp(max=0.0) - orig) / self.scale, min=-eps)
        high = torch.clamp((orig.clamp(min=self.high) - orig) / self.scale, max=eps)
        return low, high


SENTINEL2_L1C = Sensor(10000.0)


def sensor_for(band_names: Sequence[str], dtypes: Sequence[str]) -> Sensor:
    """Sentinel-2 band names or 16-bit integers: reflectance × 10000; 8-bit data: 255; floats: 1."""
    if {b.upper() for b in band_names} <= set(SENTINEL2_ORDER):
        return SENTINEL2_L1C
    if set(dtypes) == {"uint8"}:
        return Sensor(255.0)
    return Sensor(10000.0) if all(d.startswith(("uint", "int")) for d in dtypes) else Sensor(1.0)
