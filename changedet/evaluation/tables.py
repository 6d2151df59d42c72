"""What a stage's part of a report is made of: plot series and panels, and markdown table cells.

Shared by the stages (:mod:`changedet.evaluation.stages`), which build them, and
:mod:`changedet.evaluation.report`, which lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Line:
    """One plotted series: x -> report row (its ``f1`` is plotted)."""

    name: str
    points: dict[float, dict[str, Any]]
    dashed: bool = False


@dataclass(frozen=True)
class Panel:
    """One plot panel."""

    title: str
    lines: list[Line]


def format_metric(value: float | None) -> str:
    """A metric to 4 decimals, ``–`` when undefined."""
    return "–" if value is None else f"{value:.4f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
