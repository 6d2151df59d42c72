"""Benchmark: static int8 against float32 — leave-cities-out CV F1, and size and speed of the bundled model.

    python benchmarks/select_oscd.py train --recipes fc8-perscene --seeds 0 1 2   # the CV's fold models (resumable)
    python benchmarks/edge.py cv [--seeds 0 1 2]    # int8 vs float32 F1 on the held-out cities of every fold model
    python benchmarks/edge.py bundle                # the bundled oscd-s2 int8 graph, calibrated on its 10 training cities
    python benchmarks/edge.py table                 # parameters, MACs, file size, ms per 256² tile, CV F1

``cv``: every fold model of ``select_oscd.py``'s ``fc8-perscene`` recipe (24 epochs) is quantised by
``changedet quantize``, calibrated on its 8 *training* cities, then both graphs detect its 2 held-out
cities through ``changedet detect`` (ONNX Runtime, Otsu threshold: the bundled model's rule). Pooled
F1 over the 10 cities per seed, then mean ± std over seeds, the paired difference, and the share of
pixels where the two masks agree. One JSON per (seed, fold) under ``benchmarks/results/edge/``; the
rows of the earlier min/max calibration, kept for the comparison, are under ``edge/minmax/``.

``table``: the bundled ``oscd-s2`` (3-member ensemble) in torch, ONNX Runtime float32 and int8, on 2
threads: batches of 4 tiles of 256², rounds in rotated order, median and range of ms per tile and
of the paired ratio to float32. Then the edge candidates (:data:`CANDIDATES`: structured pruning,
a narrower model from scratch), one model each, in ONNX Runtime float32, with
their leave-cities-out CV F1 from ``select_oscd.py``'s table::

    python benchmarks/select_oscd.py train --recipes fc8-pruned50 fc8-pruned75 fc4-perscene
    python benchmarks/select_oscd.py predict && python benchmarks/select_oscd.py report
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
#: the edge candidates of the table: name -> (select_oscd recipe, epochs), each a single model
CANDIDATES = {
    "fc-siam-diff base 8 (a member)": ("fc8-perscene", 24),
    "pruned to 50 % + 8-epoch fine-tune": ("fc8-pruned50", 8),
    "pruned to 75 % + 8-epoch fine-tune": ("fc8-pruned75", 8),
    "fc-siam-diff base 4 from scratch": ("fc4-perscene", 24),
}
PRUNED_CANDIDATE, PRUNED_ROW = "pruned to 50 % + 8-epoch fine-tune", "onnx, pruned 50 %"
WORK = ROOT / "benchmarks" / "_work" / "edge"


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
           "calibration_method": graph.calibration["method"],
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


def _rotated_rounds(runs: dict, rounds: int) -> dict[str, list[float]]:
    """ms per tile of every run, ``rounds`` times, in rotated order (drift of the machine falls on all alike)."""
    import torch

    ms: dict[str, list[float]] = {r: [] for r in runs}
    names = list(runs)
    with torch.no_grad():
        for k in range(rounds):
            for r in names[k % len(names) :] + names[: k % len(names)]:
                ms[r].append(_ms_per_tile(runs[r]))
    return ms


def _macs(model) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 13, TILE, TILE)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(x, x)
    return flops.get_total_flops() / 2


def _cv_f1(row: str) -> str:
    """Pooled F1 (Otsu) mean ± std over seeds of a select_oscd.json row, '-' when it has not run."""
    path = RESULTS.parent / "select_oscd.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    return _fmt(rows[row]["pooled_f1"]["otsu"]) + f" ({len(rows[row]['seeds'])} seeds)" if row in rows else "-"


def _print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'model':>34} {'params':>8} {'GMACs/tile':>10} {'file MiB':>8} {'ms/tile median (range)':>24} {'ratio':>18} {'CV F1':>24}")
    for row in rows:
        ms, ratios = row["ms_per_tile"], row["ratio"]
        print(f"{row['name']:>34} {row['params']:>8} {row['gmacs_per_tile']:>10.2f} {row['file_mib']:>8.2f} "
              f"{statistics.median(ms):>9.1f} ({min(ms):.1f}–{max(ms):.1f}) "
              f"{statistics.median(ratios):>8.2f} ({min(ratios):.2f}–{max(ratios):.2f}) {row['cv_f1']:>24}")


def table(rounds: int) -> dict:
    """Size and speed of the bundled oscd-s2 in each runtime, and of the edge candidates' fold models in
    ONNX Runtime (with their CV F1 rows when ``cv`` / ``select_oscd.py report`` have run)."""
    import torch

    from changedet.pipeline.detect import DetectParams, plan_run
    from changedet.runtime.quantize import int8_graph_path
    from changedet.runtime.threads import set_threads
    from changedet.train.pruning import prune_checkpoint
    from changedet.weights import bundled_checkpoint
    from select_oscd import run_dir, snapshot

    set_threads(THREADS)
    torch.set_num_threads(THREADS)
    sample = ROOT / "data" / "sample" / "oscd_bercy"
    rng = np.random.default_rng(0)
    z1, z2 = (rng.standard_normal((BATCH, 13, TILE, TILE)).astype(np.float32) for _ in range(2))
    t1, t2 = torch.from_numpy(z1), torch.from_numpy(z2)

    def plan(model: str, runtime: str):
        return plan_run(sample / "imgs_1", sample / "imgs_2", DetectParams(model=model, runtime=runtime)).predictor

    pruned = WORK / "oscd-s2-pruned50.safetensors"  # sizes and speed only: fine-tuning changes neither
    pruned.parent.mkdir(parents=True, exist_ok=True)
    prune_checkpoint("oscd-s2", pruned, 0.5)
    plans = {r: plan("oscd-s2", r) for r in ("torch", "onnx", "onnx-int8")}
    plans[PRUNED_ROW] = plan(str(pruned), "onnx")
    eager, eager_pruned = plans["torch"].model, plan(str(pruned), "torch").model
    runs = {"torch": lambda: eager(t1, t2), "onnx": lambda: plans["onnx"].model.run(z1, z2),
            "onnx-int8": lambda: plans["onnx-int8"].model.run(z1, z2), PRUNED_ROW: lambda: plans[PRUNED_ROW].model.run(z1, z2)}  # fmt: skip
    ms = _rotated_rounds(runs, rounds)
    checkpoint = bundled_checkpoint("oscd-s2")
    sizes = {"torch": checkpoint.stat().st_size, "onnx": plans["onnx"].model.onnx_path.stat().st_size,
             "onnx-int8": int8_graph_path(checkpoint).stat().st_size, PRUNED_ROW: plans[PRUNED_ROW].model.onnx_path.stat().st_size}  # fmt: skip
    summary_path = RESULTS.parent / "edge.json"
    cv_rows = json.loads(summary_path.read_text()).get("cv") if summary_path.exists() else None
    cv_f1 = {r: _fmt(list(cv_rows["pooled_f1"][r].values())) if cv_rows and r in cv_rows["pooled_f1"] else "-" for r in runs}
    cv_f1[PRUNED_ROW] = _cv_f1(f"{CANDIDATES[PRUNED_CANDIDATE][0]}/e{CANDIDATES[PRUNED_CANDIDATE][1]}/plain")
    bundled = [{"name": r, "params": sum(p.numel() for p in m.parameters()), "gmacs_per_tile": _macs(m) / 1e9,
                "file_mib": sizes[r] / 2**20, "ms_per_tile": ms[r], "ratio": [a / b for a, b in zip(ms[r], ms["onnx"])], "cv_f1": cv_f1[r]}
               for r, m in ((r, eager_pruned if r == PRUNED_ROW else eager) for r in runs)]  # fmt: skip
    _print_rows(f"bundled oscd-s2 (ensemble of 3 fc-siam-diff, base 8), {THREADS} threads, batches of {BATCH}×{TILE}², "
                f"{rounds} rounds; ratio to onnx; CV F1: `edge.py cv`", bundled)  # fmt: skip
    candidates = {}
    for name, (recipe, epochs) in CANDIDATES.items():
        path = snapshot(run_dir(recipe, 0, 0), epochs)
        if path.is_file():
            candidates[name] = (path, plan(str(path), "onnx"), plan(str(path), "torch").model, f"{recipe}/e{epochs}/plain")
    cand_runs = {n: (lambda p=p: p.model.run(z1, z2)) for n, (_, p, _, _) in candidates.items()}
    cand_ms = _rotated_rounds(cand_runs, rounds) if cand_runs else {}
    first = next(iter(cand_ms), None)
    rows = [{"name": n, "params": sum(p.numel() for p in model.parameters()), "gmacs_per_tile": _macs(model) / 1e9,
             "file_mib": path.stat().st_size / 2**20, "ms_per_tile": cand_ms[n],
             "ratio": [a / b for a, b in zip(cand_ms[n], cand_ms[first])], "cv_f1": _cv_f1(row)}
            for n, (path, _, model, row) in candidates.items()]  # fmt: skip
    if rows:
        _print_rows(f"edge candidates, one model each (seed 0 fold 0 checkpoint), ONNX Runtime fp32; ratio to {first}; "
                    "CV F1: select_oscd.py report, Otsu", rows)  # fmt: skip
    return {"bundled": bundled, "candidates": rows}


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
