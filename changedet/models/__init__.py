"""Change models: a registry of weight-shared Siamese, pseudo-Siamese and classical models.

Every model is a :class:`ChangeModel` whose ``forward(t1, t2)`` returns a :class:`ChangeOutput`.
Importing this package registers all model families.
"""

from changedet.models import cva  # noqa: F401  (registers "cva")
from changedet.models.base import ChangeModel
from changedet.models.output import ChangeOutput
from changedet.models.registry import create_model, list_models, model_entry, register_model

__all__ = ["ChangeModel", "ChangeOutput", "create_model", "list_models", "model_entry", "register_model"]
