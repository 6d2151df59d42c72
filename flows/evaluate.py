"""Prefect flow: any registered evaluation stage (robustness, domain-shift, …) mapped over Dask, with a report.

Thin orchestration over :mod:`changedet.evaluation.runs`: the stage's preparation (e.g. adversarial
fine-tuning) → plan the jobs (checkpoint × scene × setting) → one task per job on Dask → summary →
``report.json``, ``report.md`` and the plot written atomically → a markdown artifact with the tables.
Each stage's options are derived from its config model (:mod:`changedet.evaluation.stages`).

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
from pydantic import BaseModel, Field, SerializeAsAny, field_validator

from changedet.errors import ChangeDetError
from changedet.evaluation.report import check_out_dir, markdown, write_report
from changedet.evaluation.runs import Job, plan_jobs, prepare, run_job, summarize
from changedet.evaluation.stages import EvaluationConfig, add_stage_parsers, parse_config, stage_config
from changedet.failures import ErrorLineParser, command_main
from changedet.options import add_model_options, given_values
from flows.detect import FLOW_LOGGERS, _only_io_errors, task_runner


class EvaluateFlowParams(BaseModel):
    """Parameters of one evaluation flow run."""

    config: SerializeAsAny[EvaluationConfig] = Field(description="a registered stage's config (its ``stage`` names it)")
    out: str = Field(description="report folder (report.json, report.md, plot)")
    overwrite: bool = Field(False, description="replace an existing report in --out")
    threads: int | None = Field(None, ge=1, description="torch threads per Dask worker (Dask sets 1 by default)")

    @field_validator("config", mode="before")
    @classmethod
    def _stage(cls, value: Any) -> EvaluationConfig:
        return parse_config(value)


@task
def prepare_stage(config: EvaluationConfig) -> EvaluationConfig:
    """The stage's preparation (e.g. adversarial fine-tuning); the config its jobs run with."""
    return prepare(config)


@task
def plan(config: EvaluationConfig) -> list[Job]:
    """Every (checkpoint, scene, setting) job."""
    return plan_jobs(config)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def evaluate(config: EvaluationConfig, job: Job, threads: int | None) -> dict[str, Any]:
    """One job: probability histograms of one scene under one setting."""
    if threads:
        torch.set_num_threads(threads)
    return run_job(config, job)


@task
def write(config: EvaluationConfig, results: list[dict[str, Any]], out: str, overwrite: bool) -> dict[str, Any]:
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
    config = prepare_stage(params.config)
    jobs = plan(config)
    print(f"{len(jobs)} {config.stage} jobs")
    results = [f.result() for f in evaluate.map(unmapped(config), jobs, unmapped(params.threads))]
    report = write(config, results, params.out, params.overwrite)
    publish(report)
    print(f"report in {Path(params.out).resolve()}")
    return report


def _add_flow_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, EvaluateFlowParams, include=("out", "overwrite"))
    parser.add_argument("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler")
    parser.add_argument("--workers", type=int, default=1, help="embedded LocalCluster worker processes")


def build_parser() -> ErrorLineParser:
    """The ``python -m flows.evaluate`` argument parser: one subcommand per registered stage."""
    parser = ErrorLineParser(prog="flows/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_parsers(parser.add_subparsers(dest="stage", required=True, parser_class=ErrorLineParser), _add_flow_options)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ChangeDetError(f"--workers must be >= 1, got {args.workers}")
    config = stage_config(args.stage, args)
    threads = None if args.dask_address else max(1, (os.cpu_count() or 1) // args.workers)
    params = EvaluateFlowParams(config=config, threads=threads, **given_values(args, EvaluateFlowParams))
    evaluate_model.with_options(task_runner=task_runner(args.dask_address, args.workers))(params)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; one ``error: <reason>`` line and the status of :mod:`changedet.failures` on failure."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    return command_main(argv, lambda args: _run(build_parser().parse_args(args)), FLOW_LOGGERS)


if __name__ == "__main__":
    sys.exit(main())
