"""Benchmark: pipeline overhead vs raw model forward, and Dask scaling (1 vs 2 workers).

    python benchmarks/flow_overhead.py --size 4096

On one synthetic 4-band scene with a (randomly initialised, saved) FC-Siam-diff checkpoint:
  raw      model.predict over every planned tile batch, inputs pre-loaded in memory (no I/O)
  cli      `changedet detect` in-process (reads, tile store, mosaic, COGs, polygons)
  flow xN  the Prefect flow on an embedded Dask LocalCluster with N worker processes
           (includes the ephemeral Prefect server and cluster start-up)
Ratios are to `raw`, all measured in this one run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from changedet.align import PairReader
from changedet.checkpoint import save_checkpoint
from changedet.detect import DetectParams, detect_changes, plan_run
from changedet.models import create_model
from changedet.predictor import TilePredictor
from changedet.synthetic import write_synthetic_pair

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    scene = WORK / f"flow_{args.size}"
    pair = write_synthetic_pair(scene, args.size, args.size, bands=4, n_changes=100)
    torch.manual_seed(0)
    checkpoint = scene / "fc-siam-diff.safetensors"
    save_checkpoint(checkpoint, create_model("fc-siam-diff", in_channels=4), {"model": "fc-siam-diff", "config": {}})
    params = DetectParams(model=str(checkpoint), tile=args.tile, overlap=args.overlap, batch_size=args.batch_size)

    results = {"raw": raw_forward_seconds(pair.t1, pair.t2, params)}
    start = time.perf_counter()
    detect_changes(pair.t1, pair.t2, scene / "out_cli", params, overwrite=True)
    results["cli"] = time.perf_counter() - start
    for workers in (1, 2):
        cmd = [sys.executable, str(REPO / "flows" / "detect.py"), "run", "--t1", str(pair.t1), "--t2", str(pair.t2),
               "--out", str(scene / f"out_flow{workers}"), "--model", str(checkpoint), "--tile", str(args.tile),
               "--overlap", str(args.overlap), "--batch-size", str(args.batch_size), "--overwrite", "--workers", str(workers)]
        (scene / f"out_flow{workers}" / "run.json").unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        results[f"flow x{workers}"] = time.perf_counter() - start

    tiles = len(plan_run(pair.t1, pair.t2, params).tiles)
    print(f"\nscene {args.size}x{args.size}x4, {tiles} tiles of {args.tile} px, fc-siam-diff, torch threads {torch.get_num_threads()}")
    print(f"{'run':>10} {'seconds':>8} {'/ raw':>7} {'Mpx/s':>7}")
    for name, seconds in results.items():
        print(f"{name:>10} {seconds:>8.1f} {seconds / results['raw']:>7.2f} {args.size**2 / 1e6 / seconds:>7.2f}")


if __name__ == "__main__":
    main()
