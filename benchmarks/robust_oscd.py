"""Benchmark: a defended OSCD model (``oscd-s2-robust``) chosen and measured by leave-cities-out CV.

    python benchmarks/robust_oscd.py finetune [--defences at2] [--seeds 0] [--jobs 2]  # PGD-AT of every fold model
    python benchmarks/robust_oscd.py evaluate [--models fc8-perscene at2/s0] [--jobs 2]  # held-out attacks, per setting
    python benchmarks/robust_oscd.py report                                          # tables + robust_oscd.json
    python benchmarks/robust_oscd.py bundle --defence at2 [--seed 0] [--rule otsu]    # oscd-s2-robust

Protocol (the folds, cities and fold models of ``benchmarks/select_oscd.py``; no decision looks at the
labels of a city it is scored on):

* The undefended models (:data:`SOURCES`) are seed 0 of ``select_oscd.py`` recipes at 24 epochs
  (``select_oscd.py train --recipes R --seeds 0``), each fold's trained on its 8 training cities.
* A defence (:data:`DEFENCES`) PGD-fine-tunes each fold model on the fold's 8 training cities only
  (:func:`changedet.evaluation.defence.finetune_checkpoint`: ε curriculum, clean + adversarial loss; the
  fixed threshold it records is tuned on those cities, clean). Seeds vary the patches and attack starts.
* Every model is attacked on its 2 held-out cities whole, through the runner ``changedet detect`` uses
  (:func:`changedet.evaluation.adversarial.evaluate_attack`), for every setting of :data:`SETTINGS`:
  PGD-10 with a random start at ε ∈ {0.5, 1, 2, 4}/255 on t1, t2 and both dates, PGD-10 with 2
  restarts and APGD on the margin loss (the strongest attacks of ``robustness_trust.py``) at 1 and 2/255.
* Pooled F1 over all 10 cities (each city's counts at its own fold's threshold) per threshold rule:
  ``0.5``, ``train`` (the fixed threshold tuned on the fold's training cities), ``otsu`` (per scene,
  label-free); mean ± std over defence seeds. The robust figure of a budget is the worst over its attacks.

Per (model, fold, setting) the held-out histograms go to ``benchmarks/results/robust_oscd/`` (small JSON,
committed: ``evaluate`` skips what is there); fine-tuned checkpoints to ``benchmarks/_work/robust``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from select_oscd import FOLDS, fold_of, labelled_scenes, run_dir, snapshot  # noqa: E402
from select_oscd_eval import _decode, _encode  # noqa: E402

OSCD = ROOT.parent / "shared" / "data" / "oscd"
WORK = ROOT / "benchmarks" / "_work" / "robust"
RESULTS = ROOT / "benchmarks" / "results" / "robust_oscd"
SEED, EPOCHS = 0, 24  # the fold models: seed and epoch budget of select_oscd.py's recipes
#: the undefended models: select_oscd.py recipes
SOURCES = ("fc8-perscene", "fc8-perscene-10b")
_AT2 = {"attack": {"method": "pgd", "eps": 2 / 255, "mode": "both", "steps": 3, "random_start": True},
        "steps": 400, "warmup_steps": 160, "lr": 5e-4, "patch_size": 64, "batch_size": 16, "clean_weight": 0.5}
#: defence -> (source recipe, finetune_checkpoint keyword arguments with the attack as Attack's fields)
DEFENCES: dict[str, tuple[str, dict[str, Any]]] = {
    "at2": ("fc8-perscene", _AT2),
    "at2-10b": ("fc8-perscene-10b", _AT2),
}
#: evaluation settings (method, mode, ε in 1/255, steps, restarts); the clean one first
SETTINGS: list[tuple[str, str, float, int, int]] = [("clean", "clean", 0.0, 0, 0)]
SETTINGS += [("pgd", "both", e, 10, 1) for e in (1.0, 2.0, 0.5, 4.0)]
SETTINGS += [("pgd", "both", e, 10, 2) for e in (1.0, 2.0)] + [("apgd-margin", "both", e, 10, 1) for e in (1.0, 2.0)]
SETTINGS += [("pgd", mode, e, 10, 1) for mode in ("t1", "t2") for e in (1.0, 2.0, 0.5, 4.0)]
RULES = ("0.5", "train", "otsu")


def setting_key(setting: tuple[str, str, float, int, int]) -> str:
    """``pgd-both-1-10x2`` (clean: ``clean``)."""
    method, mode, eps, steps, restarts = setting
    return "clean" if method == "clean" else f"{method}-{mode}-{eps:g}-{steps}x{restarts}"


def held_out(fold: int) -> list[str]:
    """The held-out cities of ``fold``."""
    return [c for c, k in fold_of(SOURCES[0]).items() if k == fold]


def checkpoint(model: str, fold: int | str) -> Path:
    """A recipe of :data:`SOURCES`: its fold model (``"all"``: trained on every city); ``<defence>/s<seed>``: its fine-tune."""
    if model in SOURCES:
        return snapshot(run_dir(model, SEED, fold), EPOCHS)
    return WORK / model / (f"fold{fold}.safetensors" if isinstance(fold, int) else f"{fold}.safetensors")


def _attack(spec: dict[str, Any], seed: int) -> Any:
    from changedet.evaluation.adversarial import Attack

    return Attack(**spec, seed=seed)


def finetune_one(job: tuple[str, int, int | str]) -> str:
    """PGD-AT of fold ``fold``'s model of the defence's source recipe (``"all"``: the model trained on every
    city, on every city) with defence ``defence``, seed ``seed``."""
    defence, seed, fold = job
    import torch

    torch.set_num_threads(1)
    from changedet.evaluation.defence import finetune_checkpoint

    source, spec = DEFENCES[defence][0], dict(DEFENCES[defence][1])
    attack = _attack(spec.pop("attack"), seed)
    out, src = checkpoint(f"{defence}/s{seed}", fold), checkpoint(source, fold)
    train = [c for c in labelled_scenes(source) if not isinstance(fold, int) or fold_of(source)[c] != fold]
    out.parent.mkdir(parents=True, exist_ok=True)
    block = finetune_checkpoint(str(src), out, OSCD, train, attack, seed=seed, **spec)
    return f"{defence} seed {seed} fold {fold}: {block['seconds'] / 60:.1f} min, final {block['final_loss']}"


def evaluate_one(job: tuple[str, int, tuple[str, str, float, int, int]]) -> str:
    """Held-out histograms of one (model, fold, setting), written to its JSON."""
    model, fold, setting = job
    if _result(model, fold, setting).is_file():  # done meanwhile by another evaluate
        return f"{model} fold {fold} {setting_key(setting)}: done already"
    import torch

    torch.set_num_threads(1)
    from changedet.evaluation.adversarial import evaluate_attack
    from changedet.evaluation.loading import load_model, open_labelled_scenes
    from changedet.evaluation.sensor import scene_sensor
    from changedet.pipeline.validation import evaluate_scenes

    start = time.perf_counter()
    loaded = load_model(str(checkpoint(model, fold)))
    scenes = open_labelled_scenes(OSCD, held_out(fold), loaded.bands)
    method, mode, eps, steps, restarts = setting
    if method == "clean":
        result = evaluate_scenes(loaded.model, scenes, loaded.normalization)
    else:
        attack = _attack({"method": method, "eps": eps / 255, "mode": mode, "steps": steps, "random_start": True,
                          "restarts": restarts}, 0)  # fmt: skip
        result = evaluate_attack(loaded.model, scenes, loaded.normalization, scene_sensor(scenes[0]), attack)
    path = _result(model, fold, setting)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "fold": fold, "setting": setting_key(setting), "threshold": loaded.threshold,
              "seconds": round(time.perf_counter() - start, 1), "hist": {c: _encode(h) for c, h in result.scenes.items()}}  # fmt: skip
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").replace(path)
    return f"{model} fold {fold} {setting_key(setting)}: {record['seconds']:.0f} s"


def _result(model: str, fold: int, setting: tuple[str, str, float, int, int]) -> Path:
    return RESULTS / model.replace("/", "_") / f"fold{fold}_{setting_key(setting)}.json"


def run(function: Any, jobs: list[Any], processes: int) -> None:
    """``function`` over ``jobs`` in fresh single-threaded processes."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with get_context("spawn").Pool(processes, maxtasksperchild=1) as pool:
        for line in pool.imap_unordered(function, jobs):
            print(line, flush=True)


