"""YAML model configurations (``configs/models/*.yaml``), validated with pydantic.

A config names a registered model and the keyword arguments of its builder, e.g.::

    name: siam-unet-resnet18
    in_channels: 13
    fusion: absdiff

Unset fields keep the builder's defaults; a field the named model does not take is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from changedet.errors import ModelError
from changedet.models.base import ChangeModel
from changedet.models.fusion import FusionMode
from changedet.models.registry import check_builder_kwargs, create_model, list_models


class ModelConfig(BaseModel):
    """A registered model name and its builder arguments (``None``: the builder's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    in_channels: PositiveInt | tuple[PositiveInt, PositiveInt] = 3
    fusion: FusionMode | None = None
    decoder_channels: list[PositiveInt] | None = None
    encoder_t1: str | None = None
    encoder_t2: str | None = None
    feature_channels: list[PositiveInt] | None = None
    base_channels: PositiveInt | None = None
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    token_channels: PositiveInt | None = None
    tokens: PositiveInt | None = None
    encoder_layers: PositiveInt | None = None
    decoder_layers: PositiveInt | None = None
    heads: PositiveInt | None = None
    anchors: PositiveInt | None = None
    neighbours: PositiveInt | None = None
    smoothing: PositiveInt | None = None
    score_smoothing: PositiveInt | None = None
    iterations: PositiveInt | None = None
    stride: PositiveInt | None = None
    use_images: bool | None = Field(default=None, description="structure-refined: stack each date's image with the structure logit")
    members: list[dict[str, Any]] | None = Field(default=None, description="ensemble: [{model, config}, ...]")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
        return name

    @model_validator(mode="after")
    def _accepted_by_builder(self) -> ModelConfig:
        try:
            check_builder_kwargs(self.name, self.builder_kwargs())
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        return self

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model builder (the fields that are set, without ``name``)."""
        return self.model_dump(exclude={"name"}, exclude_none=True)


def load_model_config(path: str | Path) -> ModelConfig:
    """Read and validate a YAML model config; :class:`ModelError` with the reasons otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read model config {path}: {exc}") from exc
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ModelError(f"invalid model config {path}: {reasons}") from exc


def build_from_config(cfg: ModelConfig) -> ChangeModel:
    """Build the model a validated config describes."""
    return create_model(cfg.name, **cfg.builder_kwargs())
