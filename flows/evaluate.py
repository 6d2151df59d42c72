"""Prefect flow: adversarial-robustness or domain-shift evaluation mapped over Dask, with a report.

Thin orchestration over :mod:`changedet.evaluation.runs`: plan the jobs (checkpoint × scene ×
attack/shift × severity) → one task per job on Dask → summary → ``report.json``, ``report.md`` and
the plot written atomically → a markdown artifact with the tables.

    python -m flows.evaluate robustness --data ../shared/data/oscd --out outputs/robustness [--workers 2]
    python -m flows.evaluate domain-shift --data ../shared/data/oscd --out outputs/domain_shift
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, Field

from changedet.evaluation.report import check_out_dir, markdown, write_report
from changedet.evaluation.runs import (
    DomainShiftConfig,
    Job,
    RobustnessConfig,
    plan_jobs,
    run_job,
    summarize,
)
from changedet.errors import ChangeDetError
from changedet.failures import ErrorLineParser, command_main
from flows.detect import FLOW_LOGGERS, _only_io_errors, task_runner


class EvaluateFlowParams(BaseModel):
    """Parameters of one evaluation flow run."""

    config: RobustnessConfig | DomainShiftConfig = Field(discriminator="stage")
    out: str
    overwrite: bool = False
    threads: int | None = Field(None, ge=1, description="torch threads per Dask worker (Dask sets 1 by default)")


@task
def plan(config: RobustnessConfig | DomainShiftConfig) -> list[Job]:
    """Every (checkpoint, scene, setting) job."""
    return plan_jobs(config)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def evaluate(config: RobustnessConfig | DomainShiftConfig, job: Job, threads: int | None) -> dict[str, Any]:
    """One job: probability histograms of one scene under one attack/shift."""
    if threads:
        torch.set_num_threads(threads)
    return run_job(config, job)


@task
def write(config: RobustnessConfig | DomainShiftConfig, results: list[dict[str, Any]], out: str, overwrite: bool) -> dict[str, Any]:
    """Pool scenes into metrics and write the report files (atomic)."""
    report = summarize(config, results)
    write_report(report, out, overwrite)
    return report


@task
def publish(report: dict[str, Any]) -> None:
    """The report's tables as a markdown artifact."""
    create_markdown_artifact(key=f"evaluation-{report['stage']}", markdown=markdown(report), description="changedet evaluation")


@flow(name="evaluate-model", task_runner=DaskTaskRunner(), log_prints=True)
def evaluate_model(params: EvaluateFlowParams) -> dict[str, Any]:
    """Run the configured evaluation stage and write its report into ``params.out``."""
    check_out_dir(params.config.stage, params.out, params.overwrite)
    jobs = plan(params.config)
    print(f"{len(jobs)} {params.config.stage} jobs")
    results = [f.result() for f in evaluate.map(unmapped(params.config), jobs, unmapped(params.threads))]
    report = write(params.config, results, params.out, params.overwrite)
    publish(report)
    print(f"report in {Path(params.out).resolve()}")
    return report


def build_parser() -> ErrorLineParser:
    """The ``python -m flows.evaluate`` argument parser."""
    parser = ErrorLineParser(prog="flows/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["robustness", "domain-shift"])
    parser.add_argument("--data", required=True, help="dataset root, e.g. ../shared/data/oscd")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", action="append", default=None, help="checkpoint (repeatable; default oscd-s2)")
    parser.add_argument("--scenes", nargs="+", default=None, help="default: the first model's validation scenes")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (robustness)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler")
    parser.add_argument("--workers", type=int, default=1, help="embedded LocalCluster worker processes")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ChangeDetError(f"--workers must be >= 1, got {args.workers}")
    common = {"data": args.data, "scenes": args.scenes, "checkpoints": args.model or ["oscd-s2"]}
    config = RobustnessConfig(steps=args.steps, **common) if args.stage == "robustness" else DomainShiftConfig(**common)
    threads = None if args.dask_address else max(1, (os.cpu_count() or 1) // args.workers)
    params = EvaluateFlowParams(config=config, out=args.out, overwrite=args.overwrite, threads=threads)
    evaluate_model.with_options(task_runner=task_runner(args.dask_address, args.workers))(params)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; one ``error: <reason>`` line and the status of :mod:`changedet.failures` on failure."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return command_main(argv, lambda args: _run(build_parser().parse_args(args)), FLOW_LOGGERS)


if __name__ == "__main__":
    sys.exit(main())
