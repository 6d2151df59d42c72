"""Stage ``robustness``: F1 under FGSM/PGD attacks per budget ε (1/255 reflectance) and mode.

Settings: the clean evaluation once (``method = mode = clean``, ε = 0), then every method × mode ×
ε > 0 (:func:`~changedet.evaluation.adversarial.evaluate_attack`). Optional preparation:
``--adv-finetune OUT.safetensors`` PGD-fine-tunes the first checkpoint on its training scenes
(:func:`~changedet.evaluation.defence.finetune_checkpoint`) and evaluates it next to the others.
Report: F1 per (checkpoint, method, mode) and ε, and ``f1_vs_eps.png`` (one panel per checkpoint,
one line per method/mode, FGSM dashed).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from changedet.data.scenes import ChangeScene
from changedet.evaluation.adversarial import METHODS, MODES, Attack, evaluate_attack
from changedet.evaluation.defence import finetune_checkpoint
from changedet.evaluation.loading import LoadedModel
from changedet.evaluation.tables import Line, Panel, format_metric, markdown_table
from changedet.evaluation.sensor import scene_sensor
from changedet.evaluation.stages import CLEAN, EvaluationConfig, Stage, register_stage
from changedet.metrics import ValidationResult
from changedet.pipeline.validation import evaluate_scenes

#: checkpoint -> (method, mode) -> ε -> report row
Series = dict[str, dict[tuple[str, str], dict[float, dict[str, Any]]]]


class RobustnessConfig(EvaluationConfig):
    """Adversarial robustness: FGSM/PGD per ε (in 1/255 reflectance) and mode."""

    stage: Literal["robustness"] = "robustness"
    eps: list[float] = Field(default_factory=lambda: [0, 1, 2, 4, 8], description="L-inf budgets in 1/255 reflectance units")
    modes: list[str] = Field(default_factory=lambda: list(MODES), description="t1,t2,both (untargeted), hide, fake")
    methods: list[str] = Field(default_factory=lambda: list(METHODS), description="fgsm,pgd")
    steps: int = Field(10, ge=1, description="PGD steps")
    step_size: float | None = Field(None, gt=0, description="PGD step in 1/255 units, 2.5 eps / steps if not given")
    random_start: bool = Field(False, description="PGD from a random point of the eps-ball")
    # preparation only: not part of the evaluated configuration (report.json) once done
    adv_finetune: str | None = Field(
        None, exclude=True, json_schema_extra={"metavar": "OUT.safetensors"},
        description="first PGD-fine-tune the (first) model on its training scenes into this file, then evaluate both",
    )  # fmt: skip
    finetune_steps: int = Field(200, ge=1, exclude=True, description="optimiser steps of --adv-finetune")

    @field_validator("eps")
    @classmethod
    def _budgets(cls, eps: list[float]) -> list[float]:
        if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
            raise ValueError(f"budgets must be finite and >= 0 (1/255 reflectance units), got {eps}")
        return eps


def _attack(cfg: RobustnessConfig, setting: dict[str, Any]) -> Attack:
    step = cfg.step_size / 255 if cfg.step_size else None
    return Attack(setting["method"], setting["eps_255"] / 255, setting["mode"], cfg.steps, step, cfg.random_start, cfg.seed)


def _series(report: dict[str, Any]) -> Series:
    """checkpoint -> (method, mode) -> ε -> row; the clean row stands at ε = 0 of every series."""
    cfg = report["config"]
    out: Series = {}
    for ckpt in report["checkpoints"]:
        rows = [r for r in report["rows"] if r["checkpoint"] == ckpt]
        clean = next(r for r in rows if r["method"] == CLEAN)
        series = {(m, mode): {0.0: clean} for m in cfg["methods"] for mode in cfg["modes"]}
        for r in rows:
            if r["method"] != CLEAN:
                series[(r["method"], r["mode"])][r["eps_255"]] = r
        out[ckpt] = series
    return out


@register_stage
class Robustness(Stage[RobustnessConfig]):
    """FGSM/PGD attacks per budget and mode, optionally after PGD adversarial fine-tuning."""

    config = RobustnessConfig
    help = "F1 under FGSM/PGD attacks per budget and mode (optionally after PGD fine-tuning)"
    plot_name = "f1_vs_eps.png"
    xlabel = "ε (1/255 reflectance)"

    def prepare(self, cfg: RobustnessConfig) -> RobustnessConfig:
        """With ``adv_finetune``: fine-tune the first checkpoint into that file and evaluate it too."""
        if not cfg.adv_finetune:
            return cfg
        finetune_checkpoint(cfg.checkpoints[0], cfg.adv_finetune, cfg.data, steps=cfg.finetune_steps, device=cfg.device)
        return cfg.model_copy(update={"checkpoints": [*cfg.checkpoints, cfg.adv_finetune], "adv_finetune": None})

    def settings(self, cfg: RobustnessConfig) -> list[dict[str, Any]]:
        """The clean setting, then method × mode × ε > 0."""
        cfg.check_known(modes=MODES, methods=METHODS)
        out = [{"method": CLEAN, "mode": CLEAN, "eps_255": 0.0}]
        return out + [{"method": m, "mode": mode, "eps_255": float(e)} for m in cfg.methods for mode in cfg.modes for e in cfg.eps if e > 0]

    def evaluate(self, cfg: RobustnessConfig, loaded: LoadedModel, scene: ChangeScene, setting: dict[str, Any]) -> ValidationResult:
        """The scene attacked under ``setting`` (clean: as it is)."""
        if setting["method"] == CLEAN:
            return evaluate_scenes(loaded.model, [scene], loaded.normalization, **cfg.prediction())
        attack = _attack(cfg, setting)
        return evaluate_attack(loaded.model, [scene], loaded.normalization, scene_sensor(scene), attack, **cfg.prediction())

    def markdown(self, report: dict[str, Any]) -> list[str]:
        """F1 per (method, mode) and ε, one table per checkpoint."""
        cfg = report["config"]
        eps = sorted({0.0, *(float(e) for e in cfg["eps"])})
        steps = f"PGD {cfg['steps']} steps" + (", random start" if cfg["random_start"] else "")
        parts = [f"F1 (pooled) per ε in 1/255 reflectance units; {steps}.\n"]
        for ckpt, series in _series(report).items():
            rows = [[m, mode] + [format_metric(s.get(e, {}).get("f1")) for e in eps] for (m, mode), s in series.items()]
            parts.append(f"## {ckpt}\n\n" + markdown_table(["method", "mode"] + [f"ε={e:g}" for e in eps], rows) + "\n")
        return parts

    def panels(self, report: dict[str, Any]) -> list[Panel]:
        """One panel per checkpoint, one line per method/mode (FGSM dashed)."""
        return [
            Panel(ckpt, [Line(f"{m} {mode}", s, dashed=m == "fgsm") for (m, mode), s in series.items()])
            for ckpt, series in _series(report).items()
        ]
