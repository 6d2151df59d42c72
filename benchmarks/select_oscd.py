"""Benchmark: honest recipe selection for the OSCD model by leave-cities-out cross-validation.

    python benchmarks/select_oscd.py train [--jobs 2]    # every (recipe, seed, fold) model; skips finished ones
    python benchmarks/select_oscd.py predict [--recipes R ...]  # held-out probability maps of every model, per test-time option
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
* A pruned recipe (:data:`PRUNED`) starts each fold model from the same fold's model of its source recipe,
  pruned by ``changedet prune``, and fine-tunes it on the same 8 training cities (:data:`FINE_TUNE_BUDGETS`).
* Every figure is pooled F1 over all 10 cities (pixel counts summed), then mean ± std over seeds.

Results are written per (recipe, seed, fold) under ``benchmarks/results/select_oscd/`` (small JSON of
histograms), so a later session re-reports or continues without retraining; models and maps live in
``benchmarks/_work/select`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from multiprocessing import get_context
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "oscd_bundled.yaml"
WORK = ROOT / "benchmarks" / "_work" / "select"
RESULTS = ROOT / "benchmarks" / "results" / "select_oscd"
FOLDS = 5
BUDGETS = (8, 16, 24)  # epoch budgets of the CV (seed 0 of fc8-perscene also ran to 36 and 48: flat)
_BASE: dict[str, Any] = {
    "data": {"val": [], "patch_size": 64, "samples_per_epoch": 768},
    "batch_size": 16,
    "model": {"name": "fc-siam-diff", "config": {"base_channels": 8, "dropout": 0.0}},
    "optim": {"scheduler": "constant", "ema_decay": 0.998, "warmup_epochs": 1},
    "validation": {"patience": None},
    "progress": False,
    "resume": True,
}
RGB_CONFIG = ROOT / "configs" / "train" / "rgb_bundled.yaml"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``, nested dicts key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_PER_SCENE = {"data": {"normalization": "per-scene"}}
#: self-supervised pretraining of the encoder on the fold's training cities and the 4 unlabelled OSCD
#: cities (never the held-out cities' images); the config's augmentation and heads
_SSL = {"enabled": True, "epochs": 10, "samples_per_epoch": 640, "batch_size": 32, "patch_size": 64}  # ~3 CPU-min a fold
#: recipe name -> (training config, overrides merged over _BASE)
RECIPES: dict[str, tuple[Path, dict[str, Any]]] = {
    "fc8": (CONFIG, {}),
    "fc8-perscene": (CONFIG, _PER_SCENE),
    "rgb-fc8": (RGB_CONFIG, {}),  # LEVIR-CD crops + OSCD B04/B03/B02, per-scene statistics (the config's)
    # candidates from the Siamese literature, each over fc8-perscene (issue 17, item 4)
    "fc8-contrastive": (CONFIG, merge(_PER_SCENE, {"loss": {"name": "bce+dice+0.5*contrastive", "contrastive": {"balanced": True}}})),
    "fc8-triplet": (CONFIG, merge(_PER_SCENE, {"loss": {"name": "bce+dice+0.2*triplet", "triplet": {"mining": "batch-hard"}}})),
    "fc8-simsiam": (CONFIG, merge(_PER_SCENE, {"simsiam": _SSL})),
    "fc8-byol": (CONFIG, merge(_PER_SCENE, {"simsiam": {**_SSL, "method": "byol"}})),
    # without the 60 m atmospheric bands B01, B09, B10: near-constant over a city (B10's std is 1-2 DN), so per-scene
    # standardisation multiplies a perturbation there up to 40x (issue 18, benchmarks/robust_oscd.py)
    "fc8-perscene-10b": (CONFIG, merge(_PER_SCENE, {"data": {"bands": ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]}})),
    "mitb0-perscene": (CONFIG, merge(_PER_SCENE, {"model": {"name": "siam-unet-mit-b0", "config": {}}})),  # the Siamese transformer
    # edge deployment (issue 20, item 5): structured pruning of fc8's fold models, and a narrower model from scratch
    "fc4-perscene": (CONFIG, merge(_PER_SCENE, {"model": {"name": "fc-siam-diff", "config": {"base_channels": 4, "dropout": 0.0}}})),
    "fc8-pruned50": (CONFIG, _PER_SCENE),
    "fc8-pruned75": (CONFIG, _PER_SCENE),
}
#: recipe -> (recipe, epochs, share kept): its fold models are that recipe's fold models after those epochs, pruned
#: (``changedet prune``) and fine-tuned (``init_weights``) on the same training cities for FINE_TUNE_BUDGETS epochs
PRUNED: dict[str, tuple[str, int, float]] = {"fc8-pruned50": ("fc8-perscene", 24, 0.5), "fc8-pruned75": ("fc8-perscene", 24, 0.75)}
FINE_TUNE_BUDGETS = (2, 4, 8)


def budgets_of(recipe: str) -> tuple[int, ...]:
    """The epoch budgets a recipe's models are snapshotted at."""
    return FINE_TUNE_BUDGETS if recipe in PRUNED else BUDGETS


