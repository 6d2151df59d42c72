"""Benchmark: honest recipe selection for the OSCD model by leave-cities-out cross-validation.

    python benchmarks/select_oscd.py train [--jobs 2]    # every (recipe, seed, fold) model; skips finished ones
    python benchmarks/select_oscd.py predict             # held-out probability maps of every model, per test-time option
    python benchmarks/select_oscd.py report              # the tables (and benchmarks/results/select_oscd.json)
    python benchmarks/select_oscd.py final --recipe R --epochs E --seeds 0 1 2   # bundled members on all 10 cities

Protocol (no decision looks at the labels of the cities it is scored on):

* The 10 labelled cities, sorted, are cut into 5 folds of 2. Each fold's model trains on the other 8
  cities with a fixed recipe: constant learning rate, an EMA of the weights, no early stopping, no
  validation. Snapshots of the EMA after :data:`BUDGETS` epochs give the epoch budget's curve from one run.
* Every snapshot predicts its 2 held-out cities whole through the inference runner ``changedet detect``
  uses; per-city probability histograms (and, for the last budget, probability maps) are kept.
* Threshold rules: ``0.5`` (fixed); ``crossfit`` — the threshold maximising pooled F1 over the *other*
  folds' held-out predictions (their cities are this fold's training cities; the held-out cities' labels
  are never looked at); ``otsu`` — per scene, label-free, on the scene's own probability histogram.
* Test-time options (TTA over the 8 flips/rotations, histogram matching of t2 onto t1, seed ensembles,
  small-region removal) are scored the same way, each against the plain prediction of the same models.
* Every figure is pooled F1 over all 10 cities (pixel counts summed), then mean ± std over seeds.

Results are written per (recipe, seed, fold) under ``benchmarks/results/select_oscd/`` (small JSON of
histograms), so a later session re-reports or continues without retraining; models and maps live in
``benchmarks/_work/select`` (not committed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "oscd_bundled.yaml"
WORK = ROOT / "benchmarks" / "_work" / "select"
RESULTS = ROOT / "benchmarks" / "results" / "select_oscd"
FOLDS = 5
BUDGETS = (8, 16, 24)
_BASE: dict[str, Any] = {
    "data": {"val": [], "patch_size": 64, "samples_per_epoch": 768},
    "batch_size": 16,
    "model": {"name": "fc-siam-diff", "config": {"base_channels": 8, "dropout": 0.0}},
    "optim": {"scheduler": "constant", "ema_decay": 0.998, "warmup_epochs": 1},
    "validation": {"patience": None},
    "progress": False,
    "resume": True,
}
#: recipe name -> overrides of configs/train/oscd_bundled.yaml (merged over _BASE)
RECIPES: dict[str, dict[str, Any]] = {
    "fc8": {},
    "fc8-perscene": {"data": {"normalization": "per-scene"}},
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``, nested dicts key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def labelled_cities() -> list[str]:
    """The labelled OSCD cities of the config's root, sorted."""
    from changedet.data import discover_scenes
    from changedet.train import load_train_config

    cfg = load_train_config(CONFIG)
    return sorted({s.group for s in discover_scenes(cfg.data.root, cfg.data.layout, labelled_only=True)})


def folds(cities: list[str]) -> list[list[str]]:
    """``cities`` cut into :data:`FOLDS` consecutive groups of near-equal size."""
    size, extra = divmod(len(cities), FOLDS)
    out, start = [], 0
    for i in range(FOLDS):
        end = start + size + (1 if i < extra else 0)
        out.append(cities[start:end])
        start = end
    return out


def run_dir(recipe: str, seed: int, fold: int | str) -> Path:
    """Where one model of the CV (or a final member, ``fold="all"``) is trained."""
    return WORK / recipe / f"s{seed}" / (f"fold{fold}" if isinstance(fold, int) else str(fold))


def snapshot(out: Path, epochs: int) -> Path:
    """The EMA weights after ``epochs`` epochs."""
    return out / f"e{epochs:02d}.safetensors"


def train_one(job: tuple[str, int, int | str, list[str], tuple[int, ...]]) -> str:
    """Train one model to every budget of ``budgets`` (resuming), keeping a snapshot at each."""
    recipe, seed, fold, train_cities, budgets = job
    import torch

    torch.set_num_threads(1)
    from changedet.train import train_from_config

    out = run_dir(recipe, seed, fold)
    start = time.perf_counter()
    for epochs in budgets:
        if snapshot(out, epochs).is_file():
            continue
        overrides = merge(merge(_BASE, RECIPES[recipe]), {
            "data": {"train": train_cities}, "epochs": epochs, "seed": seed, "output_dir": str(out)})
        train_from_config(CONFIG, overrides=overrides)
        shutil.copyfile(out / "best.safetensors", snapshot(out, epochs).with_suffix(".tmp"))
        os.replace(snapshot(out, epochs).with_suffix(".tmp"), snapshot(out, epochs))
    return f"{recipe} seed {seed} fold {fold}: {(time.perf_counter() - start) / 60:.1f} min"


def train_jobs(recipes: list[str], seeds: list[int]) -> list[tuple]:
    """Unfinished CV trainings, seed-major (a first seed of every recipe finishes first)."""
    cities = labelled_cities()
    jobs = []
    for seed in seeds:
        for recipe in recipes:
            for k, held in enumerate(folds(cities)):
                if not snapshot(run_dir(recipe, seed, k), BUDGETS[-1]).is_file():
                    jobs.append((recipe, seed, k, [c for c in cities if c not in held], BUDGETS))
    return jobs


def run_jobs(jobs: list[tuple], processes: int) -> None:
    """Run training jobs in ``processes`` fresh single-threaded processes."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        for line in pool.imap_unordered(train_one, jobs):
            print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("predict")
    p = sub.add_parser("report")
    p = sub.add_parser("final")
    p.add_argument("--recipe", required=True, choices=list(RECIPES))
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.command == "train":
        run_jobs(train_jobs(args.recipes, args.seeds), args.jobs)
    elif args.command == "final":
        cities = labelled_cities()
        run_jobs([(args.recipe, s, "all", cities, (args.epochs,)) for s in args.seeds
                  if not snapshot(run_dir(args.recipe, s, "all"), args.epochs).is_file()], args.jobs)
    else:
        import select_oscd_eval

        (select_oscd_eval.predict if args.command == "predict" else select_oscd_eval.report)()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
