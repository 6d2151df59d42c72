"""configs/models/*.yaml: validated by ModelConfig and buildable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from changedet.errors import ModelError
from changedet.models import ChangeModel, ModelConfig, build_from_config, list_models, load_model_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "models").glob("*.yaml"))


def test_one_config_per_registered_model() -> None:
    assert sorted(load_model_config(p).name for p in CONFIGS) == list_models()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates_and_builds(path: Path) -> None:
    cfg = load_model_config(path)
    assert cfg.name == path.stem
    model = build_from_config(cfg)
    assert isinstance(model, ChangeModel)
    bands = (cfg.in_channels, cfg.in_channels) if isinstance(cfg.in_channels, int) else cfg.in_channels
    assert tuple(model.in_channels) == tuple(bands)
    out = model.predict(torch.randn(1, bands[0], 32, 32), torch.randn(1, bands[1], 32, 32))
    assert out.logits.shape == (1, 1, 32, 32)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"name": "siam-unet-resnet18", "fusoin": "absdiff"}, "fusoin"),
        ({"name": "no-such-model"}, "unknown model"),
        ({"name": "siam-unet-resnet18", "fusion": "max"}, "fusion"),
        ({"name": "siam-unet-resnet18", "in_channels": 0}, "in_channels"),
        ({"name": "fc-ef", "tokens": 4}, "does not take tokens"),
    ],
)
def test_invalid_configs(data: dict, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        ModelConfig.model_validate(data)


def test_load_reports_model_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: siam-unet-resnet18\nin_channels: 13\ndecoder: fpn\n")
    with pytest.raises(ModelError, match="invalid model config .*decoder: Extra inputs are not permitted"):
        load_model_config(path)
