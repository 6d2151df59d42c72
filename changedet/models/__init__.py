"""Change models: a registry of weight-shared Siamese, pseudo-Siamese and classical models.

Every model is a :class:`ChangeModel` whose ``forward(t1, t2)`` returns a :class:`ChangeOutput`.
Importing this package registers all model families.
"""

from changedet.models import bit, cva, fc_siam, pseudo_siamese, siamese, structure, test_time  # noqa: F401  (register models)
from changedet.models.base import ChangeModel
from changedet.models.config import ModelConfig, build_from_config, load_model_config
from changedet.models.output import ChangeOutput
from changedet.models.registry import create_model, list_models, model_entry, register_model

__all__ = [
    "ChangeModel",
    "ChangeOutput",
    "ModelConfig",
    "build_from_config",
    "create_model",
    "list_models",
    "load_model_config",
    "model_entry",
    "register_model",
]
