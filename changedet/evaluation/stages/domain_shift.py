"""Stage ``domain-shift``: F1 and calibration under radiometric/geometric shifts, with test-time adaptation.

Settings: per adaptation, the unshifted scene once (``shift = clean``, severity 0), then every shift ×
severity > 0 (:func:`~changedet.evaluation.domain_shift.evaluate_shift`). Report: a top-severity table
(F1 / ECE per shift and adaptation), F1 per shift and severity per adaptation, and
``f1_vs_severity.png`` (one panel per checkpoint × adaptation, one line per shift).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from changedet.data.scenes import ChangeScene
from changedet.evaluation.domain_shift import ADAPTATIONS, SHIFTS, evaluate_shift
from changedet.evaluation.loading import LoadedModel
from changedet.evaluation.tables import Line, Panel, format_metric, markdown_table
from changedet.evaluation.stages import CLEAN, EvaluationConfig, Stage, register_stage
from changedet.metrics import ValidationResult

#: checkpoint -> adaptation -> shift -> severity -> report row
Series = dict[str, dict[str, dict[str, dict[float, dict[str, Any]]]]]


class DomainShiftConfig(EvaluationConfig):
    """Domain shift: each shift per severity, without and with test-time adaptation."""

    stage: Literal["domain-shift"] = "domain-shift"
    shifts: list[str] = Field(default_factory=lambda: list(SHIFTS), description="comma-separated registered shifts")
    severities: list[float] = Field(default_factory=lambda: [1, 2, 3, 4, 5], description="severities in [0, 5], 0 = no shift")
    adaptations: list[str] = Field(default_factory=lambda: list(ADAPTATIONS), description="none,adabn,histmatch")
    dates: Literal["t2", "both"] = Field("t2", description="dates the shift applies to")

    @field_validator("severities")
    @classmethod
    def _severities(cls, severities: list[float]) -> list[float]:
        if not severities or any(not 0 <= v <= 5 for v in severities):
            raise ValueError(f"severities must be within [0, 5] (0 = no shift), got {severities}")
        return severities


def _series(report: dict[str, Any]) -> Series:
    """checkpoint -> adaptation -> shift -> severity -> row; the unshifted row stands at severity 0."""
    cfg = report["config"]
    out: Series = {}
    for ckpt in report["checkpoints"]:
        rows = [r for r in report["rows"] if r["checkpoint"] == ckpt]
        per: dict[str, dict[str, dict[float, dict[str, Any]]]] = {}
        for a in cfg["adaptations"]:
            clean = next(r for r in rows if r["shift"] == CLEAN and r["adaptation"] == a)
            per[a] = {s: {0.0: clean} for s in cfg["shifts"]}
        for r in rows:
            if r["shift"] != CLEAN:
                per[r["adaptation"]][r["shift"]][r["severity"]] = r
        out[ckpt] = per
    return out


def _cell(row: dict[str, Any] | None) -> str:
    return f"{format_metric((row or {}).get('f1'))} / {format_metric((row or {}).get('ece'))}"


@register_stage
class DomainShift(Stage[DomainShiftConfig]):
    """Registered shifts per severity, with AdaBN / histogram matching."""

    config = DomainShiftConfig
    help = "F1 and calibration under radiometric/geometric shifts, with AdaBN / histogram matching"
    plot_name = "f1_vs_severity.png"
    xlabel = "severity"

    def settings(self, cfg: DomainShiftConfig) -> list[dict[str, Any]]:
        """The unshifted setting per adaptation, then shift × severity > 0 × adaptation."""
        cfg.check_known(shifts=SHIFTS, adaptations=ADAPTATIONS)
        out = [{"shift": CLEAN, "severity": 0.0, "adaptation": a} for a in cfg.adaptations]
        return out + [
            {"shift": s, "severity": float(v), "adaptation": a} for s in cfg.shifts for v in cfg.severities if v > 0 for a in cfg.adaptations
        ]

    def evaluate(self, cfg: DomainShiftConfig, loaded: LoadedModel, scene: ChangeScene, setting: dict[str, Any]) -> ValidationResult:
        """The scene shifted (clean: as it is) and adapted under ``setting``."""
        shift = None if setting["shift"] == CLEAN else setting["shift"]
        return evaluate_shift(
            loaded.model, [scene], loaded.normalization, shift, setting["severity"], setting["adaptation"], cfg.dates,
            seed=cfg.seed, **cfg.prediction(),
        )  # fmt: skip

    def markdown(self, report: dict[str, Any]) -> list[str]:
        """Per checkpoint: F1 / ECE at the top severity per shift and adaptation, then F1 per severity."""
        cfg = report["config"]
        top = max(cfg["severities"])
        sev = sorted({0.0, *(float(v) for v in cfg["severities"])})
        parts = []
        for ckpt, per in _series(report).items():
            adaptations = list(per)
            rows = [["none (clean)"] + [_cell(per[a][cfg["shifts"][0]][0.0]) for a in adaptations]]
            rows += [[shift] + [_cell(per[a][shift].get(top)) for a in adaptations] for shift in cfg["shifts"]]
            title = f"## {ckpt}: F1 / ECE at severity {top:g} (shift on {cfg['dates']})"
            parts.append(f"{title}\n\n" + markdown_table(["shift"] + adaptations, rows) + "\n")
            for a in adaptations:
                rows = [[shift] + [format_metric(series.get(v, {}).get("f1")) for v in sev] for shift, series in per[a].items()]
                header = ["shift"] + [f"s={v:g}" for v in sev]
                parts.append(f"### {ckpt}, adaptation {a}: F1 per severity\n\n" + markdown_table(header, rows) + "\n")
        return parts

    def panels(self, report: dict[str, Any]) -> list[Panel]:
        """One panel per checkpoint × adaptation, one line per shift."""
        return [
            Panel(f"{ckpt} · {a}", [Line(shift, points) for shift, points in shifts.items()])
            for ckpt, per in _series(report).items()
            for a, shifts in per.items()
        ]
