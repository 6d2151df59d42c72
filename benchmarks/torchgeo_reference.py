"""Benchmark: changedet's detect path vs a straightforward torchgeo reference on the same scene and model.

    pip install torchgeo==0.8.1      # the last release for Python 3.11; not a changedet dependency
    python benchmarks/torchgeo_reference.py --size 4096

Reference = what a torchgeo user writes first: ``RasterDataset`` per date intersected into one dataset,
``GridGeoSampler`` (same tile size and stride) through a ``DataLoader``, and manual stitching into
whole-scene numpy accumulators (mean of overlapping tiles), written as one GeoTIFF at the end.
Both sides use the same model, the same per-scene normalisation (changedet's scene fit) and the same
tiles; each runs in a fresh process so peak RSS is its own. Ratios are torchgeo / changedet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from changedet.checkpoint import save_checkpoint
from changedet.pipeline.detect import DetectParams, detect_changes, peak_rss_mb, plan_run
from changedet.models import create_model
from changedet.pipeline.predictor import TilePredictor
from changedet.testing.synthetic import SyntheticPair, write_synthetic_pair

WORK = Path(__file__).parent / "_work"


def run_changedet(pair: SyntheticPair, out: Path, params: DetectParams) -> dict[str, float]:
    """The whole detect path: COGs, polygons, run.json."""
    start = time.perf_counter()
    result = detect_changes(pair.t1, pair.t2, out, params, overwrite=True)
    return {"wall_s": time.perf_counter() - start, "model_s": result.summary["timings"]["model_s"]}


def run_torchgeo(pair: SyntheticPair, out: Path, params: DetectParams) -> dict[str, float]:
    """GridGeoSampler over an intersection of two RasterDatasets, stitched in memory."""
    import rasterio
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    start = time.perf_counter()
    plan = plan_run(pair.t1, pair.t2, params)  # only for the shared normalisation statistics
    predictor = TilePredictor(plan.spec, (plan.pair.t1.count, plan.pair.t2.count))
    predictor.load_scene_fit(plan.scene_fit)

    def date(path: Path) -> RasterDataset:
        cls = type(f"Date_{path.stem}", (RasterDataset,), {"filename_glob": path.name, "is_image": True})
        return cls(paths=str(path.parent))

    dataset = date(pair.t1) & date(pair.t2)
    sampler = GridGeoSampler(dataset, size=params.tile, stride=params.tile - params.overlap)
    loader = DataLoader(dataset, sampler=sampler, batch_size=params.batch_size, collate_fn=stack_samples)
    with rasterio.open(pair.t1) as src:
        profile, inverse, bands = src.profile, ~src.transform, src.count
    prob_sum = np.zeros((profile["height"], profile["width"]), np.float32)
    counts = np.zeros_like(prob_sum)
    for batch in loader:
        image = batch["image"].numpy().astype(np.float32)
        valid = np.ones((image.shape[0], *image.shape[2:]), bool)
        prob, _ = predictor.predict(image[:, :bands], image[:, bands:], valid)
        for p, (x, y, _t) in zip(prob, batch["bounds"]):
            col, row = (round(v) for v in inverse * (x.start, y.stop))
            top, left = max(0, -row), max(0, -col)  # edge chips overhang the scene (top/right)
            p = p[top : prob_sum.shape[0] - row, left : prob_sum.shape[1] - col]
            row, col = row + top, col + left
            h, w = p.shape
            prob_sum[row : row + h, col : col + w] += p
            counts[row : row + h, col : col + w] += 1
    profile.update(count=1, dtype="float32", nodata=-9999.0, compress="deflate")
    with rasterio.open(out / "change_probability.tif", "w", **profile) as dst:
        dst.write(np.where(counts > 0, prob_sum / np.maximum(counts, 1), -9999.0).astype(np.float32), 1)
    return {"wall_s": time.perf_counter() - start, "model_s": predictor.model_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--side", choices=["changedet", "torchgeo"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    scene = WORK / f"torchgeo_{args.size}"
    checkpoint = scene / "fc-siam-diff.safetensors"
    pair = SyntheticPair(scene / "t1.tif", scene / "t2.tif", scene / "label.tif")
    if args.side:
        params = DetectParams(model=str(checkpoint), tile=args.tile, overlap=args.overlap, batch_size=args.batch_size)
        out = scene / f"out_{args.side}"
        out.mkdir(exist_ok=True)
        result = (run_changedet if args.side == "changedet" else run_torchgeo)(pair, out, params)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    if not pair.label.exists():
        pair = write_synthetic_pair(scene, args.size, args.size, bands=4, n_changes=100)
    torch.manual_seed(0)
    save_checkpoint(checkpoint, create_model("fc-siam-diff", in_channels=4), {"model": "fc-siam-diff", "config": {}})
    results = {}
    for side in ("changedet", "torchgeo"):
        cmd = [sys.executable, __file__, "--size", str(args.size), "--tile", str(args.tile), "--overlap",
               str(args.overlap), "--batch-size", str(args.batch_size), "--side", side]
        results[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    print(f"\nscene {args.size}x{args.size}x4, tiles {args.tile} px (overlap {args.overlap}), fc-siam-diff, one run each")
    print(f"{'pipeline':>10} {'wall s':>8} {'model s':>8} {'wall/model':>10} {'peak RSS MB':>11}")
    for side, r in results.items():
        print(f"{side:>10} {r['wall_s']:>8.1f} {r['model_s']:>8.1f} {r['wall_s'] / r['model_s']:>10.2f} {r['peak_rss_mb']:>11.0f}")
    c, t = results["changedet"], results["torchgeo"]
    print(f"torchgeo / changedet: wall {t['wall_s'] / c['wall_s']:.2f}x, peak RSS {t['peak_rss_mb'] / c['peak_rss_mb']:.2f}x")
    print("(changedet also writes mask/difference COGs with overviews, polygons and run.json; the reference one GeoTIFF)")


if __name__ == "__main__":
    main()
