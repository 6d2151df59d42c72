"""Report of an evaluation run: markdown tables, a PNG plot, ``report.json`` and ``report.html`` (the
same page template as a run's report), written atomically.

Generic over the registered stages (:mod:`changedet.evaluation.stages`): a heading with the scenes and
thresholds, then the stage's markdown sections; the stage's plot (``Stage.plot_name``) draws F1 of its
:class:`~changedet.evaluation.tables.Panel` lines against the stage's x axis, one panel per line group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from changedet.evaluation.stages import get_stage
from changedet.io.html_page import Section, image, page
from changedet.io.writers import OutputStaging, write_text, writing
from changedet.pipeline.postprocess import OTSU_FLOOR

REPORT = "report.json"
MARKDOWN = "report.md"
HTML = "report.html"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables as markdown (also the Prefect artifact)."""
    head = f"scenes: {', '.join(report['scenes'])}; " + "; ".join(
        f"{k}: " + (f"Otsu's threshold per scene (at least {OTSU_FLOOR})" if v.get("threshold_rule") == "otsu" else f"threshold {v['threshold']:.3f}")
        for k, v in report["checkpoints"].items()
    )
    return "\n".join([f"# {report['stage']}\n\n{head}\n", *get_stage(report["stage"]).markdown(report)])


def stage_figure(report: dict[str, Any]):
    """F1 of the stage's panels (e.g. vs ε per mode, vs severity per shift) as a matplotlib Figure (the
    report's plot; notebooks show the same one)."""
    stage = get_stage(report["stage"])
    panels = stage.panels(report)
    from matplotlib.figure import Figure  # here: the CLI parser imports this module for every command

    fig = Figure(figsize=(5 * len(panels), 4))  # no pyplot: the caller's backend and figures are left alone
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for line in panel.lines:
            xs = sorted(line.points)
            ax.plot(xs, [line.points[x]["f1"] or 0.0 for x in xs], marker="o", label=line.name, linestyle="--" if line.dashed else "-")
        ax.set_title(panel.title)
        ax.set_xlabel(stage.xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("F1 (pooled)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """:func:`stage_figure` written as a PNG."""
    fig = stage_figure(report)
    with writing(path):
        fig.savefig(path, dpi=110)
    return Path(path)


def html_report(report: dict[str, Any], text: str, plot_png: bytes) -> str:
    """The report as a self-contained page (:mod:`changedet.io.html_page`, the template of a run's
    ``report.html``): the stage's plot, then its markdown tables as sortable HTML tables."""
    import markdown as markdown_lib

    body = markdown_lib.markdown(text.split("\n", 1)[1], extensions=["tables"]).replace("<table>", '<table class="sortable">')
    sections = [Section("F1 of the settings", image(plot_png, f"{report['stage']} plot", ident="plot")), Section("Tables", body)]
    return page(f"{report['stage']} report", f"scenes: {', '.join(report['scenes'])}", sections)


def report_names(stage: str) -> list[str]:
    """Files a report of ``stage`` consists of (the plot last)."""
    return [REPORT, MARKDOWN, HTML, get_stage(stage).plot_name]


def check_out_dir(stage: str, out_dir: str | Path, overwrite: bool) -> None:
    """Fail before any work (:class:`~changedet.errors.OutputError`) if ``out_dir`` holds a report and not ``overwrite``."""
    OutputStaging.check(out_dir, report_names(stage), overwrite)


def write_report(report: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and the plot into ``out_dir`` (staged, then
    renamed: all or nothing)."""
    names = report_names(report["stage"])
    with OutputStaging(out_dir, names, overwrite) as staging:
        text = markdown(report)
        write_text(staging.path(REPORT), json.dumps({**report, "markdown": text}, indent=2))
        write_text(staging.path(MARKDOWN), text)
        plot(report, staging.path(names[-1]))
        write_text(staging.path(HTML), html_report(report, text, staging.path(names[-1]).read_bytes()))
        staging.commit()
    return {n: Path(out_dir) / n for n in names}
