"""Base class of every registered change model (neural or classical)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from changedet.models.output import ChangeOutput


class ChangeModel(nn.Module):
    """A bi-temporal change model: ``forward(t1, t2) -> ChangeOutput``.

    Subclasses set:
        in_channels: bands of date 1 and date 2 (equal for weight-shared Siamese models).
        weights_shared: True when both dates pass through one encoder (one parameter set).
        needs_scene_fit: True for scene-adaptive classical methods (e.g. CVA) that must see
            samples of the scene (:meth:`fit_scene`) before predicting.
    """

    in_channels: tuple[int, int] = (3, 3)
    weights_shared: bool = True
    needs_scene_fit: bool = False

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:  # pragma: no cover
        raise NotImplementedError

    @property
    def min_input_size(self) -> int:
        """Smallest tile side (px) on which the model sees the scene rather than padding: the
        encoder's output stride (``pad_multiple``), 1 for per-pixel models."""
        encoder = getattr(self, "encoder", None)
        return int(getattr(self, "pad_multiple", 0) or getattr(encoder, "output_stride", 1))

    def fit_view(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw tile values ``(C, h, w)`` of each date whose pixels the scene fit samples: the
        tile itself, unless the model filters its inputs spatially (then filtered the same way)."""
        return x1, x2

    def fit_scene(self, t1: torch.Tensor, t2: torch.Tensor, valid: torch.Tensor) -> None:
        """Adapt scene statistics from pixel samples ``(N, C)``; a no-op for trained models."""

    @torch.inference_mode()
    def predict(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        """Forward pass in eval mode without autograd."""
        was_training = self.training
        self.eval()
        try:
            return self(t1, t2)
        finally:
            self.train(was_training)
