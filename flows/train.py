"""Prefect flow: train a change model from a YAML config (thin wrapper over changedet.train).

    python flows/train.py configs/train/oscd.yaml [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from changedet.failures import ErrorLineParser, command_main
from changedet.train import train_from_config


@task
def train(config: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Run the training; returns the JSON-friendly result."""
    return train_from_config(config, overrides).to_dict()


@task
def report(result: dict[str, Any]) -> None:
    """Markdown artifact with the per-scene and pooled validation metrics."""
    metrics = result.get("metrics") or {}
    rows = [("pooled", metrics.get("pooled", {}))] + sorted((metrics.get("per_scene") or {}).items())
    lines = ["| scene | precision | recall | F1 | IoU | kappa |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in ("precision", "recall", "f1", "iou", "kappa")) + " |")
    create_markdown_artifact(
        key="changedet-training",
        markdown=f"# Training: best epoch {result['best_epoch']}, threshold {result['threshold']:.3f}\n\n"
        f"checkpoint `{result['best_checkpoint']}`\n\n" + "\n".join(lines),
    )


@flow(name="train-change-model", log_prints=True)
def train_flow(config: str, epochs: int | None = None) -> dict[str, Any]:
    """Train from ``config`` (resumes from the last checkpoint when the config says so)."""
    result = train(config, {"epochs": epochs} if epochs else None)
    report(result)
    print(f"best checkpoint: {result['best_checkpoint']}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; one ``error: <reason>`` line and the status of :mod:`changedet.failures` on failure."""
    parser = ErrorLineParser(prog="flows/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--epochs", type=int, default=None)

    def work(args: list[str]) -> int:
        parsed = parser.parse_args(args)
        train_flow(parsed.config, parsed.epochs)
        return 0

    return command_main(argv, work, ("prefect",))


if __name__ == "__main__":
    sys.exit(main())
