"""Prefect flows: detect changes for one pair on Dask, and for every new pair of an inbox (scheduled).

Thin orchestration over :mod:`changedet.pipeline.detect`: fingerprint → plan → predict tile batches (Dask) →
write outputs → markdown artifact. Tile results persist in ``<out>/.changedet-tiles`` so a killed run
resumes with only the missing tiles.

    python flows/detect.py run --t1 A --t2 B --out DIR [--dask-address tcp://host:8786 | --workers 2]
    python flows/detect.py serve --inbox data/inbox --out-root outputs/inbox --cron "*/15 * * * *"
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner
from pydantic import Field

from changedet.pipeline.detect import (
    TILE_STORE_DIR,
    RunPlan,
    input_fingerprint,
    missing_batches,
    plan_layout,
    plan_run,
    predict_batches,
    remove_tile_store,
    write_outputs,
)
from changedet.pipeline.output_table import QUICKLOOK, REPORT_HTML, output_names
from changedet.pipeline.clouds import CLOUD_MASKS
from changedet.pipeline.params import DEFAULT_MODEL, DetectParams
from changedet.errors import ChangeDetError, CloudyError
from changedet.failures import ErrorLineParser, command_main
from changedet.options import add_model_options, given_values
from changedet.inbox import PairJob, discover_pairs, outputs_current
from changedet.io.outdir import OutputLock, check_out_dir
from changedet.io.remote import is_remote
from changedet.io.writers import OutputStaging


FLOW_LOGGERS = ("prefect", "distributed")  # their records lose tracebacks unless --debug


class DetectFlowParams(DetectParams):
    """Parameters of one detect flow run: every :class:`~changedet.pipeline.params.DetectParams` field
    as is, plus the pair, the output folder and orchestration-only fields."""

    t1: str = Field(description="date 1: raster file, folder of per-band files, or glob")
    t2: str = Field(description="date 2: same forms as --t1")
    out: str = Field(description="output folder")
    name: str | None = Field(None, description="pair name for the flow run and artifact (default: from paths)")
    overwrite: bool = Field(False, description="replace existing outputs in --out")
    batches_per_task: int = Field(4, ge=1, description="tile batches per Prefect task (fewer tasks, less scheduling overhead)")

    @property
    def pair_name(self) -> str:
        """``name``, or ``<t1 name>-vs-<t2 name>``."""
        return self.name or f"{Path(self.t1).name}-vs-{Path(self.t2).name}"

    def detect_params(self) -> DetectParams:
        """The library parameters."""
        return DetectParams(**self.model_dump(include=set(DetectParams.model_fields)))


def _run_name() -> str:
    params = flow_run.parameters.get("params", {})
    params = params if isinstance(params, DetectFlowParams) else DetectFlowParams.model_validate(params)
    return f"detect-{params.pair_name}"


PERMANENT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}


def _only_io_errors(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups (network/disk), never bad inputs, bugs, or a full disk / missing permission
    that a retry cannot fix."""
    exc = state.data
    return isinstance(exc, OSError) and not isinstance(exc, ChangeDetError) and exc.errno not in PERMANENT_ERRNOS


def _paths_key(params: DetectFlowParams) -> str:
    paths = "|".join(str(p) if is_remote(str(p)) else str(Path(p).resolve()) for p in (params.t1, params.t2))
    return hashlib.blake2b(paths.encode(), digest_size=8).hexdigest()


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def fingerprint(params: DetectFlowParams) -> str:
    """Content fingerprint of inputs + model + parameters."""
    return input_fingerprint(params.t1, params.t2, params.detect_params())


