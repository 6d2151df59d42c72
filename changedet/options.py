"""Command-line options derived from pydantic parameter models.

Every parameter is declared once, as a field of a pydantic model (name, type, default, bounds,
description). :func:`add_model_options` turns the fields into ``--kebab-case`` options of an
``argparse`` parser, so ``changedet …`` and ``python flows/… `` offer the same options with the same
defaults and help, and a new field appears in both with no other edit. Options the user did not
give are left out of :func:`given_values`, so the model's default applies. Models derived from
:class:`Parameters` report an invalid value as one :class:`ParameterError` naming the option.

A field may declare, in its ``json_schema_extra``, ``"option": "--model"`` (another option name than
its own), ``"action": "append"`` (a repeatable option, one item per occurrence, instead of a comma
list) and ``"metavar": "OUT.safetensors"`` (the value's name in ``--help``).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from changedet.errors import ChangeDetError

class ParameterError(ChangeDetError):
    """A parameter value outside what its field allows (reported with the option's name)."""


def option_name(field: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def field_option(model: type[BaseModel], field: str) -> str:
    """The option of ``model``'s ``field``: the ``option`` of its ``json_schema_extra``, else :func:`option_name`."""
    return str(_extra(model.model_fields[field]).get("option") or option_name(field))


def comma_list(value: str) -> list[str]:
    """An argparse type: ``"B04, B03,B02"`` -> ``["B04", "B03", "B02"]``; an empty list is an error."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {value!r}")
    return names


def comma_floats(value: str) -> list[float]:
    """An argparse type: ``"0,1,2.5"`` -> ``[0.0, 1.0, 2.5]``."""
    try:
        return [float(v) for v in comma_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _bounds(info: FieldInfo) -> str:
    words = {Ge: ("at least", "ge"), Gt: ("above", "gt"), Le: ("at most", "le"), Lt: ("below", "lt")}
    parts = []
    for meta in info.metadata:
        for kind, (word, attr) in words.items():
            if isinstance(meta, kind):
                parts.append(f"{word} {getattr(meta, attr)}")
    return ", ".join(parts)


def _argument(info: FieldInfo) -> dict[str, Any]:
    """``add_argument`` keywords for one field (type, choices, action, help)."""
    annotation = _unwrap_optional(info.annotation)
    origin = get_origin(annotation)
    kwargs: dict[str, Any] = {}
    append = _extra(info).get("action") == "append"
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif origin is Literal:
        choices = list(get_args(annotation))
        kwargs.update(choices=choices, type=type(choices[0]))
    elif origin in (list, Sequence, tuple, typing.Sequence, Collection):
        item = _unwrap_optional((get_args(annotation) or (str,))[0])
        if append:
            kwargs.update(action="append", type=item)
        else:
            kwargs["type"] = comma_floats if item in (float, int) else comma_list
    elif annotation in (int, float, str):
        kwargs["type"] = annotation
    else:
        raise TypeError(f"no command-line form for a field of type {annotation!r}")
    notes = ["repeatable"] if append else []
    if default is not None and default is not False and not info.is_required():
        notes.append(f"default {','.join(map(str, default)) if isinstance(default, (list, tuple)) else default}")
    if bounds := _bounds(info):
        notes.append(bounds)
    text = info.description or ""
    kwargs["help"] = f"{text} ({'; '.join(notes)})" if notes else text
    kwargs["required"] = info.is_required()
    if "metavar" in _extra(info):
        kwargs["metavar"] = _extra(info)["metavar"]
    return kwargs


def add_model_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    exclude: Collection[str] = (),
    include: Collection[str] | None = None,
) -> None:
    """One ``--option`` per field of ``model`` (minus ``exclude``, or only ``include``), with the
    field's type, choices, bounds and description; absent options keep the model's default."""
    fields = sorted(model.model_fields.items(), key=lambda item: not item[1].is_required())  # required first
    for name, info in fields:
        if name in exclude or (include is not None and name not in include):
            continue
        parser.add_argument(field_option(model, name), dest=name, default=argparse.SUPPRESS, **_argument(info))


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` the command line set (see :func:`add_model_options`)."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def parameter_reason(exc: ValidationError, model: type[BaseModel]) -> str:
    """``--tile: must be at least 16, got 8`` for the first error of ``exc``."""
    error = exc.errors()[0]
    loc = error.get("loc", ())
    field = str(loc[0]) if loc else ""
    name = field_option(model, field) if field in model.model_fields else (field or model.__name__)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    ctx = error.get("ctx") or {}
    kind = error.get("type", "")
    plain = {"greater_than_equal": "must be at least {ge}", "greater_than": "must be above {gt}",
             "less_than_equal": "must be at most {le}", "less_than": "must be below {lt}"}
    if kind in plain:
        message = plain[kind].format(**ctx)
    got = error.get("input")
    if kind in plain or kind.endswith("_parsing") or kind == "literal_error":
        message += f", got {got!r}"
    if message.startswith("--"):  # a validator that names its options itself
        return message
    return f"{name}: {message}" if field else message


class Parameters(BaseModel):
    """A parameter model whose construction reports an invalid value as one :class:`ParameterError`
    naming the option (``--tile: must be at least 16, got 8``), for the library as for the command line.
    ``model_validate`` (Prefect's parameter validation) still raises pydantic's ``ValidationError``."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ParameterError(parameter_reason(exc, type(self))) from None
