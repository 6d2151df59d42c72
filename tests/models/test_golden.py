"""Golden outputs: a seeded model on a seeded input reproduces recorded logit statistics.

Recorded with torch 2.14.1 / timm 1.0.31 / segmentation-models-pytorch 0.6.0 (pinned): a change in
any model's initialisation or computation shows here. Re-record deliberately when a model changes:
``(logits mean, std, min, max, difference mean)`` of ``predict`` on two 1x4x64x64 tiles (1x3x64x64 for
models that take 1- or 3-band dates, :data:`BANDS`).
"""

from __future__ import annotations

import pytest
import torch

from changedet.models import create_model, list_models

GOLDEN: dict[str, list[float]] = {
    "cva": [-0.4509583, 4.0, -10.42331, 18.26881, 1.330648],
    "ensemble": [-0.1113659, 0.01192728, -0.1575915, -0.05745991, 0.4144565],
    "fc-ef": [-0.07217221, 0.0161989, -0.1267792, -0.01548762, 0.680972],
    "fc-siam-conc": [-0.02521955, 0.01736839, -0.08318403, 0.04218786, 0.4881865],
    "fc-siam-diff": [-0.04418676, 0.01872586, -0.1064667, 0.01793497, 0.4881865],
    "hetero-unsupervised": [-0.4923881, 1.337869, -3.895115, 5.552314, 2.874682],
    "pseudo-siamese-fc": [-0.02928381, 0.0123214, -0.07430816, 0.01202472, 0.7939308],
    "pseudo-siamese-pixel": [-0.07751497, 0.06959558, -0.3708624, 0.2128596, 0.7297344],
    "pseudo-siamese-unet": [-0.05123385, 0.001081915, -0.05555867, -0.04692625, 0.702835],
    "siam-bit-resnet18": [0.04760458, 0.01231149, 0.00944272, 0.08047736, 0.04700118],
    "siam-fpn-resnet18": [-0.4264538, 0.3813997, -1.437241, 0.7196854, 0.5790929],
    "siam-unet-efficientnet-b0": [-0.04699804, 0.001433219, -0.05183023, -0.04095376, 0.6419128],
    "siam-unet-mit-b0": [0.06074199, 0.0008730473, 0.05828967, 0.06441016, 0.7046272],
    "siam-unet-mobilenetv3": [0.0702438, 0.004174127, 0.05541904, 0.08696438, 0.6336592],
    "siam-unet-resnet18": [-0.01886091, 0.002512724, -0.0284804, -0.008353687, 0.5790929],
    "siam-unet-resnet34": [-0.06021778, 0.001275682, -0.06598928, -0.05577483, 0.5826645],
    "structure-refined": [-0.6452338, 1.290646, -3.869771, 4.970349, 4.110966],
}
BANDS = {"structure-refined": 3}


def test_every_model_has_golden_values() -> None:
    assert sorted(GOLDEN) == list_models()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_output(name: str) -> None:
    bands = BANDS.get(name, 4)
    torch.manual_seed(0)
    model = create_model(name, in_channels=bands)
    torch.manual_seed(1)
    t1, t2 = torch.randn(1, bands, 64, 64), torch.randn(1, bands, 64, 64)
    out = model.predict(t1, t2)
    logits = out.logits
    stats = torch.stack([logits.mean(), logits.std(), logits.min(), logits.max(), out.difference.mean()])
    torch.testing.assert_close(stats, torch.tensor(GOLDEN[name]), rtol=1e-4, atol=1e-6)
