"""Training configuration (``configs/train/*.yaml``), validated with pydantic.

Example (``configs/train/oscd.yaml``)::

    data:
      layout: oscd
      root: ../shared/data/oscd
      val: [bordeaux, hongkong]
      patch_size: 64
    model:
      name: fc-siam-diff
      config: {base_channels: 16}
    loss:
      name: bce+dice
      pos_weight: 5
    epochs: 50
    batch_size: 16
    output_dir: outputs/train/oscd

Relative paths are resolved against the working directory first, then against the config
file's folder and its parents (so a config under ``configs/train/`` finds ``../shared/data``
from the repository root either way).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from changedet.errors import ChangeDetError, ModelError
from changedet.losses import build_loss
from changedet.models.config import ModelConfig
from changedet.models.registry import check_builder_kwargs, model_entry


class ConfigError(ChangeDetError):
    """A training configuration is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Layout = Literal["auto", "oscd", "levir", "pairs"]
NumWorkers = Annotated[int, Field(ge=0, description="DataLoader worker processes")]


class SourceSection(_Strict):
    """One dataset of a multi-source training (``data.sources``), split by its own groups."""

    layout: Layout = "auto"
    root: Path
    bands: list[str] | None = Field(default=None, description="this source's bands, in the model's channel order")
    val: list[str] = Field(default_factory=list)
    train: list[str] | None = None


class DataSection(_Strict):
    """Where the scenes are and how patches are drawn.

    One dataset (``layout``, ``root``, ``bands``, ``val``, ``train``) or several (``sources``, each
    with those keys). ``normalization: per-scene`` standardises every scene with its own statistics
    (needed when sources differ in radiometry, e.g. 8-bit RGB and Sentinel-2 reflectance).
    """

    layout: Layout = "auto"
    root: Path | None = None
    sources: list[SourceSection] = Field(default_factory=list)
    normalization: Literal["training", "per-scene"] = "training"
    channel_names: list[str] | None = Field(default=None, description="what the model's input channels are (documentation)")
    bands: list[str] | None = None
    bands_t2: list[str] | None = None
    val: list[str] = Field(default_factory=list, description="validation groups (cities) or scene names")
    train: list[str] | None = Field(default=None, description="training groups (default: every other labelled group)")
    patch_size: int = Field(default=64, ge=16)
    samples_per_epoch: PositiveInt = 1024
    change_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    cache_mb: int = Field(default=512, ge=0, description="in-memory cache budget for small scenes")
    num_workers: NumWorkers = 0
    nodata: float | None = None
    resampling: Literal["nearest", "bilinear", "cubic", "average", "lanczos"] = "bilinear"
    shared_stats: bool | None = Field(default=None, description="pool both dates' statistics (None: when bands match)")
    stats_max_pixels: PositiveInt | None = Field(default=None, description="subsample per scene for statistics")

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> "DataSection":
        if self.sources and (self.root is not None or self.bands is not None or self.val or self.train is not None):
            raise ValueError("give either root/bands/val/train or sources (each with its own root, bands, val, train)")
        if not self.sources and self.root is None:
            raise ValueError("data.root (or data.sources) is required")
        if self.sources and self.bands_t2 is not None:
            raise ValueError("bands_t2 is not supported with sources")
        return self

    def source_list(self) -> list[SourceSection]:
        """The datasets to train on (a single-dataset config as one source)."""
        if self.sources:
            return list(self.sources)
        return [SourceSection(layout=self.layout, root=self.root, bands=self.bands, val=self.val, train=self.train)]


class AugmentSection(_Strict):
    """Paired augmentation (see :class:`changedet.data.PairedAugment`)."""

    enabled: bool = True
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    crop: int | None = Field(default=None, ge=16)
    gain: float = Field(default=0.1, ge=0.0, lt=1.0)
    offset: float = Field(default=0.1, ge=0.0)
    noise: float = Field(default=0.02, ge=0.0)
    swap: float = Field(default=0.0, ge=0.0, le=1.0)


