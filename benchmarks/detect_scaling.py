"""Benchmark: `changedet detect` on large synthetic 4-band GeoTIFF pairs.

For each scene size (and model) one fresh process runs the whole detect path; the table reports wall
time, time inside the model call, their ratio, the other stages, peak RSS and throughput.

    python benchmarks/detect_scaling.py --sizes 2048 8192 16384 --models cva
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from changedet.testing.synthetic import SyntheticPair, write_synthetic_pair

WORK = Path(__file__).parent / "_work"


def run_one(pair, out: Path, model: str, tile: int, overlap: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "changedet.cli", "detect", "--t1", str(pair.t1), "--t2", str(pair.t2),
           "--out", str(out), "--model", model, "--tile", str(tile), "--overlap", str(overlap),
           "--batch-size", str(batch), "--overwrite", "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, **summary["timings"], "peak_rss_mb": summary["peak_rss_mb"], "tiles": summary["counts"]["tiles"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--models", nargs="+", default=["cva"])
    parser.add_argument("--model-max-size", type=int, default=8192, help="largest size for non-cva models")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--bands", type=int, default=4)
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        scene = WORK / f"synthetic_{size}"
        start = time.perf_counter()
        pair = SyntheticPair(scene / "t1.tif", scene / "t2.tif", scene / "label.tif")
        if not pair.label.exists():
            pair = write_synthetic_pair(scene, size, size, bands=args.bands, n_changes=200)
        gen_s = time.perf_counter() - start
        for model in args.models:
            if model != "cva" and size > args.model_max_size:
                continue
            r = run_one(pair, scene / f"out_{model}", model, args.tile, args.overlap, args.batch_size)
            rows.append((size, model, r, gen_s))
            print(f"done {size}² {model}: {r['wall_s']:.1f} s", flush=True)

    header = f"{'scene':>12} {'model':>14} {'tiles':>6} {'wall s':>8} {'model s':>8} {'wall/model':>10} {'read s':>7} {'cog s':>7} {'poly s':>7} {'peak RSS MB':>11} {'Mpx/s':>7}"
    print("\n" + header)
    print("-" * len(header))
    for size, model, r, _ in rows:
        print(
            f"{f'{size}x{size}x{args.bands}':>12} {model:>14} {r['tiles']:>6} {r['wall_s']:>8.1f} {r['model_s']:>8.2f} "
            f"{r['wall_s'] / max(r['model_s'], 1e-9):>10.1f} {r['read_s']:>7.1f} {r['cog_s']:>7.1f} {r['polygons_s']:>7.1f} "
            f"{r['peak_rss_mb']:>11.0f} {size * size / 1e6 / r['wall_s']:>7.2f}"
        )


if __name__ == "__main__":
    main()