def report() -> dict[str, Any]:
    """Pooled held-out F1 per model kind, setting and rule; robust/clean ratios; robust_oscd.json."""
    from changedet.metrics import Confusion
    from changedet.pipeline.postprocess import scene_threshold

    records: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for path in sorted(RESULTS.glob("*/fold*.json")):
        r = json.loads(path.read_text())
        records.setdefault((r["model"], r["setting"]), {})[r["fold"]] = r
    kinds: dict[str, list[str]] = {}
    for model in sorted({m for m, _ in records}):
        kinds.setdefault(model.split("/")[0], []).append(model)
    table: dict[str, Any] = {"protocol": __doc__.split("Protocol")[1].split("Per (model")[0].strip(), "rows": {}, "worst_both": {}}
    for kind, models in sorted(kinds.items()):
        for setting in map(setting_key, SETTINGS):
            values: dict[str, list[float]] = {rule: [] for rule in RULES}
            for model in models:
                folds = records.get((model, setting), {})
                if len(folds) < FOLDS:
                    continue
                for rule in RULES:
                    total = Confusion()
                    for r in folds.values():
                        fixed = r["threshold"] if rule == "train" else 0.5
                        for hist in map(_decode, r["hist"].values()):
                            total = total + hist.confusion(scene_threshold("otsu" if rule == "otsu" else "fixed", fixed, hist))
                    values[rule].append(total.metrics()["f1"])
            if values[RULES[0]]:
                table["rows"].setdefault(kind, {})[setting] = {"models": len(values[RULES[0]]), "pooled_f1": values}
    for kind, rows in table["rows"].items():
        print(f"\n## {kind} (pooled F1 over the 10 held-out cities; mean ± std over {rows['clean']['models']} model(s))\n")
        print("| setting | " + " | ".join(RULES) + " | ratio to clean (" + " / ".join(RULES) + ") |\n|---|" + "---|" * (len(RULES) + 1))
        clean = rows["clean"]["pooled_f1"]
        for setting, row in rows.items():
            cells = [_fmt(row["pooled_f1"][rule]) for rule in RULES]
            ratios = " / ".join(f"{np.mean(row['pooled_f1'][rule]) / max(np.mean(clean[rule]), 1e-9):.2f}" for rule in RULES)
            print(f"| {setting} | " + " | ".join(cells) + f" | {ratios} |")
        worst = table["worst_both"][kind] = {rule: {} for rule in RULES}
        for method, mode, eps, steps, restarts in SETTINGS:  # the worst attack on both dates per budget
            row = rows.get(setting_key((method, mode, eps, steps, restarts)))
            if mode == "both" and row is not None:
                for rule in RULES:
                    worst[rule][eps] = min(worst[rule].get(eps, 1.0), float(np.mean(row["pooled_f1"][rule])))
        print("\nworst attack on both dates (" + "; ".join(f"{rule}: " + ", ".join(f"ε={e:g} {v:.3f}" for e, v in sorted(w.items()))
                                                       for rule, w in worst.items()) + ")")  # fmt: skip
    out = RESULTS.parent / "robust_oscd.json"
    out.with_suffix(".tmp").write_text(json.dumps(table, indent=1))
    out.with_suffix(".tmp").replace(out)
    return table


