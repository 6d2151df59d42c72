"""Training: configuration, the one :class:`Trainer` loop with full-scene validation, and its objectives
(supervised, SimSiam pretraining, cross-modal learning; adversarial fine-tuning lives in
:mod:`changedet.evaluation.defence`).

Entry point: :func:`train_from_config` (``configs/train/*.yaml``).
"""

from changedet.train.api import PreparedData, build_model, prepare_data, pretrain_encoder, train_from_config
from changedet.train.checkpointing import checkpoint_metadata
from changedet.train.config import ConfigError, RunOptions, TrainConfig, TrainSettings, load_train_config, merge_overrides
from changedet.metrics import ProbabilityHistogram, ValidationResult
from changedet.pipeline.validation import evaluate_scenes
from changedet.train.objectives import Objective, StepContext, SupervisedObjective
from changedet.train.results import TrainResult
from changedet.train.simsiam import (
    SimSiam,
    SimSiamObjective,
    SimSiamResult,
    ViewAugment,
    embedding_std,
    find_encoders,
    load_encoder_weights,
    pretrain_simsiam,
)
from changedet.train.trainer import Trainer, pick_device, seed_everything

__all__ = [
    "ConfigError",
    "Objective",
    "PreparedData",
    "ProbabilityHistogram",
    "RunOptions",
    "SimSiam",
    "SimSiamObjective",
    "SimSiamResult",
    "StepContext",
    "SupervisedObjective",
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
    "prepare_data",
    "pretrain_encoder",
    "pretrain_simsiam",
    "seed_everything",
    "train_from_config",
]