@task(
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_only_io_errors,
    cache_key_fn=lambda ctx, p: f"changedet-plan-{plan_layout()}-{p['content_key']}-{_paths_key(p['params'])}",
    persist_result=True,
)
def plan(params: DetectFlowParams, content_key: str) -> RunPlan:
    """Align the pair, plan tiles, fit scene statistics.

    Cached on the content fingerprint (new bytes under the same paths are re-planned) plus the input
    paths, because a plan holds the paths it reads from, and the plan's layout (:func:`plan_layout`: a
    plan pickled by another version or layout of the code is never loaded).
    """
    return plan_run(params.t1, params.t2, params.detect_params(), content_key)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def predict(run_plan: RunPlan, batches: list[int], store_root: str) -> dict[str, float]:
    """Predict a group of tile batches into the tile store (each batch is stored as soon as it is done)."""
    return predict_batches(run_plan, batches, store_root)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def write(run_plan: RunPlan, store_root: str, params: DetectFlowParams, timings: dict[str, float]) -> dict[str, Any]:
    """Mosaic, COGs, polygons, quicklook, run.json (atomic); then drop the tile store."""
    summary = write_outputs(run_plan, store_root, params.out, params.overwrite, {"t1": params.t1, "t2": params.t2}, timings)
    remove_tile_store(store_root)
    return summary


