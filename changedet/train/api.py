"""Library entry point: :func:`train_from_config` runs a whole training from a YAML config.

Steps (each a plain function, so an orchestrator can call them one by one):
:func:`prepare_data` (discover scenes, split by group, open them, training statistics),
:func:`build_model`, optional encoder initialisation / SimSiam pretraining
(:func:`pretrain_encoder`), then :class:`~changedet.train.trainer.Trainer` with the supervised objective
and :meth:`TrainSettings.from_config <changedet.train.config.TrainSettings.from_config>`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from changedet.data.augment import PairedAugment
from changedet.data.datasets import PatchDataset
from changedet.data.discovery import discover_scenes
from changedet.data.scenes import ChangeScene, open_scenes
from changedet.data.splits import describe_split, split_by_groups
from changedet.data.stats import PER_SCENE, compute_normalization, per_scene_normalization
from changedet.errors import InputError
from changedet.io.writers import write_text
from changedet.losses import build_loss
from changedet.models import ChangeModel, create_model
from changedet.train.checkpointing import checkpoint_metadata, load_weights
from changedet.train.config import TrainConfig, TrainSettings, load_train_config, merge_overrides
from changedet.train.objectives import SupervisedObjective
from changedet.train.results import TrainResult
from changedet.train.simsiam import load_encoder_weights, pretrain_simsiam
from changedet.train.trainer import Trainer

log = logging.getLogger(__name__)

SIMSIAM_CHECKPOINT = "simsiam.safetensors"
SIMSIAM_RUN = "simsiam"  # the pretraining Trainer's checkpoints, for resuming an interrupted pretraining


@dataclass
class PreparedData:
    """Opened scenes of one run and the training statistics."""

    train: list[ChangeScene]
    val: list[ChangeScene]
    unlabelled: list[ChangeScene]
    normalization: dict[str, Any]
    split: dict[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int | tuple[int, int]:
        """The model's ``in_channels`` for these bands."""
        c1, c2 = self.train[0].channels
        return c1 if c1 == c2 else (c1, c2)


def prepare_data(cfg: TrainConfig, with_unlabelled: bool | None = None) -> PreparedData:
    """Discover scenes of every source, split each by group (never one city on both sides), open them,
    compute statistics.

    Shared statistics come from the training scenes only; per-scene statistics are each scene's own
    (as inference computes them). Unlabelled scenes (for SimSiam) exclude the validation groups.
    """
    d = cfg.data
    if with_unlabelled is None:
        with_unlabelled = cfg.simsiam.enabled and cfg.simsiam.include_unlabelled
    heterogeneous = d.bands_t2 is not None and d.bands_t2 != d.bands
    train: list[ChangeScene] = []
    val: list[ChangeScene] = []
    unlabelled: list[ChangeScene] = []
    for source in d.source_list():
        records = discover_scenes(source.root, source.layout)
        labelled = [r for r in records if r.labelled]
        if not labelled:
            raise InputError(f"no labelled scene under {source.root}")
        train_recs, val_recs = split_by_groups(labelled, source.val, source.train)
        if not train_recs:
            raise InputError(f"no training scene left under {source.root} after removing the validation groups")
        val_groups = {r.group for r in val_recs}
        extra = [r for r in records if not r.labelled and r.group not in val_groups] if with_unlabelled else []
        scenes = open_scenes(
            train_recs + val_recs + extra, source.bands, d.bands_t2, d.nodata, d.resampling, heterogeneous, d.cache_mb * 2**20
        )
        train += scenes[: len(train_recs)]
        val += scenes[len(train_recs) : len(train_recs) + len(val_recs)]
        unlabelled += scenes[len(train_recs) + len(val_recs) :]
    split = describe_split(train, val).to_dict()
    if d.normalization == PER_SCENE:
        normalization = per_scene_normalization(train + val + unlabelled)
    else:
        normalization = compute_normalization(train, d.shared_stats, max_pixels_per_scene=d.stats_max_pixels, seed=cfg.seed)
    split["unlabelled"] = [s.name for s in unlabelled]
    return PreparedData(train, val, unlabelled, normalization, split)


def build_model(cfg: TrainConfig, in_channels: int | tuple[int, int]) -> ChangeModel:
    """The configured model for ``in_channels`` bands."""
    return create_model(cfg.model.name, in_channels=in_channels, **cfg.model.config)