class ModelSection(_Strict):
    """A registered model and its builder arguments (``in_channels`` comes from the bands)."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_model(self) -> "ModelSection":
        if "in_channels" in self.config:
            raise ValueError("model.config must not set in_channels: it follows from the selected bands")
        try:
            model_entry(self.name)  # unknown model: the reason names the registered ones
            check_builder_kwargs(self.name, self.config)  # the reason names what the builder takes
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        ModelConfig(name=self.name, **self.config)  # value types: the same checks as configs/models/*.yaml
        return self


class LossSection(BaseModel):
    """``name`` (e.g. ``bce+dice``) and any :func:`changedet.losses.build_loss` keyword arguments."""

    model_config = ConfigDict(extra="allow")

    name: str = "bce+dice"

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for :func:`~changedet.losses.build_loss`."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _buildable(self) -> "LossSection":
        build_loss(self.name, **self.kwargs())
        return self


class OptimSection(_Strict):
    """AdamW (or SGD) with an optional warm-up and cosine decay, and an optional EMA of the weights."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)
    ema_decay: float | None = Field(
        default=None, gt=0, lt=1, description="validate and ship an exponential moving average of the weights (per step)"
    )


class ValidationSection(_Strict):
    """Full-scene validation and early stopping."""

    tile: int = Field(default=256, ge=16)
    overlap: int = Field(default=32, ge=0)
    batch_size: PositiveInt = 8
    every: PositiveInt = 1
    patience: int | None = Field(default=10, ge=1, description="validations without F1 improvement before stopping")
    tune_threshold: bool = True

    @model_validator(mode="after")
    def _overlap(self) -> "ValidationSection":
        if self.overlap >= self.tile:
            raise ValueError(f"validation.overlap must be < tile ({self.tile})")
        return self


class SimSiamSection(_Strict):
    """Self-supervised pretraining of the model's encoder before fine-tuning: SimSiam or BYOL."""

    enabled: bool = False
    method: Literal["simsiam", "byol"] = "simsiam"
    target_decay: float = Field(default=0.99, gt=0, lt=1, description="BYOL: EMA decay of the target branch")
    epochs: PositiveInt = 20
    samples_per_epoch: PositiveInt = 1024
    batch_size: int = Field(default=32, ge=2)
    patch_size: int = Field(default=64, ge=16)
    lr: float = Field(default=0.05, gt=0, description="SGD base lr (scaled by batch_size / 256)")
    weight_decay: float = Field(default=1e-4, ge=0)
    proj_dim: PositiveInt = 512
    pred_hidden: PositiveInt = 128
    include_unlabelled: bool = Field(default=True, description="also use unlabelled scenes (never validation groups)")
    min_scale: float = Field(default=0.4, gt=0, le=1)


class RunOptions(_Strict):
    """How a training loop runs: the top-level keys of a training config, also part of :class:`TrainSettings`."""

    epochs: PositiveInt = 50
    batch_size: PositiveInt = 16
    seed: int = 0
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    amp: bool = Field(default=True, description="mixed precision on CUDA (ignored on CPU)")
    resume: bool = Field(default=True, description="continue from output_dir's last checkpoint if present")
    progress: bool = True


