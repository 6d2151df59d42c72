"""Loss registry in the style of timm: ``@register_loss`` / :func:`build_loss` / :func:`list_losses`.

:func:`build_loss` builds one registered loss by name (``"bce"``, ``"dice"``, ``"focal"``,
``"contrastive"``, ``"triplet"``, ``"quadruplet"``, ``"crossmodal"``) or a weighted sum such as
``"bce+dice"`` or ``"bce+0.5*contrastive"`` (a :class:`~changedet.losses.base.CompositeLoss`).
The losses register themselves when :mod:`changedet.losses` is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from changedet.losses.base import ChangeLoss, CompositeLoss

LOSSES: dict[str, Callable[..., ChangeLoss]] = {}

_L = TypeVar("_L", bound=type[ChangeLoss])


def register_loss(cls: _L) -> _L:
    """Class decorator registering a :class:`ChangeLoss` subclass under its ``name`` for :func:`build_loss`."""
    if cls.name in LOSSES:
        raise ValueError(f"loss {cls.name!r} registered twice")
    LOSSES[cls.name] = cls
    return cls


_TERM = re.compile(r"^\s*(?:(?P<weight>\d+(?:\.\d*)?|\.\d+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")


def list_losses() -> list[str]:
    """Names usable in :func:`build_loss` (and in sums such as ``bce+dice``)."""
    return sorted(LOSSES)


def _accepts(cls: Callable[..., ChangeLoss], key: str) -> bool:
    import inspect

    return key in inspect.signature(cls).parameters


def build_loss(name: str, **kwargs: Any) -> ChangeLoss:
    """Build a loss by name.

    ``name`` is one registered loss (``bce``, ``dice``, ``focal``, ``contrastive``, ``triplet``,
    ``quadruplet``) or a ``+``-separated sum with optional weights: ``"bce+dice"``,
    ``"bce+0.5*contrastive"``. Keyword arguments go to the losses that accept them
    (``build_loss("bce+dice", pos_weight=10)``); a nested dict under a part's name sets that part
    only (``build_loss("bce+triplet", triplet={"margin": 0.3})``); ``weights={"dice": 2}``
    overrides the weights written in the name.

    Raises:
        ValueError: unknown loss, malformed sum, or an argument no part accepts.
    """
    terms = [t for t in name.split("+")]
    parsed: list[tuple[str, float]] = []
    for term in terms:
        match = _TERM.match(term.lower())
        if not match or match["name"] not in LOSSES:
            raise ValueError(f"unknown loss term {term.strip()!r} in {name!r}; losses: {', '.join(list_losses())}")
        parsed.append((match["name"], float(match["weight"]) if match["weight"] else 1.0))
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"loss {name!r} names a part twice")
    kwargs = dict(kwargs)
    weights = {n: w for n, w in parsed}
    override = kwargs.pop("weights", None) or {}
    unknown_weights = set(override) - set(names)
    if unknown_weights:
        raise ValueError(f"weights for losses not in {name!r}: {', '.join(sorted(unknown_weights))}")
    weights.update({k: float(v) for k, v in override.items()})
    nested = {n: dict(kwargs.pop(n)) for n in names if isinstance(kwargs.get(n), dict)}
    parts: dict[str, ChangeLoss] = {}
    used: set[str] = set()
    for n in names:
        cls = LOSSES[n]
        own = {k: v for k, v in kwargs.items() if _accepts(cls, k)}
        used |= set(own)
        own.update(nested.get(n, {}))
        try:
            parts[n] = cls(**own)
        except TypeError as exc:
            raise ValueError(f"bad arguments for loss {n!r}: {exc}") from None
    unused = set(kwargs) - used
    if unused:
        raise ValueError(f"loss {name!r} takes no argument {', '.join(sorted(unused))}")
    if len(parts) == 1 and weights[names[0]] == 1.0:
        return parts[names[0]]
    return CompositeLoss(parts, weights)


__all__ = ["LOSSES", "build_loss", "list_losses", "register_loss"]
