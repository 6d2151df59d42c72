"""Evaluation runs as independent jobs (checkpoint × scene × attack/shift × severity) and their summary.

:func:`plan_jobs` lists the jobs of a :class:`RobustnessConfig` or :class:`DomainShiftConfig`;
:func:`run_job` evaluates one (any process: models and scenes are cached per process) and returns the
scene's probability histograms; :func:`summarize` pools the scenes of each setting into metrics at the
checkpoint's threshold (F1, IoU, precision, recall, ECE). :func:`run_evaluation` chains them in one
process (the CLI); ``flows/evaluate.py`` maps :func:`run_job` over Dask.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from changedet.data.scenes import discover_scenes
from changedet.errors import ChangeDetError
from changedet.evaluation.adversarial import METHODS, MODES, Attack, evaluate_attack
from changedet.evaluation.calibration import histogram_ece
from changedet.evaluation.domain_shift import ADAPTATIONS, SHIFTS, evaluate_shift
from changedet.evaluation.loading import cached_model, cached_scene
from changedet.evaluation.sensor import scene_sensor
from changedet.train.evaluation import (
    ProbabilityHistogram,
    ValidationResult,
    evaluate_scenes,
)

CLEAN = "clean"
METRICS = ("f1", "iou", "precision", "recall")


class _Common(BaseModel):
    checkpoints: list[str] = Field(default_factory=lambda: ["oscd-s2"], min_length=1)
    data: str = Field(description="dataset root (OSCD, LEVIR-CD or pair folders)")
    layout: str = "auto"
    scenes: list[str] | None = Field(None, description="labelled scenes (default: the first checkpoint's validation split)")
    tile: int = Field(256, ge=16)
    overlap: int = Field(32, ge=0)
    batch_size: int = Field(8, ge=1)
    device: str = "cpu"
    seed: int = 0


class RobustnessConfig(_Common):
    """Adversarial robustness: FGSM/PGD per ε (in 1/255 reflectance) and mode."""

    stage: Literal["robustness"] = "robustness"
    eps: list[float] = Field(default_factory=lambda: [0, 1, 2, 4, 8], description="budgets in 1/255 reflectance units")
    modes: list[str] = Field(default_factory=lambda: list(MODES))
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    steps: int = Field(10, ge=1)
    step_size: float | None = Field(None, gt=0, description="PGD step in 1/255 units (default 2.5 ε / steps)")
    random_start: bool = False

    @field_validator("eps")
    @classmethod
    def _budgets(cls, eps: list[float]) -> list[float]:
        if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
            raise ValueError(f"budgets must be finite and >= 0 (1/255 reflectance units), got {eps}")
        return eps


class DomainShiftConfig(_Common):
    """Domain shift: each shift per severity, without and with test-time adaptation."""

    stage: Literal["domain-shift"] = "domain-shift"
    shifts: list[str] = Field(default_factory=lambda: list(SHIFTS))
    severities: list[float] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    adaptations: list[str] = Field(default_factory=lambda: list(ADAPTATIONS))
    dates: Literal["t2", "both"] = "t2"

    @field_validator("severities")
    @classmethod
    def _severities(cls, severities: list[float]) -> list[float]:
        if not severities or any(not 0 <= v <= 5 for v in severities):
            raise ValueError(f"severities must be within [0, 5] (0 = no shift), got {severities}")
        return severities


EvaluationConfig = RobustnessConfig | DomainShiftConfig


class Job(BaseModel):
    """One unit of work: a checkpoint on one scene under one setting."""

    checkpoint: str
    scene: str
    setting: dict[str, Any]


def _check(cfg: EvaluationConfig) -> None:
    if isinstance(cfg, RobustnessConfig):
        bad = [m for m in cfg.modes if m not in MODES] + [m for m in cfg.methods if m not in METHODS]
    else:
        bad = [s for s in cfg.shifts if s not in SHIFTS] + [a for a in cfg.adaptations if a not in ADAPTATIONS]
    if bad:
        raise ChangeDetError(f"unknown {cfg.stage} setting(s): {', '.join(bad)}")


def scene_names(cfg: EvaluationConfig) -> list[str]:
    """``cfg.scenes``, or the first checkpoint's validation scenes (never its training scenes)."""
    names = cfg.scenes or cached_model(cfg.checkpoints[0], cfg.device).validation_scenes
    if not names:
        raise ChangeDetError(f"{cfg.checkpoints[0]} records no validation scenes: pass scenes")
    labelled = {record.name for record in discover_scenes(cfg.data, cfg.layout, labelled_only=True)}
    missing = [n for n in names if n not in labelled]
    if missing:  # before any job runs, not after the first scenes were computed
        raise ChangeDetError(f"no labelled scene {', '.join(missing)} in {cfg.data} (found: {', '.join(sorted(labelled)) or 'none'})")
    return list(names)