def pretrain_encoder(cfg: TrainConfig, model: ChangeModel, data: PreparedData, out_dir: Path) -> dict[str, Any] | None:
    """Initialise the model: all of it from ``init_weights`` (a fine-tune), its encoder from
    ``init_encoder``, or the encoder by SimSiam pretraining (reused when resuming)."""
    if cfg.init_weights is not None:
        keys = load_weights(model, cfg.init_weights)
        return {"method": "init_weights", "checkpoint": str(cfg.init_weights), "tensors": len(keys)}
    if cfg.init_encoder is not None:
        keys = load_encoder_weights(model, cfg.init_encoder)
        return {"method": "init_encoder", "checkpoint": str(cfg.init_encoder), "tensors": len(keys)}
    if not cfg.simsiam.enabled:
        return None
    ss = cfg.simsiam
    path = out_dir / SIMSIAM_CHECKPOINT
    if cfg.resume and path.is_file():
        keys = load_encoder_weights(model, path)
        return {"method": ss.method, "checkpoint": str(path), "reused": True, "tensors": len(keys)}
    scenes = data.train + data.unlabelled
    dataset = PatchDataset(
        scenes, ss.patch_size, data.normalization, None, ss.samples_per_epoch, 0.0, cfg.seed + 1, require_label=False
    )
    meta = checkpoint_metadata(
        cfg.model.name, cfg.model.config, data.train[0].bands, data.normalization, 0.5,
        split={"pretraining_scenes": [s.name for s in scenes]},
    )  # fmt: skip
    result = pretrain_simsiam(model, dataset, ss, TrainSettings.from_config(cfg), path, meta, run_dir=out_dir / SIMSIAM_RUN)
    return {
        "method": ss.method,
        "checkpoint": str(path),
        "scenes": [s.name for s in scenes],
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "embedding_std": result.final_std,
        "healthy_std": result.healthy_std,
    }


def train_from_config(config: str | Path | TrainConfig, overrides: dict[str, Any] | None = None) -> TrainResult:
    """Run the training a config describes; returns the :class:`TrainResult`.

    Args:
        config: a YAML path (``configs/train/oscd.yaml``) or a validated :class:`TrainConfig`.
        overrides: nested values merged into the YAML before validation, e.g.
            ``{"epochs": 2, "data": {"samples_per_epoch": 64}}``.

    Writes checkpoints (``best.safetensors`` for ``changedet detect --model``), the resolved
    config (``train_config.json``) and the result (``result.json``) into ``output_dir``.
    """
    if isinstance(config, TrainConfig):
        cfg = config
        if overrides:
            cfg = load_train_config(data=merge_overrides(config.model_dump(mode="json"), overrides))
    else:
        cfg = load_train_config(config, overrides=overrides)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "train_config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
    data = prepare_data(cfg)
    model = build_model(cfg, data.in_channels)
    pretraining = pretrain_encoder(cfg, model, data, out_dir)
    augment = None
    if cfg.augment.enabled:
        a = cfg.augment
        augment = PairedAugment(a.hflip, a.vflip, a.rot90, a.crop, a.gain, a.offset, a.noise, a.swap)
    train_data = PatchDataset(
        data.train, cfg.data.patch_size, data.normalization, augment, cfg.data.samples_per_epoch,
        cfg.data.change_fraction, cfg.seed,
    )  # fmt: skip
    sources = [{"layout": src.layout, "root": str(src.root), "bands": src.bands} for src in cfg.data.source_list()]
    extra = {"data": {"sources": sources, "normalization": cfg.data.normalization}, "pretraining": pretraining}
    if cfg.data.channel_names:
        extra["channel_names"] = list(cfg.data.channel_names)
    objective = SupervisedObjective(build_loss(cfg.loss.name, **cfg.loss.kwargs()))
    trainer = Trainer(
        model, cfg.model.name, cfg.model.config, objective, train_data, data.val, data.normalization, out_dir,
        TrainSettings.from_config(cfg), data.split, extra,
    )  # fmt: skip
    result = trainer.fit()
    result.pretraining = pretraining
    write_text(out_dir / "result.json", json.dumps(result.to_dict(), indent=2))
    for scene in data.train + data.val + data.unlabelled:
        scene.close()
    return result
