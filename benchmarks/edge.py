"""Benchmark: static int8 against float32 — leave-cities-out CV F1, and size and speed of the bundled model.

    python benchmarks/select_oscd.py train --recipes fc8-perscene --seeds 0 1 2   # the CV's fold models (resumable)
    python benchmarks/edge.py cv [--seeds 0 1 2]    # int8 vs float32 F1 on the held-out cities of every fold model
    python benchmarks/edge.py bundle                # the bundled oscd-s2 int8 graph, calibrated on its 10 training cities
    python benchmarks/edge.py table                 # parameters, MACs, file size, ms per 256² tile, CV F1

``cv``: every fold model of ``select_oscd.py``'s ``fc8-perscene`` recipe (24 epochs) is quantised by
``changedet quantize``, calibrated on its 8 *training* cities, then both graphs detect its 2 held-out
cities through ``changedet detect`` (ONNX Runtime, Otsu threshold: the bundled model's rule). Pooled
F1 over the 10 cities per seed, then mean ± std over seeds, the paired difference, and the share of
pixels where the two masks agree. One JSON per (seed, fold) under ``benchmarks/results/edge/``.

``table``: the bundled ``oscd-s2`` (3-member ensemble) in torch, ONNX Runtime float32 and int8, on 2
threads: batches of 4 tiles of 256², rounds in rotated order, median and range of ms per tile and
of the paired ratio to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
OSCD = ROOT.parent / "shared" / "data" / "oscd"
RESULTS = ROOT / "benchmarks" / "results" / "edge"
RECIPE, EPOCHS = "fc8-perscene", 24
TILE, BATCH, THREADS = 256, 4, 2


def _pair(city: str) -> tuple[str, str]:
    """The two dates of an OSCD city, relative to the repository (what a graph's calibration record keeps)."""
    return tuple(os.path.relpath(OSCD / "images" / city / d, ROOT) for d in ("imgs_1", "imgs_2"))


def _label(city: str) -> Path:
    return OSCD / "labels" / city / "cm" / f"{city}-cm.tif"


def cv_fold(seed: int, fold: int, cities: dict[str, int]) -> dict:
    """Quantise one fold model on its training cities; F1 counts and mask agreement of both runtimes per held-out city."""
    from changedet.evaluate import evaluate_mask
    from changedet.pipeline.detect import MASK, DetectParams, detect_changes
    from changedet.pipeline.quantization import quantize_checkpoint
    from select_oscd import run_dir, snapshot

    checkpoint = snapshot(run_dir(RECIPE, seed, fold), EPOCHS)
    if not checkpoint.is_file():
        raise SystemExit(f"error: {checkpoint} missing: python benchmarks/select_oscd.py train --recipes {RECIPE} --seeds {seed}")
    train = [c for c, k in cities.items() if k != fold]
    start = time.perf_counter()
    graph = quantize_checkpoint(str(checkpoint), [_pair(c) for c in train])
    row = {"seed": seed, "fold": fold, "calibrated_on": train, "calibration_tiles": graph.calibration["tiles"],
           "quantize_s": time.perf_counter() - start, "cities": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for city in (c for c, k in cities.items() if k == fold):
            masks, counts = {}, {}
            for runtime in ("onnx", "onnx-int8"):
                params = DetectParams(model=str(checkpoint), runtime=runtime, threshold_rule="otsu")
                result = detect_changes(*_pair(city), Path(tmp) / runtime / city, params)
                m = evaluate_mask(result.path(MASK), _label(city))
                counts[runtime] = {k: int(m[k]) for k in ("tp", "fp", "fn", "tn")}
                with rasterio.open(result.path(MASK)) as ds:
                    masks[runtime] = ds.read(1)
            agree = float((masks["onnx"] == masks["onnx-int8"]).mean())
            row["cities"][city] = {"counts": counts, "mask_agreement": agree}
    return row


def _f1(c: dict[str, int]) -> float:
    return 2 * c["tp"] / max(1, 2 * c["tp"] + c["fp"] + c["fn"])


def _fmt(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def cv(seeds: list[int]) -> dict:
    """Every (seed, fold) row (computed once, then read back), and the pooled summary."""
    from select_oscd import FOLDS, fold_of

    cities = fold_of(RECIPE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, dict[int, float]] = {"onnx": {}, "onnx-int8": {}}
    agreement = []
    for seed in seeds:
        pooled = {r: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for r in per_seed}
        for fold in range(FOLDS):
            path = RESULTS / f"cv_s{seed}_fold{fold}.json"
            if not path.exists():
                row = cv_fold(seed, fold, cities)
                path.write_text(json.dumps(row, indent=1))
                print(f"seed {seed} fold {fold}: quantised in {row['quantize_s']:.0f} s", flush=True)
            row = json.loads(path.read_text())
            for city in row["cities"].values():
                agreement.append(city["mask_agreement"])
                for r in per_seed:
                    for k in pooled[r]:
                        pooled[r][k] += city["counts"][r][k]
        for r in per_seed:
            per_seed[r][seed] = _f1(pooled[r])
    delta = [per_seed["onnx-int8"][s] - per_seed["onnx"][s] for s in seeds]
    summary = {"recipe": f"{RECIPE}/e{EPOCHS}", "seeds": seeds, "rule": "otsu",
               "pooled_f1": {r: dict(sorted(v.items())) for r, v in per_seed.items()},
               "delta_int8_minus_fp32": delta, "mask_agreement_min": min(agreement), "mask_agreement_mean": statistics.mean(agreement)}  # fmt: skip
    print(f"\nleave-cities-out CV, {RECIPE} e{EPOCHS}, Otsu threshold, seeds {seeds}")
    print(f"{'graph':>10} {'pooled F1 mean ± std':>22}")
    for r in per_seed:
        print(f"{r:>10} {_fmt(list(per_seed[r].values())):>22}")
    print(f"int8 − float32 (paired): {_fmt(delta)}; masks agree on {100 * statistics.mean(agreement):.3f} % of pixels "
          f"(worst city {100 * min(agreement):.3f} %)")
    return summary


def bundle() -> None:
    """Write the bundled oscd-s2 int8 graph, calibrated on the 10 labelled OSCD cities it was trained on."""
    from changedet.checkpoint import read_metadata
    from changedet.pipeline.quantization import quantize_checkpoint
    from changedet.weights import bundled_checkpoint

    cities = read_metadata(bundled_checkpoint("oscd-s2"))["split"]["train"]
    graph = quantize_checkpoint("oscd-s2", [_pair(c) for c in cities])
    print(f"{graph.path}: {graph.path.stat().st_size / 2**20:.2f} MiB, {graph.calibration['tiles']} tiles of {len(cities)} cities")


def _ms_per_tile(run) -> float:
    """Milliseconds per tile of one batch call, after a warm-up call."""
    run()
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000 / BATCH


def table(rounds: int) -> dict:
    """Size and speed of the bundled oscd-s2 in each runtime (and the CV F1 rows when ``cv`` has run)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from changedet.pipeline.detect import DetectParams, plan_run
    from changedet.runtime.quantize import int8_graph_path
    from changedet.runtime.threads import set_threads
    from changedet.weights import bundled_checkpoint

    set_threads(THREADS)
    torch.set_num_threads(THREADS)
    sample = ROOT / "data" / "sample" / "oscd_bercy"
    plans = {r: plan_run(sample / "imgs_1", sample / "imgs_2", DetectParams(model="oscd-s2", runtime=r)) for r in ("torch", "onnx", "onnx-int8")}
    eager = plans["torch"].predictor.model
    rng = np.random.default_rng(0)
    z1, z2 = (rng.standard_normal((BATCH, 13, TILE, TILE)).astype(np.float32) for _ in range(2))
    t1, t2 = torch.from_numpy(z1), torch.from_numpy(z2)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        eager(t1[:1], t2[:1])
    runs = {"torch": lambda: eager(t1, t2), "onnx": lambda: plans["onnx"].predictor.model.run(z1, z2),
            "onnx-int8": lambda: plans["onnx-int8"].predictor.model.run(z1, z2)}  # fmt: skip
    ms: dict[str, list[float]] = {r: [] for r in runs}
    with torch.no_grad():
        for k in range(rounds):  # rotated order: drift of the machine falls on every runtime alike
            order = list(runs)[k % 3 :] + list(runs)[: k % 3]
            for r in order:
                ms[r].append(_ms_per_tile(runs[r]))
    checkpoint = bundled_checkpoint("oscd-s2")
    sizes = {"torch": checkpoint.stat().st_size, "onnx": plans["onnx"].predictor.model.onnx_path.stat().st_size,
             "onnx-int8": int8_graph_path(checkpoint).stat().st_size}  # fmt: skip
    summary_path = RESULTS.parent / "edge.json"
    cv_rows = json.loads(summary_path.read_text()).get("cv") if summary_path.exists() else None
    params = sum(p.numel() for p in eager.parameters())
    macs = flops.get_total_flops() / 2
    print(f"\nbundled oscd-s2 (ensemble of 3 fc-siam-diff, base 8), {THREADS} threads, batches of {BATCH}×{TILE}², {rounds} rounds")
    print(f"{'runtime':>10} {'params':>8} {'GMACs/tile':>10} {'file MiB':>8} {'ms/tile median (range)':>24} {'ratio to onnx':>18} {'CV F1':>16}")
    rows = []
    for r in runs:
        ratios = [a / b for a, b in zip(ms[r], ms["onnx"])]
        f1 = _fmt(list(cv_rows["pooled_f1"][r].values())) if cv_rows and r in cv_rows["pooled_f1"] else "-"
        rows.append({"runtime": r, "params": params, "gmacs_per_tile": macs / 1e9, "file_mib": sizes[r] / 2**20,
                     "ms_per_tile": ms[r], "ratio_to_onnx": ratios})  # fmt: skip
        print(f"{r:>10} {params:>8} {macs / 1e9:>10.2f} {sizes[r] / 2**20:>8.2f} "
              f"{statistics.median(ms[r]):>9.1f} ({min(ms[r]):.1f}–{max(ms[r]):.1f}) "
              f"{statistics.median(ratios):>8.2f} ({min(ratios):.2f}–{max(ratios):.2f}) {f1:>16}")
    print("CV F1: one fold model per seed and fold (the bundled model is their recipe on all 10 cities), `edge.py cv`")
    return {"bundled": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cv").add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    sub.add_parser("bundle")
    sub.add_parser("table").add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if not OSCD.is_dir() and args.command != "table":
        raise SystemExit(f"error: {OSCD} not found (the OSCD data beside the repo, ../shared/data/DATA.md)")
    summary_path = RESULTS.parent / "edge.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if args.command == "cv":
        summary["cv"] = cv(args.seeds)
    elif args.command == "bundle":
        bundle()
        return
    else:
        summary.update(table(args.rounds))
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