@dataclass(frozen=True)
class Source:
    """One dataset of a recipe: where it is and the bands its scenes are read with (None: all)."""

    index: int
    layout: str
    root: str
    bands: tuple[str, ...] | None


def sources(recipe: str) -> list[Source]:
    """The datasets of a recipe's config."""
    from changedet.train import load_train_config

    cfg = load_train_config(RECIPES[recipe][0])
    return [Source(i, src.layout, str(src.root), tuple(src.bands) if src.bands else None)
            for i, src in enumerate(cfg.data.source_list())]


def labelled_scenes(recipe: str) -> dict[str, tuple[Source, str]]:
    """Every labelled scene of the recipe's datasets: name -> (source, group), sorted by name."""
    from changedet.data import discover_scenes

    out = {}
    for src in sources(recipe):
        out.update({r.name: (src, r.group) for r in discover_scenes(src.root, src.layout, labelled_only=True)})
    return dict(sorted(out.items()))


def cut(groups: list[str]) -> list[list[str]]:
    """``groups`` (sorted) cut into :data:`FOLDS` consecutive parts of near-equal size."""
    size, extra = divmod(len(groups), FOLDS)
    out, start = [], 0
    for i in range(FOLDS):
        end = start + size + (1 if i < extra else 0)
        out.append(groups[start:end])
        start = end
    return out


def fold_of(recipe: str) -> dict[str, int]:
    """Scene -> its fold: each dataset's groups (OSCD cities, LEVIR tiles), sorted, cut into the folds."""
    scenes = labelled_scenes(recipe)
    group_fold = {}
    for src in sources(recipe):
        groups = sorted({g for s, g in scenes.values() if s == src})
        group_fold.update({(src.index, g): k for k, part in enumerate(cut(groups)) for g in part})
    return {name: group_fold[(src.index, group)] for name, (src, group) in scenes.items()}


def describe(recipe: str) -> str:
    """The datasets and groups of a recipe, in words."""
    scenes = labelled_scenes(recipe)
    return "; ".join(f"{src.layout}: {len({g for s, g in scenes.values() if s == src})} groups" for src in sources(recipe))


def data_overrides(recipe: str, held: int | None) -> dict[str, Any]:
    """The ``data`` overrides that train on every group outside fold ``held`` (None: on all of them)."""
    from changedet.train import load_train_config

    scenes, folds_ = labelled_scenes(recipe), fold_of(recipe)
    train = {src.index: sorted({g for n, (s, g) in scenes.items() if s == src and folds_[n] != held}) for src in sources(recipe)}
    cfg = load_train_config(RECIPES[recipe][0])
    if cfg.data.sources:
        return {"sources": [{**src.model_dump(mode="json"), "train": train[i], "val": []} for i, src in enumerate(cfg.data.sources)]}
    return {"train": train[0], "val": []}


def run_dir(recipe: str, seed: int, fold: int | str) -> Path:
    """Where one model of the CV (or a final member, ``fold="all"``) is trained."""
    return WORK / recipe / f"s{seed}" / (f"fold{fold}" if isinstance(fold, int) else str(fold))


def snapshot(out: Path, epochs: int) -> Path:
    """The EMA weights after ``epochs`` epochs."""
    return out / f"e{epochs:02d}.safetensors"