def bundle(defence: str, seed: int, rule: str, name: str = "oscd-s2-robust") -> Path:
    """PGD-AT with ``defence`` of its source recipe's model trained on all 10 cities (``select_oscd.py final
    --recipe R --epochs 24 --seeds 0``), on all 10 cities, seed ``seed``; written as the bundled ``name`` with
    its CV figures (clean and robust under ``rule``, and the undefended source's) in the metadata."""
    from changedet.checkpoint import read_metadata, save_checkpoint
    from changedet.evaluate import evaluate_mask
    from changedet.evaluation.loading import load_model
    from changedet.pipeline.detect import MASK, DetectParams, detect_changes
    from changedet.weights import BUNDLED

    source = DEFENCES[defence][0]
    table = report()
    rows = table["rows"]
    if defence not in rows or source not in rows:
        raise SystemExit(f"evaluate {source} and {defence}/s<seed> first")
    if not checkpoint(source, "all").is_file():
        raise SystemExit(f"train the final {source} model first: python benchmarks/select_oscd.py final --recipe {source} --epochs {EPOCHS} --seeds {SEED}")
    tuned = checkpoint(f"{defence}/s{seed}", "all")
    if not tuned.is_file():
        print(finetune_one((defence, seed, "all")), flush=True)
    meta = read_metadata(tuned)
    figures = {setting: {"pooled_f1_mean": float(np.mean(row["pooled_f1"][rule])), "pooled_f1_std": float(np.std(row["pooled_f1"][rule])),
                         "values": row["pooled_f1"][rule]} for setting, row in rows[defence].items()}  # fmt: skip
    clean = figures["clean"]["pooled_f1_mean"]
    worst = {f"{e:g}": v for e, v in sorted(table["worst_both"][defence][rule].items())}
    if rule == "0.5":
        meta["threshold"] = 0.5  # "train" keeps the threshold the fine-tune tuned on the training cities
    meta["adversarial_training"]["threshold_shipped"] = f"{rule} (the rule chosen by the CV over {', '.join(RULES)})"
    meta.update(
        test_time={"tta": "none", "harmonize": "none", "min_region": 0, "threshold_rule": "otsu" if rule == "otsu" else "fixed"},
        expected_f1_unseen={
            "pooled_f1_mean": clean, "pooled_f1_std": figures["clean"]["pooled_f1_std"], "threshold_rule": rule,
            "protocol": f"leave-cities-out CV (5 folds of 2 OSCD cities): each fold's {source} model PGD-fine-tuned on its "
                        "8 training cities, attacked on its 2 held-out cities, benchmarks/robust_oscd.py",
            "seeds": len(figures["clean"]["values"]), "undefended_pooled_f1": float(np.mean(rows[source]["clean"]["pooled_f1"][rule]))},
        robustness_unseen={
            "eps_unit": "1/255 reflectance, L-inf", "threshold_rule": rule, "settings": figures,
            "worst_attack_both_dates": worst, "worst_ratio_to_clean": {e: v / clean for e, v in worst.items()},
            "undefended_worst_attack_both_dates": {f"{e:g}": v for e, v in sorted(table["worst_both"][source][rule].items())}},
    )  # fmt: skip
    model = load_model(str(tuned)).model
    target = ROOT / "changedet" / "weights" / BUNDLED[name]
    save_checkpoint(target, model, meta)
    sample = ROOT / "data" / "sample" / "oscd_bercy"
    result = detect_changes(sample / "imgs_1", sample / "imgs_2", WORK / f"bundle_{name}", DetectParams(model=name), overwrite=True)
    m = evaluate_mask(result.path(MASK), sample / "cm" / "bercy-cm.tif")
    meta["sample_scene"] = {"scene": "bercy", "note": "bercy is one of the training cities: a fit figure, not a validation one",
                            **{k: m[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn", "tn")}}
    save_checkpoint(target, model, meta)
    print(f"bundled {name}: {target} ({target.stat().st_size / 2**20:.2f} MiB); CV clean {clean:.3f}, worst robust "
          + ", ".join(f"ε={e} {v:.3f}" for e, v in worst.items()) + f"; sample-city F1 {m['f1']:.4f} (a training city)")
    return target


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune")
    p.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--jobs", type=int, default=2)
    p = sub.add_parser("evaluate")
    p.add_argument("--models", nargs="+", default=list(SOURCES), help="source recipes and/or <defence>/s<seed>")
    p.add_argument("--settings", nargs="+", default=None, help="setting keys (default: all)")
    p.add_argument("--jobs", type=int, default=2)
    sub.add_parser("report")
    p = sub.add_parser("bundle")
    p.add_argument("--defence", required=True, choices=list(DEFENCES))
    p.add_argument("--seed", type=int, default=0, help="the member of the bundled oscd-s2 to fine-tune (its training seed)")
    p.add_argument("--rule", default="otsu", choices=RULES)
    args = parser.parse_args(argv)
    if args.command == "finetune":
        jobs = [(d, s, k) for s in args.seeds for d in args.defences for k in range(FOLDS)
                if not checkpoint(f"{d}/s{s}", k).is_file() and checkpoint(DEFENCES[d][0], k).is_file()]  # fmt: skip
        run(finetune_one, jobs, args.jobs)
    elif args.command == "evaluate":
        wanted = [s for s in SETTINGS if args.settings is None or setting_key(s) in args.settings]
        jobs = [(m, k, s) for s in wanted for m in args.models for k in range(FOLDS)
                if not _result(m, k, s).is_file() and checkpoint(m, k).is_file()]  # fmt: skip
        run(evaluate_one, jobs, args.jobs)
    elif args.command == "bundle":
        bundle(args.defence, args.seed, args.rule)
    else:
        report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
