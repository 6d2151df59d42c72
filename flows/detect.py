"""Prefect flows: detect changes for one pair on Dask, and for every new pair of an inbox (scheduled).

Thin orchestration over :mod:`changedet.detect`: fingerprint → plan → predict tile batches (Dask) →
write outputs → markdown artifact. Tile results persist in ``<out>/.changedet-tiles`` so a killed run
resumes with only the missing tiles.

    python flows/detect.py run --t1 A --t2 B --out DIR [--dask-address tcp://host:8786 | --workers 2]
    python flows/detect.py serve --inbox data/inbox --out-root outputs/inbox --cron "*/15 * * * *"
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner
from pydantic import BaseModel, Field

from changedet.detect import (
    OUTPUT_NAMES,
    TILE_STORE_DIR,
    DetectParams,
    RunPlan,
    input_fingerprint,
    missing_batches,
    plan_run,
    predict_batches,
    remove_tile_store,
    write_outputs,
)
from changedet.errors import ChangeDetError
from changedet.inbox import PairJob, discover_pairs, outputs_current
from changedet.io.quicklook import write_quicklook
from changedet.io.writers import OutputStaging
from changedet.predictor import DEFAULT_MODEL


class DetectFlowParams(BaseModel):
    """Parameters of one detect flow run (mirrors ``changedet detect``)."""

    t1: str
    t2: str
    out: str
    name: str | None = Field(None, description="pair name for the flow run and artifact (default: from paths)")
    model: str = DEFAULT_MODEL
    tile: int = Field(256, ge=16)
    overlap: int = Field(32, ge=0)
    threshold: float | None = Field(None, ge=0, le=1)
    crs: str | None = None
    resolution: float | None = Field(None, gt=0)
    bands: list[str] | None = None
    batch_size: int = Field(8, ge=1)
    batches_per_task: int = Field(4, ge=1, description="tile batches per Prefect task (fewer tasks, less scheduling overhead)")
    device: str = "cpu"
    runtime: Literal["torch", "onnx", "onnx-int8"] = "torch"
    threads: int | None = Field(None, ge=1, description="torch threads per Dask worker (Dask sets 1 by default)")
    overwrite: bool = False

    @property
    def pair_name(self) -> str:
        """``name``, or ``<t1 name>-vs-<t2 name>``."""
        return self.name or f"{Path(self.t1).name}-vs-{Path(self.t2).name}"

    def detect_params(self) -> DetectParams:
        """The library parameters."""
        fields = ("model", "tile", "overlap", "threshold", "crs", "resolution", "bands", "batch_size", "device", "runtime", "threads")
        return DetectParams(**{k: getattr(self, k) for k in fields})


def _run_name() -> str:
    params = flow_run.parameters.get("params", {})
    params = params if isinstance(params, DetectFlowParams) else DetectFlowParams.model_validate(params)
    return f"detect-{params.pair_name}"


def _only_io_errors(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups (network/disk), never bad inputs or bugs."""
    return isinstance(state.data, OSError) and not isinstance(state.data, ChangeDetError)


def _paths_key(params: DetectFlowParams) -> str:
    paths = "|".join(str(Path(p).resolve()) for p in (params.t1, params.t2))
    return hashlib.blake2b(paths.encode(), digest_size=8).hexdigest()


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def fingerprint(params: DetectFlowParams) -> str:
    """Content fingerprint of inputs + model + parameters."""
    return input_fingerprint(params.t1, params.t2, params.detect_params())


@task(
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_only_io_errors,
    cache_key_fn=lambda ctx, p: f"changedet-plan-{p['content_key']}-{_paths_key(p['params'])}",
    persist_result=True,
)
def plan(params: DetectFlowParams, content_key: str) -> RunPlan:
    """Align the pair, plan tiles, fit scene statistics.

    Cached on the content fingerprint (new bytes under the same paths are re-planned) plus the input
    paths, because a plan holds the paths it reads from.
    """
    return plan_run(params.t1, params.t2, params.detect_params())


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def predict(run_plan: RunPlan, batches: list[int], store_root: str) -> dict[str, float]:
    """Predict a group of tile batches into the tile store (each batch is stored as soon as it is done)."""
    return predict_batches(run_plan, batches, store_root)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_only_io_errors)
