"""Benchmark: short trainings of recipe variants of the bundled OSCD model, on the same validation cities.

    python benchmarks/train_ablation.py                    # train every variant (about 10 CPU-minutes each), then the table
    python benchmarks/train_ablation.py --only no-dropout  # one variant
    python benchmarks/train_ablation.py --report-only      # table of the runs already in benchmarks/_work/ablation

Each variant is ``configs/train/oscd_bundled.yaml`` without its weight average (``optim.ema_decay``)
plus a few overrides, and ``--epochs`` epochs (default 15, the LR schedule shortened to match). Validation is the config's whole held-out cities
(bercy, bordeaux, hongkong); the table prints the best pooled F1, its epoch, the F1 of the last
epoch and minutes. Validation F1 moves by ±0.05 between epochs here: read differences under ~0.05 as noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# benchmarks/ is on sys.path when a script in it runs
from train_oscd import training_minutes

from changedet.train import train_from_config
from changedet.train.config import merge_overrides

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "oscd_bundled.yaml"
WORK = ROOT / "benchmarks" / "_work" / "ablation"

VARIANTS: dict[str, dict[str, Any]] = {
    "dropout 0.2": {"model": {"config": {"base_channels": 16, "dropout": 0.2}}},
    "per-scene stats, dropout 0.2": {
        "model": {"config": {"base_channels": 16, "dropout": 0.2}},
        "data": {"normalization": "per-scene"},
    },
    "no 60 m bands, dropout 0.2": {
        "model": {"config": {"base_channels": 16, "dropout": 0.2}},
        "data": {"bands": ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]},
    },
    "fc-ef, dropout 0.2": {"model": {"name": "fc-ef", "config": {"base_channels": 16, "dropout": 0.2}}},
    "no-dropout": {"model": {"config": {"base_channels": 16, "dropout": 0.0}}},
    "no-dropout, 32 base channels": {"model": {"config": {"base_channels": 32, "dropout": 0.0}}},
    "no-dropout, jitter 0.25": {
        "model": {"config": {"base_channels": 16, "dropout": 0.0}},
        "augment": {"gain": 0.25, "offset": 0.25, "noise": 0.05},
    },
    "no-dropout, SimSiam": {
        "model": {"config": {"base_channels": 16, "dropout": 0.0}},
        "simsiam": {"enabled": True, "epochs": 20, "samples_per_epoch": 1024, "batch_size": 32, "patch_size": 96},
    },
    "no-dropout, EMA 0.998": {"model": {"config": {"base_channels": 16, "dropout": 0.0}}, "optim": {"ema_decay": 0.998}},
}
# every variant starts from the bundled config without the weight average (the recipe before EMA)
BASELINE: dict[str, Any] = {"optim": {"ema_decay": None}}


def folder(name: str) -> Path:
    """The output folder of variant ``name``."""
    return WORK / name.replace(" ", "_").replace(",", "").replace("/", "-")


def run(name: str, epochs: int) -> None:
    overrides = {**merge_overrides(BASELINE, VARIANTS[name]), "epochs": epochs, "output_dir": str(folder(name)), "resume": False, "progress": False}
    start = time.perf_counter()
    train_from_config(CONFIG, overrides=overrides)
    print(f"{name}: {(time.perf_counter() - start) / 60:.1f} min")


def report() -> None:
    print(f"{'variant':>30} {'best F1':>8} {'epoch':>6} {'last F1':>8} {'min':>5}  per city at the best epoch")
    for name in VARIANTS:
        path = folder(name) / "result.json"
        if not path.is_file():
            print(f"{name:>30}  (not run)")
            continue
        result = json.loads(path.read_text())
        history = [h for h in result["history"] if h.get("val")]
        cities = ", ".join(f"{k} {v['f1']:.4f}" for k, v in sorted(result["metrics"]["per_scene"].items()))
        minutes = training_minutes(result["history"])
        print(
            f"{name:>30} {result['best_score']:>8.4f} {result['best_epoch']:>6} {history[-1]['val']['f1']:>8.4f} "
            f"{minutes:>5.1f}  {cities}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        for name in args.only or VARIANTS:
            run(name, args.epochs)
    report()


if __name__ == "__main__":
    main()