class TrainConfig(RunOptions):
    """A whole training run."""

    data: DataSection
    model: ModelSection
    loss: LossSection = Field(default_factory=LossSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    simsiam: SimSiamSection = Field(default_factory=SimSiamSection)
    output_dir: Path = Path("outputs/train")
    init_encoder: Path | None = Field(default=None, description="checkpoint whose encoder weights initialise the model")
    init_weights: Path | None = Field(
        default=None, description="checkpoint to fine-tune (e.g. a pruned one): its architecture replaces `model`, its weights initialise it"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.augment.swap and self.data.bands_t2 is not None and self.data.bands_t2 != self.data.bands:
            raise ValueError("augment.swap needs the same bands on both dates")
        if self.init_weights is not None and (self.init_encoder is not None or self.simsiam.enabled):
            raise ValueError("init_weights initialises the whole model: leave out init_encoder and simsiam")
        return self


class TrainSettings(RunOptions):
    """What :class:`~changedet.train.trainer.Trainer` needs of a training config: the run options and the
    ``optim`` and ``validation`` sections (:meth:`from_config` takes them from a :class:`TrainConfig`).

    Besides ``optim=`` / ``validation=`` sections, their fields may be given flat: ``lr=``,
    ``ema_decay=`` (optim), ``patience=``, ``val_tile=`` / ``val_every=`` (``validation.tile`` /
    ``validation.every``).
    """

    optim: OptimSection = Field(default_factory=OptimSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    num_workers: NumWorkers = 0
    max_steps: PositiveInt | None = Field(default=None, description="stop after this many optimiser steps")

    @model_validator(mode="before")
    @classmethod
    def _flat_section_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, section, prefix in (("optim", OptimSection, ""), ("validation", ValidationSection, "val_")):
            flat = {
                name.removeprefix(prefix): out.pop(name)
                for name in list(out)
                if name not in cls.model_fields and name.removeprefix(prefix) in section.model_fields
            }
            if flat:
                given = out.get(key) or {}
                out[key] = {**(given.model_dump() if isinstance(given, BaseModel) else given), **flat}
        return out

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "TrainSettings":
        """The settings of ``cfg`` (its own ``optim`` and ``validation`` sections, ``data.num_workers``)."""
        run = {name: getattr(cfg, name) for name in RunOptions.model_fields}
        return cls(**run, optim=cfg.optim, validation=cfg.validation, num_workers=cfg.data.num_workers)

    def updated(self, **values: Any) -> "TrainSettings":
        """A validated copy with ``values`` (fields, or flat section fields) replaced."""
        return TrainSettings.model_validate({**self.model_dump(), **values})


def _resolve(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    if path.is_absolute() or path.exists() or base is None:
        return path
    for folder in (base, *base.parents):
        candidate = folder / path
        if candidate.exists():
            return candidate
    return path


def _checkpoint_architecture(path: Path) -> ModelSection:
    """The model section of the checkpoint ``init_weights`` names (:class:`ConfigError` when it is not one)."""
    from changedet.checkpoint import read_metadata

    try:
        meta = read_metadata(path)
    except (OSError, ValueError, ChangeDetError) as exc:
        raise ConfigError(f"init_weights {path}: not a checkpoint changedet can read ({exc})") from None
    return ModelSection(name=meta["model"], config=meta["config"])


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with nested ``overrides`` merged in (dicts merged key by key, other values replaced)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_train_config(
    path: str | Path | None = None,
    data: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read and validate a YAML training config (or a dict); :class:`ConfigError` with the reasons otherwise.

    ``overrides`` (nested) are merged in before validation, e.g. ``{"epochs": 2}``. ``data.root``
    and ``init_encoder`` are resolved (see the module docstring); ``output_dir`` stays relative to
    the working directory.
    """
    base = None
    if data is None:
        if path is None:
            raise ConfigError("load_train_config needs a path or a dict")
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}") from exc
        base = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path or ''} must be a mapping".replace("  ", " "))
    if overrides:
        data = merge_overrides(data, overrides)
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid training config{f' {path}' if path else ''}: {reasons}") from exc
    if cfg.data.root is not None:
        cfg.data.root = _resolve(cfg.data.root, base)
    for source in cfg.data.sources:
        source.root = _resolve(source.root, base)
    if cfg.init_encoder is not None:
        cfg.init_encoder = _resolve(cfg.init_encoder, base)
    if cfg.init_weights is not None:
        cfg.init_weights = _resolve(cfg.init_weights, base)
        cfg.model = _checkpoint_architecture(cfg.init_weights)
    return cfg
