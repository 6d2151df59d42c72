"""Benchmark: pipeline overhead vs raw model forward, and Dask scaling (1 vs 2 workers).

    python benchmarks/flow_overhead.py --size 4096

On one synthetic 4-band scene with a randomly initialised, saved checkpoint (default FC-Siam-diff, the
bundled model's architecture; `--model siam-unet-resnet18` for a heavier one):
  raw      model.predict over every planned tile batch, inputs pre-loaded in memory (no I/O)
  cli      `changedet detect` in-process (reads, tile store, mosaic, COGs, polygons)
  flow xN  cold: `python flows/detect.py run --workers N`, a fresh process that starts an ephemeral
           Prefect server and an embedded Dask LocalCluster of N worker processes
  warm xN  the same flow against an already running Prefect server and Dask cluster (scheduler +
           N worker processes), as a scheduled deployment runs; second run on that cluster (the
           first warms the workers' imports), new output folder so every tile is predicted again
raw, cli and warm runs are interleaved `--repeats` times (this VM's speed drifts by ±20 % over
minutes); each ratio pairs a run with the raw measurement just before it, and the table shows the
median and range. The last warm run's own run.json splits its wall time into model forward, outputs
(mosaic, COGs, polygons) and the rest (process start, imports, Prefect, Dask, reads).
Torch threads: cores / workers everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import os
import socket
import tempfile
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch

from changedet.pipeline.align import PairReader
from changedet.checkpoint import save_checkpoint
from changedet.pipeline.detect import DetectParams, detect_changes, plan_run
from changedet.models import create_model
from changedet.pipeline.predictor import TilePredictor
from changedet.testing.synthetic import write_synthetic_pair

WORK = Path(__file__).parent / "_work"
REPO = Path(__file__).resolve().parents[1]


def raw_forward_seconds(t1: Path, t2: Path, params: DetectParams) -> float:
    plan = plan_run(t1, t2, params)
    predictor = TilePredictor(plan.spec, (plan.pair.t1.count, plan.pair.t2.count))
    predictor.load_scene_fit(plan.scene_fit)
    with PairReader(plan.pair) as reader:
        batches = []
        for batch in plan.batches:
            reads = [reader.read(plan.tiles[i].window) for i in batch]
            batches.append([np.stack([r[k] for r in reads]) for k in range(3)])
    predictor.predict(*batches[0])  # warm-up (allocator, oneDNN kernels), as every other run gets too
    start = time.perf_counter()
    for x1, x2, valid in batches:
        predictor.predict(x1, x2, valid)
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s")


@contextlib.contextmanager
def running_services(workers: int) -> Iterator[tuple[dict[str, str], str]]:
    """A Prefect server and a Dask scheduler with ``workers`` worker processes on loopback."""
    from distributed import Client

    bin_dir = Path(sys.executable).parent
    home = tempfile.mkdtemp(prefix="changedet-bench-prefect-")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    port = _free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "start_new_session": True}
    procs = [subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", api.split(":")[-1].split("/")[0]], **quiet),
             subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], **quiet)]
    address = f"tcp://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{api}/health").status_code == 200, "prefect server")
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nworkers", str(workers),
                                       "--nthreads", "1", "--no-dashboard"], **quiet))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield env, address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def flow_seconds(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one flow run in a fresh process (outputs into a clean ``out``)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    start = time.perf_counter()
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--model", default="fc-siam-diff", help="registry name, randomly initialised")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    scene = WORK / f"flow_{args.size}"
    pair = write_synthetic_pair(scene, args.size, args.size, bands=4, n_changes=100)
    torch.manual_seed(0)
    checkpoint = scene / f"{args.model}.safetensors"
    save_checkpoint(checkpoint, create_model(args.model, in_channels=4), {"model": args.model, "config": {}})
    params = DetectParams(model=str(checkpoint), tile=args.tile, overlap=args.overlap, batch_size=args.batch_size)
    cores = os.cpu_count() or 1

    seconds: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}

    def record(name: str, value: float, raw: float) -> None:
        seconds.setdefault(name, []).append(value)
        ratios.setdefault(name, []).append(value / raw)

    for workers in args.workers:
        cmd = [sys.executable, str(REPO / "flows" / "detect.py"), "run", "--t1", str(pair.t1), "--t2", str(pair.t2),
               "--model", str(checkpoint), "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--batch-size", str(args.batch_size), "--threads", str(max(1, cores // workers))]
        raw = raw_forward_seconds(pair.t1, pair.t2, params)
        record("raw", raw, raw)
        record(f"flow x{workers}", flow_seconds([*cmd, "--workers", str(workers)], scene / f"out_flow{workers}"), raw)
        with running_services(workers) as (env, address):
            warm = [*cmd, "--dask-address", address]
            flow_seconds(warm, scene / f"out_warmup{workers}", env)
            for _ in range(args.repeats):
                raw = raw_forward_seconds(pair.t1, pair.t2, params)
                record("raw", raw, raw)
                start = time.perf_counter()
                detect_changes(pair.t1, pair.t2, scene / "out_cli", params, overwrite=True)
                record("cli", time.perf_counter() - start, raw)
                record(f"warm x{workers}", flow_seconds(warm, scene / f"out_warm{workers}", env), raw)
        last = json.loads((scene / f"out_warm{workers}" / "run.json").read_text())["timings"]
        outputs = last["mosaic_s"] + last["cog_s"] + last["polygons_s"]
        wall = seconds[f"warm x{workers}"][-1]
        print(f"last warm x{workers} run, {wall:.1f} s: model forward {last['model_s']:.1f} s (summed over workers), "
              f"outputs {outputs:.1f} s (mosaic {last['mosaic_s']:.1f}, COGs {last['cog_s']:.1f}, polygons "
              f"{last['polygons_s']:.1f}), predict phase {last['predict_wall_s']:.1f} s from flow start")

    tiles = len(plan_run(pair.t1, pair.t2, params).tiles)
    print(f"\nscene {args.size}x{args.size}x4, {tiles} tiles of {args.tile} px, {args.model}, torch threads cores/workers "
          f"({cores} cores), {args.repeats} interleaved repeats")
    print(f"{'run':>10} {'n':>2} {'median s':>9} {'/ raw':>6} {'range':>11} {'Mpx/s':>6}")
    for name, values in seconds.items():
        median = statistics.median(values)
        r = ratios[name]
        print(f"{name:>10} {len(values):>2} {median:>9.1f} {statistics.median(r):>6.2f} {min(r):>5.2f}-{max(r):<5.2f} "
              f"{args.size**2 / 1e6 / median:>6.2f}")


if __name__ == "__main__":
    main()
