"""Evaluation runs as independent jobs (checkpoint × scene × setting) and their summary.

Generic over the registered stages (:mod:`changedet.evaluation.stages`), looked up by ``cfg.stage``:
:func:`prepare` runs the stage's preparation (e.g. adversarial fine-tuning); :func:`plan_jobs` lists
the jobs; :func:`run_job` evaluates one (any process: models and scenes are cached per process) and
returns the scene's probability histograms; :func:`summarize` pools the scenes of each setting into
metrics at the checkpoint's threshold under its recommended rule (F1, IoU, precision, recall, ECE). :func:`run_evaluation`
chains them in one process (the CLI); ``flows/evaluate.py`` maps :func:`run_job` over Dask.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel

from changedet.data.discovery import discover_scenes
from changedet.errors import ChangeDetError
from changedet.evaluation.calibration import histogram_ece
from changedet.evaluation.loading import cached_model, cached_scene
from changedet.evaluation.stages import EvaluationConfig, get_stage
from changedet.metrics import ProbabilityHistogram, ValidationResult
from changedet.pipeline.postprocess import scene_threshold

METRICS = ("f1", "iou", "precision", "recall")


class Job(BaseModel):
    """One unit of work: a checkpoint on one scene under one setting."""

    checkpoint: str
    scene: str
    setting: dict[str, Any]


def scene_names(cfg: EvaluationConfig) -> list[str]:
    """``cfg.scenes``, or the first checkpoint's validation scenes (never its training scenes)."""
    labelled = {record.name for record in discover_scenes(cfg.data, cfg.layout, labelled_only=True)}
    names = cfg.scenes or cached_model(cfg.checkpoints[0], cfg.device).validation_scenes
    if not names:
        raise ChangeDetError(f"{cfg.checkpoints[0]} records no validation scenes (it was trained on every labelled "
                             "scene): pass scenes, e.g. --scenes bercy")
    missing = [n for n in names if n not in labelled]
    if missing:  # before any job runs, not after the first scenes were computed
        raise ChangeDetError(f"no labelled scene {', '.join(missing)} in {cfg.data} (found: {', '.join(sorted(labelled)) or 'none'})")
    return list(names)


def prepare(cfg: EvaluationConfig) -> EvaluationConfig:
    """The stage's preparation (before planning); returns the config its jobs run with."""
    return get_stage(cfg.stage).prepare(cfg)


def plan_jobs(cfg: EvaluationConfig) -> list[Job]:
    """Every (checkpoint, scene, setting) job; unknown setting names fail before the scenes are looked up."""
    settings = get_stage(cfg.stage).settings(cfg)
    names = scene_names(cfg)
    return [Job(checkpoint=c, scene=n, setting=s) for c in cfg.checkpoints for n in names for s in settings]


def run_job(cfg: EvaluationConfig, job: Job) -> dict[str, Any]:
    """Evaluate one job; returns the job, its scene's change/no-change probability histograms and seconds."""
    start = time.perf_counter()
    loaded = cached_model(job.checkpoint, cfg.device)
    bands = (tuple(loaded.bands[0]), tuple(loaded.bands[1]))
    scene = cached_scene(cfg.data, job.scene, bands, cfg.layout)
    hist = get_stage(cfg.stage).evaluate(cfg, loaded, scene, job.setting).scenes[scene.name]
    return {**job.model_dump(), "pos": hist.pos.tolist(), "neg": hist.neg.tolist(), "seconds": time.perf_counter() - start}


def _scored(per_scene: ValidationResult, threshold: float, rule: str) -> dict[str, Any]:
    """Pooled metrics, ECE and per-scene F1 under the checkpoint's threshold rule (``otsu``: each
    scene's own threshold from its histogram, as detect chooses it)."""
    at = {n: scene_threshold(rule, threshold, h) for n, h in per_scene.scenes.items()} if rule == "otsu" else threshold
    metrics = per_scene.metrics(at)
    return {**{k: metrics["pooled"][k] for k in METRICS}, "ece": histogram_ece(per_scene.pooled),
            "per_scene_f1": {n: m["f1"] for n, m in metrics["per_scene"].items()}}  # fmt: skip


def summarize(cfg: EvaluationConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool scenes per (checkpoint, setting): rows with F1/IoU/precision/recall at the checkpoint's
    threshold, ECE and per-scene F1; plus the configuration, thresholds and total job seconds."""
    groups: dict[tuple[str, tuple], dict[str, ProbabilityHistogram]] = {}
    seconds: dict[tuple[str, tuple], float] = {}
    for r in results:
        key = (r["checkpoint"], tuple(r["setting"].items()))
        hist = ProbabilityHistogram(len(r["pos"]), np.asarray(r["pos"], np.int64), np.asarray(r["neg"], np.int64))
        groups.setdefault(key, {})[r["scene"]] = hist
        seconds[key] = seconds.get(key, 0.0) + r["seconds"]
    stage = get_stage(cfg.stage)
    checkpoints = {c: cached_model(c, cfg.device) for c in cfg.checkpoints}
    rows = []
    for (ckpt, setting), per_scene in groups.items():
        loaded = checkpoints[ckpt]
        pooled = ValidationResult(per_scene, next(iter(per_scene.values())).bins)
        rows.append({
            "checkpoint": loaded.label,
            **dict(setting),
            **_scored(pooled, loaded.threshold, loaded.threshold_rule),
            **stage.row_metrics(cfg, dict(setting), pooled.pooled),
        })  # fmt: skip
    return {
        "stage": cfg.stage,
        "config": cfg.model_dump(),
        "scenes": sorted({r["scene"] for r in results}),
        "checkpoints": {m.label: {"source": c, "threshold": m.threshold, "threshold_rule": m.threshold_rule}
                        for c, m in checkpoints.items()},  # fmt: skip
        "rows": rows,
        "row_seconds": [round(s, 2) for s in seconds.values()],  # job seconds of each row (timings: not part of the rows)
        "job_seconds": round(sum(r["seconds"] for r in results), 1),
    }


def run_evaluation(cfg: EvaluationConfig, progress: Callable[[Job], None] | None = None) -> dict[str, Any]:
    """:func:`prepare`, then all jobs of ``cfg`` in this process, then :func:`summarize`."""
    cfg = prepare(cfg)
    results = []
    for job in plan_jobs(cfg):
        results.append(run_job(cfg, job))
        if progress:
            progress(job)
    return summarize(cfg, results)