def train_one(job: tuple[str, int, int | str, dict[str, Any], tuple[int, ...]]) -> str:
    """Train one model to every budget of ``budgets`` (resuming), keeping a snapshot at each."""
    recipe, seed, fold, data, budgets = job
    import torch

    torch.set_num_threads(1)
    from changedet.train import train_from_config

    out = run_dir(recipe, seed, fold)
    start = time.perf_counter()
    for epochs in budgets:
        if snapshot(out, epochs).is_file():
            continue
        config, extra = RECIPES[recipe]
        overrides = merge(merge(_BASE, extra), {"data": data, "epochs": epochs, "seed": seed, "output_dir": str(out)})
        overrides["model"] = extra.get("model", _BASE["model"])  # a recipe's model replaces the base's whole
        if recipe in PRUNED:
            overrides["init_weights"] = str(pruned_start(recipe, seed, fold))
        train_from_config(config, overrides=overrides)
        shutil.copyfile(out / "best.safetensors", snapshot(out, epochs).with_suffix(".tmp"))
        os.replace(snapshot(out, epochs).with_suffix(".tmp"), snapshot(out, epochs))
    return f"{recipe} seed {seed} fold {fold}: {(time.perf_counter() - start) / 60:.1f} min"


def pruned_start(recipe: str, seed: int, fold: int | str) -> Path:
    """The pruned checkpoint a PRUNED recipe's model fine-tunes (written on first use)."""
    from changedet.train.pruning import prune_checkpoint

    source, epochs, keep = PRUNED[recipe]
    path = run_dir(recipe, seed, fold) / "pruned.safetensors"
    if not path.is_file():
        src = snapshot(run_dir(source, seed, fold), epochs)
        if not src.is_file():
            raise SystemExit(f"error: {src} missing: train recipe {source} first")
        path.parent.mkdir(parents=True, exist_ok=True)
        prune_checkpoint(str(src), path, keep)
    return path


def train_jobs(recipes: list[str], seeds: list[int]) -> list[tuple]:
    """Unfinished CV trainings, seed-major (a first seed of every recipe finishes first)."""
    jobs = []
    for seed in seeds:
        for recipe in recipes:
            for k in range(FOLDS):
                if not snapshot(run_dir(recipe, seed, k), budgets_of(recipe)[-1]).is_file():
                    jobs.append((recipe, seed, k, data_overrides(recipe, k), budgets_of(recipe)))
    return jobs