def settings(cfg: EvaluationConfig) -> list[dict[str, Any]]:
    """Settings of one checkpoint × scene; the clean setting (ε = 0 / severity 0) appears once."""
    _check(cfg)
    if isinstance(cfg, RobustnessConfig):
        out = [{"method": CLEAN, "mode": CLEAN, "eps_255": 0.0}]
        out += [{"method": m, "mode": mode, "eps_255": float(e)} for m in cfg.methods for mode in cfg.modes for e in cfg.eps if e > 0]
        return out
    out = [{"shift": CLEAN, "severity": 0.0, "adaptation": a} for a in cfg.adaptations]
    return out + [
        {"shift": s, "severity": float(v), "adaptation": a} for s in cfg.shifts for v in cfg.severities if v > 0 for a in cfg.adaptations
    ]


def plan_jobs(cfg: EvaluationConfig) -> list[Job]:
    """Every (checkpoint, scene, setting) job."""
    _check(cfg)
    names = scene_names(cfg)
    return [Job(checkpoint=c, scene=n, setting=s) for c in cfg.checkpoints for n in names for s in settings(cfg)]


def _attack(cfg: RobustnessConfig, setting: dict[str, Any]) -> Attack:
    step = cfg.step_size / 255 if cfg.step_size else None
    return Attack(setting["method"], setting["eps_255"] / 255, setting["mode"], cfg.steps, step, cfg.random_start, cfg.seed)


def run_job(cfg: EvaluationConfig, job: Job) -> dict[str, Any]:
    """Evaluate one job; returns the job, its scene's change/no-change probability histograms and seconds."""
    start = time.perf_counter()
    loaded = cached_model(job.checkpoint, cfg.device)
    bands = (tuple(loaded.bands[0]), tuple(loaded.bands[1]))
    scene = cached_scene(cfg.data, job.scene, bands, cfg.layout)
    model, norm, s = loaded.model, loaded.normalization, job.setting
    common = {"tile": cfg.tile, "overlap": cfg.overlap, "batch_size": cfg.batch_size, "device": cfg.device}
    if isinstance(cfg, RobustnessConfig) and s["method"] != CLEAN:
        result = evaluate_attack(model, [scene], norm, scene_sensor(scene), _attack(cfg, s), **common)
    elif isinstance(cfg, DomainShiftConfig):
        shift = None if s["shift"] == CLEAN else s["shift"]
        result = evaluate_shift(model, [scene], norm, shift, s["severity"], s["adaptation"], cfg.dates, seed=cfg.seed, **common)
    else:
        result = evaluate_scenes(model, [scene], norm, **common)
    hist = result.scenes[scene.name]
    return {**job.model_dump(), "pos": hist.pos.tolist(), "neg": hist.neg.tolist(), "seconds": time.perf_counter() - start}


def _row(hist: ProbabilityHistogram, threshold: float) -> dict[str, Any]:
    metrics = ValidationResult({"all": hist}, hist.bins).metrics(threshold)["pooled"]
    return {**{k: metrics[k] for k in METRICS}, "ece": histogram_ece(hist)}


def summarize(cfg: EvaluationConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool scenes per (checkpoint, setting): rows with F1/IoU/precision/recall at the checkpoint's
    threshold, ECE and per-scene F1; plus the configuration, thresholds and total job seconds."""
    groups: dict[tuple[str, tuple], dict[str, ProbabilityHistogram]] = {}
    for r in results:
        key = (r["checkpoint"], tuple(r["setting"].items()))
        hist = ProbabilityHistogram(len(r["pos"]), np.asarray(r["pos"], np.int64), np.asarray(r["neg"], np.int64))
        groups.setdefault(key, {})[r["scene"]] = hist
    checkpoints = {c: cached_model(c, cfg.device) for c in cfg.checkpoints}
    rows = []
    for (ckpt, setting), per_scene in groups.items():
        threshold = checkpoints[ckpt].threshold
        pooled = ValidationResult(per_scene, next(iter(per_scene.values())).bins)
        rows.append({
            "checkpoint": checkpoints[ckpt].label,
            **dict(setting),
            **_row(pooled.pooled, threshold),
            "per_scene_f1": {n: m["f1"] for n, m in pooled.metrics(threshold)["per_scene"].items()},
        })  # fmt: skip
    return {
        "stage": cfg.stage,
        "config": cfg.model_dump(),
        "scenes": sorted({r["scene"] for r in results}),
        "checkpoints": {m.label: {"source": c, "threshold": m.threshold} for c, m in checkpoints.items()},
        "rows": rows,
        "job_seconds": round(sum(r["seconds"] for r in results), 1),
    }


def run_evaluation(cfg: EvaluationConfig, progress: Callable[[Job], None] | None = None) -> dict[str, Any]:
    """All jobs of ``cfg`` in this process, then :func:`summarize`."""
    results = []
    for job in plan_jobs(cfg):
        results.append(run_job(cfg, job))
        if progress:
            progress(job)
    return summarize(cfg, results)
