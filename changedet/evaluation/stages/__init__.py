"""Registry of evaluation stages (``changedet <stage>``, ``python flows/evaluate.py <stage>``).

A stage is one module of this package: a config model (an :class:`EvaluationConfig` with a literal
``stage`` field) and a :class:`Stage` subclass decorated with :func:`register_stage` that lists the
settings of one checkpoint × scene, evaluates one job, writes its part of the report and may prepare
the run (e.g. fine-tune a checkpoint first). Modules are imported on the first lookup
(:func:`all_stages`), so adding a stage is adding a file here: its command-line options (CLI and flow)
are derived from its config model (:mod:`changedet.options`), and
:mod:`~changedet.evaluation.runs` / :mod:`~changedet.evaluation.report` look it up by name.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import Field

from changedet.errors import ChangeDetError
from changedet.options import Parameters, add_model_options, given_values
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_TILE, MIN_TILE

if TYPE_CHECKING:
    from changedet.data.scenes import ChangeScene
    from changedet.evaluation.loading import LoadedModel
    from changedet.evaluation.tables import Panel
    from changedet.metrics import ProbabilityHistogram, ValidationResult

#: value of a setting's keys in the unperturbed (clean) setting
CLEAN = "clean"


class EvaluationConfig(Parameters):
    """What every stage shares: checkpoints, labelled scenes and detect's tiling."""

    checkpoints: list[str] = Field(
        default_factory=lambda: ["oscd-s2"], min_length=1, description="trained checkpoint or bundled name",
        json_schema_extra={"option": "--model", "action": "append", "metavar": "MODEL"},
    )  # fmt: skip
    data: str = Field(description="dataset root (OSCD, LEVIR-CD or pair folders), e.g. ../shared/data/oscd")
    layout: str = Field("auto", description="dataset layout: auto, oscd, levir or pairs")
    scenes: list[str] | None = Field(None, description="comma-separated labelled scenes (default: the first model's validation scenes)")
    tile: int = Field(DEFAULT_TILE, ge=MIN_TILE, description="tile size in pixels")
    overlap: int = Field(DEFAULT_OVERLAP, ge=0, description="tile overlap in pixels")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="tiles per model call")
    device: str = Field("cpu", description="cpu or cuda")
    seed: int = Field(0, description="seed of random attack starts and shift parameters")
    #: the stage's name: each stage's model narrows it to a one-value ``Literal`` with that default
    stage: str

    def prediction(self) -> dict[str, Any]:
        """Tiling keywords of the evaluation functions (``tile``, ``overlap``, ``batch_size``, ``device``)."""
        return {"tile": self.tile, "overlap": self.overlap, "batch_size": self.batch_size, "device": self.device}

    def check_known(self, **known: Collection[str]) -> None:
        """Raise a :class:`ChangeDetError` naming every value of the list fields ``known`` names that it lacks."""
        bad = [value for name, allowed in known.items() for value in getattr(self, name) if value not in allowed]
        if bad:
            raise ChangeDetError(f"unknown {self.stage} setting(s): {', '.join(bad)}")


C = TypeVar("C", bound=EvaluationConfig)


class Stage(ABC, Generic[C]):
    """An evaluation stage; subclasses set the class attributes and are registered with :func:`register_stage`."""

    #: the stage's config model; its literal ``stage`` field names the stage
    config: ClassVar[type[EvaluationConfig]]
    #: one line for ``changedet --help``
    help: ClassVar[str]
    #: file name of the report's plot
    plot_name: ClassVar[str]
    #: x axis of the plot
    xlabel: ClassVar[str]

    @property
    def name(self) -> str:
        """The stage's name (its config's ``stage`` literal)."""
        return self.config.model_fields["stage"].default

    def prepare(self, cfg: C) -> C:
        """Work before the jobs are planned (default none); returns the config the jobs run with."""
        return cfg

    @abstractmethod
    def settings(self, cfg: C) -> list[dict[str, Any]]:
        """Settings of one checkpoint × scene (the clean one once); unknown names are a :class:`ChangeDetError`."""

    @abstractmethod
    def evaluate(self, cfg: C, loaded: LoadedModel, scene: ChangeScene, setting: dict[str, Any]) -> ValidationResult:
        """Probability histograms of ``scene`` under ``setting``."""

    def row_metrics(self, cfg: C, setting: dict[str, Any], pooled: ProbabilityHistogram) -> dict[str, Any]:
        """Extra fields of a setting's report row from its pooled histogram (default none)."""
        return {}

    @abstractmethod
    def markdown(self, report: dict[str, Any]) -> list[str]:
        """The report's markdown sections after its heading."""

    @abstractmethod
    def panels(self, report: dict[str, Any]) -> list[Panel]:
        """The plot's panels."""


STAGES: dict[str, Stage] = {}
T = TypeVar("T", bound=type[Stage])


def register_stage(cls: T) -> T:
    """Class decorator adding a :class:`Stage` to :data:`STAGES` under its config's ``stage`` literal."""
    annotation = cls.config.model_fields["stage"].annotation
    if get_origin(annotation) is not Literal or len(get_args(annotation)) != 1:
        raise TypeError(f"{cls.config.__name__}.stage must be a Literal of the stage's name")
    stage = cls()
    if stage.name in STAGES:
        raise ValueError(f"evaluation stage {stage.name!r} is registered twice")
    STAGES[stage.name] = stage
    return cls


@functools.cache
def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def all_stages() -> dict[str, Stage]:
    """Every registered stage by name (the stage modules of this package are imported on the first call)."""
    _discover()
    return STAGES


def get_stage(name: str) -> Stage:
    """The registered stage ``name``."""
    try:
        return all_stages()[name]
    except KeyError:
        raise ChangeDetError(f"unknown evaluation stage {name!r}; choose one of {', '.join(all_stages())}") from None


def parse_config(value: EvaluationConfig | dict[str, Any]) -> EvaluationConfig:
    """A stage's config from a config (kept) or a dict with its ``stage`` (validated by that stage's model)."""
    if isinstance(value, EvaluationConfig):
        if not isinstance(value, get_stage(value.stage).config):
            raise ValueError(f"a {value.stage} config must be a {get_stage(value.stage).config.__name__}")
        return value
    if not isinstance(value, dict):
        raise ValueError(f"expected an evaluation config, got {type(value).__name__}")
    return get_stage(str(value.get("stage", ""))).config.model_validate(value)


def add_stage_parsers(sub: argparse._SubParsersAction, extra: Callable[[argparse.ArgumentParser], None]) -> None:
    """One subcommand per stage with an option per config field (see :mod:`changedet.options`), plus ``extra``'s."""
    for name, stage in all_stages().items():
        parser = sub.add_parser(name, help=stage.help, description=stage.help)
        add_model_options(parser, stage.config, exclude=("stage",))
        extra(parser)


def stage_config(name: str, args: argparse.Namespace) -> EvaluationConfig:
    """The config of stage ``name`` from a command line (:func:`add_stage_parsers`); invalid values are one
    :class:`~changedet.options.ParameterError` naming the option."""
    model = get_stage(name).config
    return model(**given_values(args, model))
