"""Multi-scale feature encoders for any band count, built through segmentation-models-pytorch.

Every encoder is randomly initialised (no weights are ever downloaded) and its first convolution
is created for ``in_channels`` bands (smp/timm ``in_channels``/``in_chans``).
Names are the short aliases of :data:`ENCODER_ALIASES`, any smp encoder name (``"resnet50"``)
or any timm model with ``features_only`` support as ``"tu-<timm name>"``.
"""

from __future__ import annotations

import torch
from torch import nn

from changedet.errors import ModelError

#: Short encoder names and the smp encoder each resolves to.
ENCODER_ALIASES: dict[str, str] = {
    "resnet18": "tu-resnet18",
    "resnet34": "tu-resnet34",
    "efficientnet-b0": "tu-efficientnet_b0",
    "mobilenetv3": "tu-mobilenetv3_large_100",
    "mobilenetv3-small": "tu-mobilenetv3_small_100",
    "mit-b0": "mit_b0",  # SegFormer's hierarchical Mix Transformer (smp)
    "pvt-v2-b0": "tu-pvt_v2_b0",
}


class FeatureEncoder(nn.Module):
    """A feature pyramid ``forward(x) -> [f_2, f_4, ..., f_(2**depth)]`` (level ``i`` at stride ``2**(i+1)``).

    Transformer encoders have no stride-2 stage: their level 0 is an empty ``(B, 0, H/2, W/2)``
    tensor, so levels of every encoder line up by index.

    Attributes:
        name: the encoder name as given.
        in_channels: input bands.
        out_channels: channels per level (0 for a missing level).
        reductions: stride of each level.
        output_stride: the input height/width must be a multiple of this.
    """

    def __init__(self, name: str, in_channels: int, depth: int = 5) -> None:
        super().__init__()
        from segmentation_models_pytorch.encoders import get_encoder  # lazy: smp + timm cost ~300 MB and 4 s to import

        try:
            self.backbone = get_encoder(
                ENCODER_ALIASES.get(name, name), in_channels=in_channels, depth=depth, weights=None
            )
        except (KeyError, RuntimeError, ValueError) as exc:  # smp: KeyError; timm: RuntimeError/ValueError
            raise ModelError(
                f"cannot build encoder {name!r}; use one of {', '.join(ENCODER_ALIASES)}, "
                "an smp encoder name, or 'tu-<timm model>' with features_only support"
            ) from exc
        self.name = name
        self.in_channels = in_channels
        self.out_channels: tuple[int, ...] = tuple(self.backbone.out_channels[1:])
        self.reductions: tuple[int, ...] = tuple(2 ** (i + 1) for i in range(depth))
        self.output_stride = 2**depth

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)[1:]  # smp puts the input itself first
