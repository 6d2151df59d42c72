"""Training: configuration, the supervised Trainer with full-scene validation, SimSiam pretraining.

Entry point: :func:`train_from_config` (``configs/train/*.yaml``).
"""

from changedet.train.api import PreparedData, build_model, prepare_data, pretrain_encoder, train_from_config
from changedet.train.config import ConfigError, TrainConfig, load_train_config, merge_overrides
from changedet.train.evaluation import ProbabilityHistogram, ValidationResult, evaluate_scenes, predict_scene
from changedet.train.simsiam import (
    SimSiam,
    SimSiamResult,
    ViewAugment,
    embedding_std,
    find_encoders,
    load_encoder_weights,
    pretrain_simsiam,
)
from changedet.train.trainer import TrainResult, Trainer, TrainSettings, checkpoint_metadata, pick_device, seed_everything

__all__ = [
    "ConfigError",
    "PreparedData",
    "ProbabilityHistogram",
    "SimSiam",
    "SimSiamResult",
    "TrainConfig",
    "TrainResult",
    "TrainSettings",
    "Trainer",
    "ValidationResult",
    "ViewAugment",
    "build_model",
    "checkpoint_metadata",
    "embedding_std",
    "evaluate_scenes",
    "find_encoders",
    "load_encoder_weights",
    "load_train_config",
    "merge_overrides",
    "pick_device",
    "predict_scene",
    "prepare_data",
    "pretrain_encoder",
    "pretrain_simsiam",
    "seed_everything",
    "train_from_config",
]
