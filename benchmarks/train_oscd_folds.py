"""Benchmark: leave-cities-out cross-validation of the bundled OSCD recipe over all labelled cities.

    python benchmarks/train_oscd_folds.py                  # train every fold (about 10-15 CPU-minutes each), then the table
    python benchmarks/train_oscd_folds.py --only 2         # one fold (0-based)
    python benchmarks/train_oscd_folds.py --report-only    # table of the folds already in benchmarks/_work/folds

The bundled model is validated on three cities only (bercy, bordeaux, hongkong), and its F1 moves
by ±0.05 from one epoch to the next. Here the same recipe (``--config``, default
``configs/train/oscd_bundled.yaml``, ``--epochs`` epochs, plus :data:`FOLD_OVERRIDES`: an EMA of
the weights and no early stopping, so that the last epoch is a fair model and the best epoch
chosen on the held-out cities adds little) is trained once per fold: the labelled cities in
alphabetical order, cut into ``--folds`` groups; each fold holds one group out, trains on the rest
and validates on the held-out group. Every city is then predicted by a model that never saw it,
and the table pools the pixel counts of all cities:

* ``best``: each fold's best epoch at its tuned threshold (what the bundled model reports: both the
  epoch and the threshold are chosen on the held-out cities, so this is optimistic);
* ``best@0.5``: the same epochs at the fixed threshold 0.5;
* ``last``: each fold's last epoch at its tuned threshold (only the threshold is chosen on them);
* ``last@0.5``: each fold's last epoch at 0.5 — nothing chosen on the held-out cities.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# benchmarks/ is on sys.path when a script in it runs
from train_oscd import training_minutes

from changedet.checkpoint import read_metadata
from changedet.data import discover_scenes
from changedet.metrics import Confusion
from changedet.train import load_train_config, train_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "oscd_bundled.yaml"
WORK = ROOT / "benchmarks" / "_work" / "folds"
FOLD_OVERRIDES: dict[str, Any] = {"optim": {"ema_decay": 0.998}, "validation": {"patience": None}}


def labelled_cities(config: Path) -> list[str]:
    """The labelled cities of the config's OSCD root, sorted."""
    cfg = load_train_config(config)
    return sorted({s.group for s in discover_scenes(cfg.data.root, cfg.data.layout, labelled_only=True)})


def make_folds(cities: list[str], folds: int) -> list[list[str]]:
    """``cities`` (sorted) cut into ``folds`` consecutive groups of near-equal size."""
    size, extra = divmod(len(cities), folds)
    out, start = [], 0
    for i in range(folds):
        end = start + size + (1 if i < extra else 0)
        out.append(cities[start:end])
        start = end
    return out


def run(config: Path, fold: list[str], index: int, epochs: int) -> None:
    overrides = {**FOLD_OVERRIDES, "data": {"val": fold}, "epochs": epochs, "output_dir": str(WORK / f"fold{index}"), "progress": False}
    start = time.perf_counter()
    train_from_config(config, overrides=overrides)
    print(f"fold {index} ({', '.join(fold)}): {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def report(folds: list[list[str]]) -> None:
    print(f"{'fold':>4} {'held-out cities':<24} {'epoch':>5} {'thr':>6} {'F1':>7} {'F1@0.5':>7} {'last':>7} {'last@0.5':>8} {'min':>5}")
    pooled = {"best": Confusion(), "best@0.5": Confusion(), "last": Confusion(), "last@0.5": Confusion()}
    cities: dict[str, dict] = {}
    for index, fold in enumerate(folds):
        out = WORK / f"fold{index}"
        if not (out / "result.json").is_file():
            print(f"{index:>4} {', '.join(fold):<24} (not run)")
            continue
        best, last = read_metadata(out / "best.safetensors"), read_metadata(out / "last.safetensors")
        history = json.loads((out / "result.json").read_text())["history"]
        cities.update(best["metrics"]["per_scene"])
        pooled["best"] += Confusion.from_metrics(best["metrics"]["pooled"])
        pooled["best@0.5"] += Confusion.from_metrics(best["metrics"]["pooled_at_0.5"])
        pooled["last"] += Confusion.from_metrics(last["metrics"]["pooled"])
        pooled["last@0.5"] += Confusion.from_metrics(last["metrics"]["pooled_at_0.5"])
        print(
            f"{index:>4} {', '.join(fold):<24} {best['training']['best_epoch']:>5} {best['threshold']:>6.3f} "
            f"{best['metrics']['pooled']['f1']:>7.4f} {best['metrics']['pooled_at_0.5']['f1']:>7.4f} "
            f"{last['metrics']['pooled']['f1']:>7.4f} {last['metrics']['pooled_at_0.5']['f1']:>8.4f} {training_minutes(history):>5.1f}"
        )
    print("\nper city (its fold's best epoch and threshold): " + ", ".join(f"{k} {v['f1']:.4f}" for k, v in sorted(cities.items())))
    print(f"\n{'all held-out cities pooled':>26} {'precision':>9} {'recall':>7} {'F1':>7} {'IoU':>7} {'kappa':>7}")
    for name, counts in pooled.items():
        m = counts.metrics()
        print(f"{name:>26} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['iou']:>7.4f} {m['kappa']:>7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", type=int, action="append", help="fold index (0-based); repeat for several")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    folds = make_folds(labelled_cities(args.config), args.folds)
    if not args.report_only:
        for index in args.only if args.only is not None else range(len(folds)):
            run(args.config, folds[index], index, args.epochs)
    report(folds)


if __name__ == "__main__":
    main()
