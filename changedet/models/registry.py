"""Model registry in the style of timm: ``@register_model`` / ``create_model`` / ``list_models``."""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable

from changedet.errors import ModelError
from changedet.models.base import ChangeModel


@dataclass(frozen=True)
class ModelEntry:
    """A registered model constructor and its description."""

    name: str
    family: str
    builder: Callable[..., ChangeModel]
    description: str
    heterogeneous: bool = False

    @property
    def takes_different_inputs(self) -> bool:
        """True when the two dates may come from different sensors with different bands (no band-by-band comparison)."""
        return self.heterogeneous or self.family == "pseudo-siamese"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, family: str, description: str = "", heterogeneous: bool = False) -> Callable:
    """Decorator registering ``builder(**cfg) -> ChangeModel`` under ``name`` (``heterogeneous``: the
    dates may have different bands; pseudo-Siamese models always may)."""

    def wrap(builder: Callable[..., ChangeModel]) -> Callable[..., ChangeModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, family, builder, description or (builder.__doc__ or "").strip(), heterogeneous)
        return builder

    return wrap


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Sorted names of registered models matching a glob ``pattern`` (and ``family`` if given)."""
    return sorted(
        n for n, e in _REGISTRY.items() if fnmatch.fnmatch(n, pattern) and (family is None or e.family == family)
    )


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; :class:`ModelError` naming the valid choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def check_builder_kwargs(name: str, kwargs: Iterable[str]) -> None:
    """:class:`ModelError` naming the accepted arguments if the builder of ``name`` does not take ``kwargs``."""
    parameters = inspect.signature(model_entry(name).builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ModelError(f"model {name!r} does not take {', '.join(unknown)}; it takes {', '.join(parameters)}")


def create_model(name: str, **cfg) -> ChangeModel:
    """Build the registered model ``name`` with keyword configuration ``cfg``."""
    check_builder_kwargs(name, cfg)
    return model_entry(name).builder(**cfg)
