"""Report of an evaluation run: markdown tables, PNG plots and ``report.json``, written atomically.

Robustness: F1 per (checkpoint, method, mode) and ε, and ``f1_vs_eps.png`` (one panel per checkpoint,
one line per method/mode). Domain shift: F1 per shift and severity per adaptation, a top-severity
table (F1 and ECE per adaptation), and ``f1_vs_severity.png`` (one panel per checkpoint ×
adaptation, one line per shift).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from changedet.evaluation.runs import CLEAN
from changedet.io.writers import OutputStaging, write_text, writing

REPORT = "report.json"
MARKDOWN = "report.md"
PLOTS = {"robustness": "f1_vs_eps.png", "domain-shift": "f1_vs_severity.png"}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _robustness_series(report: dict[str, Any]) -> dict[str, dict[tuple[str, str], dict[float, dict]]]:
    """checkpoint -> (method, mode) -> ε -> row; the clean row stands at ε = 0 of every series."""
    cfg = report["config"]
    out: dict[str, dict[tuple[str, str], dict[float, dict]]] = {}
    for ckpt in report["checkpoints"]:
        rows = [r for r in report["rows"] if r["checkpoint"] == ckpt]
        clean = next(r for r in rows if r["method"] == CLEAN)
        series = {(m, mode): {0.0: clean} for m in cfg["methods"] for mode in cfg["modes"]}
        for r in rows:
            if r["method"] != CLEAN:
                series[(r["method"], r["mode"])][r["eps_255"]] = r
        out[ckpt] = series
    return out


def _shift_series(report: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[float, dict]]]]:
    """checkpoint -> adaptation -> shift -> severity -> row; the unshifted row stands at severity 0."""
    cfg = report["config"]
    out: dict[str, dict[str, dict[str, dict[float, dict]]]] = {}
    for ckpt in report["checkpoints"]:
        rows = [r for r in report["rows"] if r["checkpoint"] == ckpt]
        per: dict[str, dict[str, dict[float, dict]]] = {}
        for a in cfg["adaptations"]:
            clean = next(r for r in rows if r["shift"] == CLEAN and r["adaptation"] == a)
            per[a] = {s: {0.0: clean} for s in cfg["shifts"]}
        for r in rows:
            if r["shift"] != CLEAN:
                per[r["adaptation"]][r["shift"]][r["severity"]] = r
        out[ckpt] = per
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report's tables as markdown (also the Prefect artifact)."""
    cfg = report["config"]
    head = f"scenes: {', '.join(report['scenes'])}; " + "; ".join(
        f"{k}: threshold {v['threshold']:.3f}" for k, v in report["checkpoints"].items()
    )
    parts = [f"# {report['stage']}\n\n{head}\n"]
    if report["stage"] == "robustness":
        eps = sorted({0.0, *(float(e) for e in cfg["eps"])})
        steps = f"PGD {cfg['steps']} steps" + (", random start" if cfg["random_start"] else "")
        parts.append(f"F1 (pooled) per ε in 1/255 reflectance units; {steps}.\n")
        for ckpt, series in _robustness_series(report).items():
            rows = [[m, mode] + [_fmt(s.get(e, {}).get("f1")) for e in eps] for (m, mode), s in series.items()]
            parts.append(f"## {ckpt}\n\n" + _table(["method", "mode"] + [f"ε={e:g}" for e in eps], rows) + "\n")
        return "\n".join(parts)
    top = max(cfg["severities"])

    def cell(row: dict | None) -> str:
        return f"{_fmt((row or {}).get('f1'))} / {_fmt((row or {}).get('ece'))}"

    for ckpt, per in _shift_series(report).items():
        adaptations = list(per)
        rows = [["none (clean)"] + [cell(per[a][cfg["shifts"][0]][0.0]) for a in adaptations]]
        rows += [[shift] + [cell(per[a][shift].get(top)) for a in adaptations] for shift in cfg["shifts"]]
        title = f"## {ckpt}: F1 / ECE at severity {top:g} (shift on {cfg['dates']})"
        parts.append(f"{title}\n\n" + _table(["shift"] + adaptations, rows) + "\n")
        sev = sorted({0.0, *(float(v) for v in cfg["severities"])})
        for a in adaptations:
            rows = [[shift] + [_fmt(series.get(v, {}).get("f1")) for v in sev] for shift, series in per[a].items()]
            parts.append(f"### {ckpt}, adaptation {a}: F1 per severity\n\n" + _table(["shift"] + [f"s={v:g}" for v in sev], rows) + "\n")
    return "\n".join(parts)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """F1 vs ε per mode (robustness) or F1 vs severity per shift (domain shift) as a PNG."""
    if report["stage"] == "robustness":
        panels = [(ckpt, {f"{m} {mode}": s for (m, mode), s in series.items()}) for ckpt, series in _robustness_series(report).items()]
        xlabel = "ε (1/255 reflectance)"
    else:
        panels = [(f"{ckpt} · {a}", shifts) for ckpt, per in _shift_series(report).items() for a, shifts in per.items()]
        xlabel = "severity"
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (title, series) in zip(axes[0], panels):
        for name, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [points[x]["f1"] or 0.0 for x in xs], marker="o", label=name, linestyle="--" if name.startswith("fgsm") else "-")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("F1 (pooled)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        with writing(path):
            fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def report_names(stage: str) -> list[str]:
    """Files a report of ``stage`` consists of."""
    return [REPORT, MARKDOWN, PLOTS[stage]]


def check_out_dir(stage: str, out_dir: str | Path, overwrite: bool) -> None:
    """Fail before any work (:class:`~changedet.errors.OutputError`) if ``out_dir`` holds a report and not ``overwrite``."""
    OutputStaging.check(out_dir, report_names(stage), overwrite)


def write_report(report: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plot into ``out_dir`` (staged, then renamed: all or nothing)."""
    names = report_names(report["stage"])
    with OutputStaging(out_dir, names, overwrite) as staging:
        text = markdown(report)
        write_text(staging.path(REPORT), json.dumps({**report, "markdown": text}, indent=2))
        write_text(staging.path(MARKDOWN), text)
        plot(report, staging.path(PLOTS[report["stage"]]))
        staging.commit()
    return {n: Path(out_dir) / n for n in names}
