"""Stage ``robustness``: F1 under attacks per budget ε (1/255 reflectance), method and mode.

Settings: the clean evaluation once (``method = mode = clean``, ε = 0), then every method × mode ×
ε > 0 (:func:`~changedet.evaluation.adversarial.evaluate_attack`); the iterative white-box methods
(``pgd``, ``apgd-ce``, ``apgd-margin``) once per ``steps`` × ``restarts``, the black-box ``square``
with ``queries`` queries. The report's **sanity table** checks, per checkpoint, mode and ε, that
robust F1 never rises with more steps or restarts of a method, and that the black-box attack does not
beat the best white-box one by more than :data:`NOISE` (if it does, the white-box attacks are weak
or the model masks its gradients, and its robust figures are not to be trusted). With
``smoothing_sigma``, the randomized-smoothing classifier of each checkpoint (:mod:`changedet.pipeline.smoothing`,
as ``changedet detect --smoothing-sigma`` runs it) is evaluated once per σ: its abstentions and its
certified F1 at each radius of ``radii`` (worst case: a pixel not certified at that radius counts as
wrong; :func:`~changedet.pipeline.smoothing.certified_confusion`), with the seconds it took. Optional preparation:
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
from changedet.metrics import ProbabilityHistogram, ValidationResult
from changedet.pipeline.smoothing import Smoothing, abstained_fraction, certified_confusion
from changedet.pipeline.validation import evaluate_scenes

#: checkpoint -> (attack label, mode) -> ε -> report row
Series = dict[str, dict[tuple[str, str], dict[float, dict[str, Any]]]]
#: methods run once per steps × restarts
ITERATIVE = ("pgd", "apgd-ce", "apgd-margin")
#: F1 differences within this are noise in the sanity table (pooled F1 of one evaluation)
NOISE = 0.01
SMOOTHING = "smoothing"


class RobustnessConfig(EvaluationConfig):
    """Adversarial robustness: FGSM/PGD per ε (in 1/255 reflectance) and mode."""

    stage: Literal["robustness"] = "robustness"
    eps: list[float] = Field(default_factory=lambda: [0, 1, 2, 4, 8], description="L-inf budgets in 1/255 reflectance units")
    modes: list[str] = Field(default_factory=lambda: list(MODES), description="t1,t2,both (untargeted), hide, fake")
    methods: list[str] = Field(default_factory=lambda: ["fgsm", "pgd"], description=", ".join(METHODS))
    steps: list[int] = Field(default_factory=lambda: [10], description="steps of pgd/apgd (each value a setting)")
    restarts: list[int] = Field(default_factory=lambda: [1], description="restarts of pgd/apgd, best kept per tile (each value a setting)")
    queries: int = Field(500, ge=1, description="queries of the square attack")
    smoothing_sigma: list[float] = Field(default_factory=list, description="randomized smoothing noise levels (1/255 reflectance) to certify")
    smoothing_samples: int = Field(100, ge=2, le=500, description="noisy passes per tile of the smoothed classifier")
    smoothing_alpha: float = Field(0.001, gt=0, lt=1, description="error of the certificates (Bonferroni over the evaluated pixels)")
    radii: list[float] = Field(default_factory=lambda: [0.5, 1, 2], description="L2 radii (1/255 reflectance) of the certified F1")
    step_size: float | None = Field(None, gt=0, description="PGD step in 1/255 units, 2.5 eps / steps if not given")
    random_start: bool = Field(False, description="PGD/APGD from a random point of the eps-ball")
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

    @field_validator("steps", "restarts", mode="before")
    @classmethod
    def _one_or_many(cls, values: Any) -> Any:
        return [values] if isinstance(values, int) else values  # steps=10 in Python reads as [10]

    @field_validator("steps", "restarts")
    @classmethod
    def _counts(cls, values: list[int]) -> list[int]:
        if not values or any(v < 1 for v in values):
            raise ValueError(f"must be integers >= 1, got {values}")
        return sorted(set(values))


def _attack(cfg: RobustnessConfig, setting: dict[str, Any]) -> Attack:
    step = cfg.step_size / 255 if cfg.step_size else None
    return Attack(setting["method"], setting["eps_255"] / 255, setting["mode"], setting["steps"], step, cfg.random_start,
                  cfg.seed, setting["restarts"], cfg.queries)  # fmt: skip


def _label(row: dict[str, Any]) -> str:
    """``pgd 10×1`` (steps × restarts), ``square 500q``, ``fgsm``."""
    if row["method"] in ITERATIVE:
        return f"{row['method']} {row['steps']}×{row['restarts']}"
    return f"square {row['steps']}q" if row["method"] == "square" else row["method"]


def _series(report: dict[str, Any]) -> Series:
    """checkpoint -> (attack label, mode) -> ε -> row; the clean row stands at ε = 0 of every series."""
    out: Series = {}
    for ckpt in report["checkpoints"]:
        rows = [r for r in report["rows"] if r["checkpoint"] == ckpt]
        clean = next(r for r in rows if r["method"] == CLEAN)
        series: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
        for r in rows:
            if r["method"] not in (CLEAN, SMOOTHING):
                series.setdefault((_label(r), r["mode"]), {0.0: clean})[r["eps_255"]] = r
        out[ckpt] = series
    return out


def sanity_rows(report: dict[str, Any]) -> list[list[str]]:
    """Per checkpoint, mode and ε > 0: the largest F1 rise with more steps and with more restarts
    (same method), the best white-box attack, the square attack, and a verdict."""
    out = []
    for ckpt in report["checkpoints"]:
        rows = [r for r in report["rows"] if r["checkpoint"] == ckpt and r["method"] not in (CLEAN, SMOOTHING) and r.get("f1") is not None]
        for mode, eps in sorted({(r["mode"], r["eps_255"]) for r in rows}):
            here = [r for r in rows if r["mode"] == mode and r["eps_255"] == eps]
            rises = {"steps": [], "restarts": []}
            for a in here:
                for b in here:
                    if a["method"] == b["method"] in ITERATIVE:
                        more_steps = b["steps"] > a["steps"] and b["restarts"] == a["restarts"]
                        more_restarts = b["restarts"] > a["restarts"] and b["steps"] == a["steps"]
                        for key, more in (("steps", more_steps), ("restarts", more_restarts)):
                            if more:
                                rises[key].append(b["f1"] - a["f1"])
            white = [r for r in here if r["method"] != "square"]
            black = [r for r in here if r["method"] == "square"]
            best = min(white, key=lambda r: r["f1"]) if white else None
            verdict = [f"F1 rises with more {k} (+{max(v):.4f})" for k, v in rises.items() if v and max(v) > NOISE]
            if best and black and black[0]["f1"] < best["f1"] - NOISE:
                verdict.append(f"black-box beats white-box by {best['f1'] - black[0]['f1']:.4f}: gradient masking or a weak white-box attack")
            out.append([
                ckpt, mode, f"{eps:g}",
                *(f"{max(v):+.4f}" if v else "–" for v in rises.values()),
                f"{_label(best)}: {best['f1']:.4f}" if best else "–",
                format_metric(black[0]["f1"]) if black else "–",
                "; ".join(verdict) or "ok",
            ])  # fmt: skip
    return out


def _smoothing(cfg: RobustnessConfig, setting: dict[str, Any], threshold: float, scale: float, pixels: int) -> Smoothing:
    return Smoothing(setting["sigma_255"], setting["steps"], cfg.smoothing_alpha, threshold, scale, pixels, cfg.seed)


@register_stage
class Robustness(Stage[RobustnessConfig]):
    """FGSM/PGD attacks per budget and mode, optionally after PGD adversarial fine-tuning."""

    config = RobustnessConfig
    help = "F1 under FGSM/PGD/APGD/Square attacks per budget and mode, with a sanity table (optionally after PGD fine-tuning)"
    plot_name = "f1_vs_eps.png"
    xlabel = "ε (1/255 reflectance)"

    def prepare(self, cfg: RobustnessConfig) -> RobustnessConfig:
        """With ``adv_finetune``: fine-tune the first checkpoint into that file and evaluate it too."""
        if not cfg.adv_finetune:
            return cfg
        finetune_checkpoint(cfg.checkpoints[0], cfg.adv_finetune, cfg.data, steps=cfg.finetune_steps, device=cfg.device)
        return cfg.model_copy(update={"checkpoints": [*cfg.checkpoints, cfg.adv_finetune], "adv_finetune": None})

    def settings(self, cfg: RobustnessConfig) -> list[dict[str, Any]]:
        """The clean setting, then method (× steps × restarts) × mode × ε > 0."""
        cfg.check_known(modes=MODES, methods=METHODS)
        out = [{"method": CLEAN, "mode": CLEAN, "eps_255": 0.0, "steps": 0, "restarts": 0, "sigma_255": 0.0}]
        for m in cfg.methods:
            runs = [(s, r) for s in cfg.steps for r in cfg.restarts] if m in ITERATIVE else [(cfg.queries if m == "square" else 1, 1)]
            out += [{"method": m, "mode": mode, "eps_255": float(e), "steps": s, "restarts": r, "sigma_255": 0.0}
                    for s, r in runs for mode in cfg.modes for e in cfg.eps if e > 0]  # fmt: skip
        out += [{"method": SMOOTHING, "mode": "both", "eps_255": 0.0, "steps": cfg.smoothing_samples, "restarts": 1,
                 "sigma_255": float(sigma)} for sigma in cfg.smoothing_sigma]  # fmt: skip
        return out

    def evaluate(self, cfg: RobustnessConfig, loaded: LoadedModel, scene: ChangeScene, setting: dict[str, Any]) -> ValidationResult:
        """The scene attacked under ``setting`` (clean: as it is)."""
        if setting["method"] == CLEAN:
            return evaluate_scenes(loaded.model, [scene], loaded.normalization, **cfg.prediction())
        if setting["method"] == SMOOTHING:
            smoothing = _smoothing(cfg, setting, loaded.threshold, scene_sensor(scene).scale, scene.shape[0] * scene.shape[1])
            return evaluate_scenes(loaded.model, [scene], loaded.normalization, **cfg.prediction(), blend="owner", smoothing=smoothing)
        attack = _attack(cfg, setting)
        return evaluate_attack(loaded.model, [scene], loaded.normalization, scene_sensor(scene), attack, **cfg.prediction())

    def row_metrics(self, cfg: RobustnessConfig, setting: dict[str, Any], pooled: ProbabilityHistogram) -> dict[str, Any]:
        """Smoothing rows: the smoothed map's metrics (abstentions as errors), abstained share and certified
        F1 per radius (Bonferroni over the pooled pixels)."""
        if setting["method"] != SMOOTHING:
            return {}
        pixels = int(pooled.pos.sum() + pooled.neg.sum())
        smoothing = _smoothing(cfg, setting, 0.5, 1.0, pixels)
        majority = certified_confusion(pooled, smoothing, 0.0).metrics()  # the smoothed map, abstentions as errors
        return {
            **{k: majority[k] for k in ("f1", "iou", "precision", "recall")},
            "pixels": pixels,
            "abstained": abstained_fraction(pooled, smoothing),
            "certified_f1": {f"{r:g}": certified_confusion(pooled, smoothing, r).metrics()["f1"] for r in (0.0, *cfg.radii)},
            "max_radius_255": smoothing.max_radius,
        }

    def markdown(self, report: dict[str, Any]) -> list[str]:
        """F1 per (attack, mode) and ε, one table per checkpoint, then the sanity table."""
        cfg = report["config"]
        eps = sorted({0.0, *(float(e) for e in cfg["eps"])})
        start = ", random start" if cfg["random_start"] else ""
        parts = [f"F1 (pooled) per ε in 1/255 reflectance units; iterative attacks as `method steps×restarts`{start}, "
                 f"square with its query budget.\n"]  # fmt: skip
        for ckpt, series in _series(report).items():
            rows = [[m, mode] + [format_metric(s.get(e, {}).get("f1")) for e in eps] for (m, mode), s in series.items()]
            if rows:
                parts.append(f"## {ckpt}\n\n" + markdown_table(["attack", "mode"] + [f"ε={e:g}" for e in eps], rows) + "\n")
        header = ["checkpoint", "mode", "ε", "F1 rise, more steps", "F1 rise, more restarts", "best white-box", "square", "verdict"]
        sanity = sanity_rows(report)
        if sanity:
            parts.append(f"## Sanity\n\nRises above {NOISE} and a black-box attack stronger than every white-box one "
                         "mark robust figures that cannot be trusted.\n\n" + markdown_table(header, sanity) + "\n")  # fmt: skip
        seconds = report.get("row_seconds") or [float("nan")] * len(report["rows"])
        smoothed = [{**r, "seconds": t} for r, t in zip(report["rows"], seconds) if r["method"] == SMOOTHING]
        if smoothed:
            radii = list(smoothed[0]["certified_f1"])
            rows = [[r["checkpoint"], f"{r['sigma_255']:g}", str(r["steps"]), f"{100 * r['abstained']:.1f} %"]
                    + [format_metric(r["certified_f1"][k]) for k in radii]
                    + [f"{r['max_radius_255']:.3f}", f"{r['seconds'] / max(r['pixels'] / 1e6, 1e-9):.0f}"] for r in smoothed]  # fmt: skip
            header = ["checkpoint", "σ", "samples", "abstained", *(f"certified F1 r={k}" for k in radii), "largest radius", "s / Mpx"]
            parts.append("## Certified (randomized smoothing)\n\nWorst case per radius r (1/255 reflectance, L2 over all bands "
                         "and both dates): a pixel not certified at r counts as wrong; r=0 is the smoothed map with "
                         "abstentions as errors.\n\n" + markdown_table(header, rows) + "\n")  # fmt: skip
        return parts

    def panels(self, report: dict[str, Any]) -> list[Panel]:
        """One panel per checkpoint, one line per attack/mode (FGSM and square dashed)."""
        return [
            Panel(ckpt, [Line(f"{m} {mode}", s, dashed=m.startswith(("fgsm", "square"))) for (m, mode), s in series.items()])
            for ckpt, series in _series(report).items()
        ]