def write(run_plan: RunPlan, store_root: str, params: DetectFlowParams, timings: dict[str, float]) -> dict[str, Any]:
    """Mosaic, COGs, polygons, run.json (atomic), quicklook; then drop the tile store."""
    summary = write_outputs(run_plan, store_root, params.out, params.overwrite, {"t1": params.t1, "t2": params.t2}, timings)
    write_quicklook(Path(params.out) / "change_probability.tif", Path(params.out) / "quicklook.png")
    remove_tile_store(store_root)
    return summary


@task
def report(summary: dict[str, Any], params: DetectFlowParams) -> None:
    """Publish a markdown artifact with inputs, changed area, counts and timings."""
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
        ("thumbnail", f"[quicklook.png]({(Path(params.out) / 'quicklook.png').resolve().as_uri()})"),
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
    key = fingerprint(params)
    if outputs_current(params.out, key):
        print(f"{params.out} is up to date for fingerprint {key}: nothing to do")
        return {"fingerprint": key, "skipped": True}
    OutputStaging.check(params.out, OUTPUT_NAMES, params.overwrite)  # refuse before predicting anything
    run_plan = plan(params, key)
    store_root = str(Path(params.out) / TILE_STORE_DIR)
    todo = missing_batches(run_plan, store_root)
    print(f"{len(run_plan.tiles)} tiles in {len(run_plan.batches)} batches, {len(todo)} batches to predict")
    groups = [todo[i : i + params.batches_per_task] for i in range(0, len(todo), params.batches_per_task)]
    stats = [f.result() for f in predict.map(unmapped(run_plan), groups, unmapped(store_root))]
    timings = {
        "read_s": sum(s["read_s"] for s in stats),
        "model_s": sum(s["model_s"] for s in stats),
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
def process_inbox(inbox: str, out_root: str, model: str = DEFAULT_MODEL, dask_address: str | None = None) -> list[str]:
    """Run :func:`detect_pair` for every pair in ``inbox`` whose outputs are missing or stale."""
    processed = []
    jobs: list[PairJob] = discover_pairs(inbox)
    for job in jobs:
        params = DetectFlowParams(t1=job.t1, t2=job.t2, out=str(Path(out_root) / job.name), name=job.name, model=model, overwrite=True)
        summary = detect_pair.with_options(task_runner=task_runner(dask_address))(params)
        if not summary.get("skipped"):
            processed.append(job.name)
    print(f"{len(jobs)} pairs in {inbox}, processed: {', '.join(processed) or 'none'}")
    return processed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (2 with one ``error: <reason>`` line for bad input)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the detect flow once")
    run.add_argument("--t1", required=True)
    run.add_argument("--t2", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--tile", type=int, default=256)
    run.add_argument("--overlap", type=int, default=32)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--overwrite", action="store_true")
    run.add_argument("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler")
    run.add_argument("--workers", type=int, default=1, help="embedded LocalCluster worker processes")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per worker (default: cores / workers embedded, Dask's 1 on an existing cluster)")
    serve = sub.add_parser("serve", help="serve the inbox flow on a cron schedule (local scheduling)")
    serve.add_argument("--inbox", default="data/inbox")
    serve.add_argument("--out-root", default="outputs/inbox")
    serve.add_argument("--cron", default="*/15 * * * *")
    serve.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if args.command == "run":
        threads = args.threads or (None if args.dask_address else max(1, (os.cpu_count() or 1) // args.workers))
        params = DetectFlowParams(t1=args.t1, t2=args.t2, out=args.out, model=args.model, tile=args.tile,
                                  overlap=args.overlap, batch_size=args.batch_size, overwrite=args.overwrite, threads=threads)
        try:
            detect_pair.with_options(task_runner=task_runner(args.dask_address, args.workers))(params)
        except ChangeDetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        process_inbox.serve(
            name="changedet-inbox",
            cron=args.cron,
            parameters={"inbox": args.inbox, "out_root": args.out_root, "model": args.model},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