@task
def report(summary: dict[str, Any], params: DetectFlowParams) -> None:
    """Publish a markdown artifact with inputs, changed area, counts, timings and links to ``report.html``
    and ``quicklook.png``."""
    counts, changes, t = summary["counts"], summary["changes"], summary["timings"]
    grid = summary["grid"]
    rows = [
        ("t1", f"`{params.t1}`"), ("t2", f"`{params.t2}`"), ("outputs", f"`{Path(params.out).resolve()}`"),
        ("grid", f"{grid['height']} × {grid['width']} px, EPSG:{grid['epsg']}"),
        ("model", f"{summary['model']['name']} (threshold {summary['threshold']:.3f})"),
        ("changed area", f"{changes['changed_area_ha']:.2f} ha in {changes['regions']} regions"),
        ("changed pixels", f"{counts['changed_pixels']} of {counts['valid_pixels']} valid"),
        ("tiles", f"{counts['tiles']} ({counts['skipped_tiles']} without data)"),
        ("time", " · ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items())),
        ("report", f"[{REPORT_HTML}]({(Path(params.out) / REPORT_HTML).resolve().as_uri()}) (self-contained page: imagery, "
                   "change overlay, regions, trust warnings)"),
        ("quicklook", f"[{QUICKLOOK}]({(Path(params.out) / QUICKLOOK).resolve().as_uri()})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    create_markdown_artifact(
        key=f"changes-{params.pair_name}".lower().replace("_", "-").replace(".", "-")[:60],
        markdown=f"# Changes: {params.pair_name}\n\n| | |\n|---|---|\n{table}\n",
        description=f"changedet run {summary['fingerprint']}",
    )


@flow(name="detect-pair", flow_run_name=_run_name, task_runner=DaskTaskRunner(), log_prints=True)
def detect_pair(params: DetectFlowParams) -> dict[str, Any]:
    """Detect changes between ``params.t1`` and ``params.t2`` into ``params.out``."""
    started = time.perf_counter()
    check_out_dir(params.out, (params.t1, params.t2), output_names(params.smoothing_sigma is not None, params.zones is not None))
    key = fingerprint(params)
    if outputs_current(params.out, key):
        print(f"{params.out} is up to date for fingerprint {key}: nothing to do")
        return {"fingerprint": key, "skipped": True}
    with OutputLock(params.out):
        OutputStaging.check(params.out, output_names(params.smoothing_sigma is not None, params.zones is not None), params.overwrite)  # refuse before predicting anything
        run_plan = plan(params, key)
        for line in run_plan.warnings:
            print(f"warning: {line}")
        store_root = str(Path(params.out) / TILE_STORE_DIR)
        todo = missing_batches(run_plan, store_root)
        print(f"{len(run_plan.tiles)} tiles in {len(run_plan.batches)} batches, {len(todo)} batches to predict")
        groups = [todo[i : i + params.batches_per_task] for i in range(0, len(todo), params.batches_per_task)]
        predict_started = time.perf_counter()
        stats = [f.result() for f in predict.map(unmapped(run_plan), groups, unmapped(store_root))]
        timings = {
            "read_s": sum(s["read_s"] for s in stats),
            "model_s": sum(s["model_s"] for s in stats),
            "predict_total_s": time.perf_counter() - predict_started,
            "predict_wall_s": time.perf_counter() - started,
        }
        summary = write(run_plan, store_root, params, timings)
    report(summary, params)
    print(f"outputs in {Path(params.out).resolve()}")
    return summary


def task_runner(dask_address: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    """An existing Dask cluster (``tcp://…``) or an embedded LocalCluster of ``workers`` processes."""
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 1, "threads_per_worker": 1, "processes": True})


@flow(name="detect-inbox", log_prints=True)
def process_inbox(inbox: str, out_root: str, model: str = DEFAULT_MODEL, dask_address: str | None = None,
                  cloud_mask: str = "none", max_cloud: float | None = None, coregister: bool = False) -> list[str]:  # fmt: skip
    """Run :func:`detect_pair` for every pair in ``inbox`` whose outputs are missing or stale. A pair
    with a date cloudier than ``max_cloud`` is skipped, and the log says which date and how cloudy."""
    processed, cloudy = [], []
    jobs: list[PairJob] = discover_pairs(inbox)
    for job in jobs:
        params = DetectFlowParams(t1=job.t1, t2=job.t2, out=str(Path(out_root) / job.name), name=job.name, model=model,
                                  overwrite=True, cloud_mask=cloud_mask, max_cloud=max_cloud, coregister=coregister)  # fmt: skip
        try:
            summary = detect_pair.with_options(task_runner=task_runner(dask_address))(params)
        except CloudyError as exc:
            print(f"skipped {job.name}: {exc}")
            cloudy.append(job.name)
            continue
        if not summary.get("skipped"):
            processed.append(job.name)
    print(f"{len(jobs)} pairs in {inbox}, processed: {', '.join(processed) or 'none'}"
          + (f"; skipped as too cloudy: {', '.join(cloudy)}" if cloudy else ""))  # fmt: skip
    return processed


def build_parser() -> ErrorLineParser:
    """The ``python flows/detect.py`` argument parser."""
    parser = ErrorLineParser(prog="flows/detect.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ErrorLineParser)
    run = sub.add_parser("run", help="run the detect flow once")
    add_model_options(run, DetectFlowParams, exclude={"threads"})
    run.add_argument("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler")
    run.add_argument("--workers", type=int, default=1, help="embedded LocalCluster worker processes")
    run.add_argument("--threads", type=int, default=None,
                     help=DetectFlowParams.model_fields["threads"].description + " (default: cores / workers embedded, Dask's 1 on an existing cluster)")
    serve = sub.add_parser("serve", help="serve the inbox flow on a cron schedule (local scheduling)")
    serve.add_argument("--inbox", default="data/inbox")
    serve.add_argument("--out-root", default="outputs/inbox")
    serve.add_argument("--cron", default="*/15 * * * *")
    serve.add_argument("--model", default=DEFAULT_MODEL)
    serve.add_argument("--cloud-mask", choices=CLOUD_MASKS, default="none", help=DetectFlowParams.model_fields["cloud_mask"].description)
    serve.add_argument("--max-cloud", type=float, default=None, help=DetectFlowParams.model_fields["max_cloud"].description)
    serve.add_argument("--coregister", action="store_true", help=DetectFlowParams.model_fields["coregister"].description)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ChangeDetError(f"--workers must be >= 1, got {args.workers}")
    threads = args.threads or (None if args.dask_address else max(1, (os.cpu_count() or 1) // args.workers))
    if args.out.strip():  # absolute: every writer (GDAL, SQLite) sees the same path, no "~" expansion
        args.out = str(Path(args.out).absolute())
    params = DetectFlowParams(**{**given_values(args, DetectFlowParams), "threads": threads})
    detect_pair.with_options(task_runner=task_runner(args.dask_address, args.workers))(params)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status with one ``error: <reason>`` line on failure
    (statuses of :mod:`changedet.failures`; ``--debug`` shows tracebacks)."""
    logging.getLogger("distributed").setLevel(logging.WARNING)

    def work(args: list[str]) -> int:
        parsed = build_parser().parse_args(args)
        if parsed.command == "run":
            return _run(parsed)
        process_inbox.serve(
            name="changedet-inbox",
            cron=parsed.cron,
            parameters={"inbox": parsed.inbox, "out_root": parsed.out_root, "model": parsed.model, "cloud_mask": parsed.cloud_mask,
                        "max_cloud": parsed.max_cloud, "coregister": parsed.coregister},  # fmt: skip
        )
        return 0

    return command_main(argv, work, FLOW_LOGGERS)


if __name__ == "__main__":
    sys.exit(main())