def run_jobs(jobs: list[tuple], processes: int) -> None:
    """Run training jobs in ``processes`` fresh single-threaded processes."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        for line in pool.imap_unordered(train_one, jobs):
            print(line, flush=True)


def bundle(recipe: str, epochs: int, seeds: list[int], row: str, rule: str, test_time: dict[str, Any], name: str) -> Path:
    """Write the bundled model ``name``: the final members (one, or an ensemble) of ``recipe`` trained
    on all labelled cities, its threshold rule, test-time options and CV figure (``row`` of
    ``select_oscd.json`` under ``rule``) in the metadata, and its F1 on the sample city (a training city)."""
    import torch
    from safetensors.torch import load_file

    from changedet.checkpoint import read_metadata, save_checkpoint
    from changedet.evaluate import evaluate_mask
    from changedet.pipeline.detect import MASK, DetectParams, detect_changes
    from changedet.weights import BUNDLED

    table = json.loads((RESULTS.parent / "select_oscd.json").read_text())
    cv = table["rows"][row]
    paths = [snapshot(run_dir(recipe, s, "all"), epochs) for s in seeds]
    metas = [read_metadata(p) for p in paths]
    if any(m["normalization"] != metas[0]["normalization"] for m in metas):
        raise SystemExit("members were trained with different normalisation statistics")
    meta = {k: v for k, v in metas[0].items() if k not in ("metrics",)}
    state = {f"members.{i}.{k}": v for i, p in enumerate(paths) for k, v in load_file(str(p)).items()}
    if len(paths) > 1:
        meta["model"], meta["config"] = "ensemble", {"members": [{"model": m["model"], "config": m["config"]} for m in metas]}
    else:
        state = load_file(str(paths[0]))
    values = cv["pooled_f1"][rule]
    threshold = 0.5
    if rule == "crossfit":  # tuned on every city's held-out prediction pooled (the final model is scored on none)
        threshold = float(np.mean(cv["threshold_all"]))
    meta.update(
        threshold=threshold,
        test_time={**test_time, "threshold_rule": "otsu" if rule == "otsu" else "fixed"},
        expected_f1_unseen={
            "pooled_f1_mean": float(np.mean(values)), "pooled_f1_std": float(np.std(values)) if len(values) > 1 else None,
            "seeds": cv["seeds"],
            "protocol": f"leave-groups-out CV, {FOLDS} folds of whole groups ({describe(recipe)}), benchmarks/select_oscd.py",
            "row": row, "threshold_rule": rule, "per_city_mean": (cv.get("per_city_mean") or {}).get(rule),
            **_member_figures(table, row, rule)},
        training={**meta["training"], "members": len(paths), "seeds": seeds, "validation": {"tile": 256, "overlap": 32},
                  "minutes": round(sum(_minutes(p.parent) for p in paths), 1)},
        source_config=f"benchmarks/select_oscd.py recipe {recipe} ({RECIPES[recipe][0].relative_to(ROOT)} + overrides), {epochs} epochs",
    )

    class _State(torch.nn.Module):
        def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return dict(state)

    target = ROOT / "changedet" / "weights" / BUNDLED[name]
    save_checkpoint(target, _State(), meta)
    sample = ROOT / "data" / "sample" / "oscd_bercy"
    out = WORK / f"bundle_{name}"
    bands = None if meta.get("bands") else ("B04", "B03", "B02")  # the RGB model: red, green, blue of the sample
    result = detect_changes(sample / "imgs_1", sample / "imgs_2", out, DetectParams(model=name, bands=bands), overwrite=True)
    m = evaluate_mask(result.path(MASK), sample / "cm" / "bercy-cm.tif")
    meta["sample_scene"] = {"scene": "bercy", "note": "bercy is one of the training cities: a fit figure, not a validation one",
                            **{k: m[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn", "tn")}}
    save_checkpoint(target, _State(), meta)
    print(f"bundled {name}: {target} ({target.stat().st_size / 2**20:.2f} MiB), expected F1 on unseen scenes "
          f"{np.mean(values):.3f} (CV, {len(values)} value(s)); sample-city F1 {m['f1']:.4f} (a training city)")
    return target


def _member_figures(table: dict[str, Any], row: str, rule: str) -> dict[str, Any]:
    """For an ensemble row, the same CV figure of its members alone (mean ± std over seeds)."""
    single = table["rows"].get(row.rsplit("/", 1)[0] + "/plain") if "/ensemble" in row else None
    if single is None:
        return {}
    values = single["pooled_f1"][rule]
    return {"single_member_pooled_f1_mean": float(np.mean(values)), "single_member_pooled_f1_std": float(np.std(values))}


def _minutes(out: Path) -> float:
    history = json.loads((out / "result.json").read_text())["history"]
    return sum(h.get("train_seconds", 0) for h in history) / 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("predict")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p = sub.add_parser("report")
    p = sub.add_parser("final")
    p.add_argument("--recipe", required=True, choices=list(RECIPES))
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("bundle")
    p.add_argument("--recipe", required=True, choices=list(RECIPES))
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--row", required=True, help="the row of select_oscd.json whose CV figure the model carries")
    p.add_argument("--rule", required=True, choices=["0.5", "crossfit", "otsu"])
    p.add_argument("--tta", default="none", choices=["none", "dihedral"])
    p.add_argument("--harmonize", default="none", choices=["none", "histogram"])
    p.add_argument("--min-region", type=int, default=0)
    p.add_argument("--name", default="oscd-s2")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.command == "train":
        run_jobs(train_jobs(args.recipes, args.seeds), args.jobs)
    elif args.command == "final":
        budgets = tuple(b for b in budgets_of(args.recipe) if b < args.epochs) + (args.epochs,)  # snapshots on the way, as in the CV
        run_jobs([(args.recipe, s, "all", data_overrides(args.recipe, None), budgets) for s in args.seeds
                  if not snapshot(run_dir(args.recipe, s, "all"), args.epochs).is_file()], args.jobs)
    elif args.command == "bundle":
        bundle(args.recipe, args.epochs, args.seeds, args.row, args.rule,
               {"tta": args.tta, "harmonize": args.harmonize, "min_region": args.min_region}, args.name)
    else:
        import select_oscd_eval

        select_oscd_eval.predict(args.recipes) if args.command == "predict" else select_oscd_eval.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
