"""Held-out predictions and tables of ``benchmarks/select_oscd.py`` (see its docstring for the protocol).

``predict``: every trained snapshot predicts its fold's held-out cities through the scene runner of
``changedet detect`` (:class:`~changedet.pipeline.predictor.TilePredictor`), for each test-time
option; per-city probability histograms go to ``benchmarks/results/select_oscd/`` (committed), the
probability maps of the last budget to ``benchmarks/_work/select`` (for ensembles and region removal).
``report``: pooled F1 over all cities per recipe, budget, option and threshold rule; mean ± std over seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from select_oscd import BUDGETS, FOLDS, RECIPES, RESULTS, WORK, Source, fold_of, labelled_scenes, run_dir, snapshot

from changedet.metrics import Confusion, ProbabilityHistogram
from changedet.pipeline.postprocess import drop_small_regions, scene_threshold

#: test-time option -> (tta, harmonize); scored at the last budget only
OPTIONS = {"plain": (False, False), "tta": (True, False), "harmonize": (False, True)}
RULES = ("0.5", "crossfit", "otsu")
MIN_REGIONS = (0, 4, 16)


def _maps_dir(recipe: str, seed: int, fold: int) -> Path:
    return run_dir(recipe, seed, fold) / "maps"


def _map(recipe: str, seed: int, fold: int, option: str, city: str) -> Path:
    return _maps_dir(recipe, seed, fold) / f"e{BUDGETS[-1]}_{option}_{city}.npz"


def predict_scene(checkpoint: Path, source: Source, name: str, tta: bool, harmonize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probability map, valid mask and 0/1 label of held-out scene ``name`` predicted whole by ``checkpoint``."""
    from changedet.data import discover_scenes
    from changedet.data.scenes import ChangeScene
    from changedet.metrics import IGNORE
    from changedet.normalization import Normalization
    from changedet.pipeline.predictor import TilePredictor, resolve_model
    from changedet.pipeline.tiling import Tiling

    spec = resolve_model(str(checkpoint))
    record = next(r for r in discover_scenes(source.root, source.layout, labelled_only=True) if r.name == name)
    b1, b2 = spec.bands or (source.bands, source.bands)
    scene = ChangeScene.open(record, b1, b2).cache()
    predictor = TilePredictor(spec, scene.channels, "cpu", "torch", tta)
    if spec.per_scene_normalization:
        predictor.set_normalization(Normalization.of_pair(scene.read, *scene.shape))
    if harmonize:
        x1, x2, valid = scene.pixels()
        predictor.harmonize(x1[:, valid].T, x2[:, valid].T)
    prob = np.zeros(scene.shape, np.float32)
    valid_map = np.zeros(scene.shape, bool)

    def sink(row: int, p: np.ndarray, _d: np.ndarray, v: np.ndarray) -> None:
        prob[row : row + p.shape[0]] = np.nan_to_num(p)
        valid_map[row : row + p.shape[0]] = v

    predictor.runner(Tiling(), 8).run(scene.read, scene.shape, sink)
    label = scene.label
    scene.close()
    return prob, valid_map & (label != IGNORE), label == 1


def histogram(prob: np.ndarray, valid: np.ndarray, label: np.ndarray) -> ProbabilityHistogram:
    """Per-city probability histogram of the valid, labelled pixels."""
    hist = ProbabilityHistogram()
    hist.update(prob, label, valid)
    return hist


def _encode(hist: ProbabilityHistogram) -> dict[str, list[int]]:
    return {"pos": hist.pos.tolist(), "neg": hist.neg.tolist()}


def _decode(value: dict[str, list[int]]) -> ProbabilityHistogram:
    return ProbabilityHistogram(len(value["pos"]), np.asarray(value["pos"], np.int64), np.asarray(value["neg"], np.int64))


def predict(recipes: list[str]) -> None:
    """Histograms (and last-budget maps) of every finished snapshot of ``recipes`` not yet predicted."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        if not (WORK / recipe).is_dir():
            continue
        scenes, folds_ = labelled_scenes(recipe), fold_of(recipe)
        for seed_dir in sorted((WORK / recipe).glob("s*")):
            seed = int(seed_dir.name[1:])
            for k in range(FOLDS):
                held = [n for n in scenes if folds_[n] == k]
                path = RESULTS / f"{recipe}_s{seed}_fold{k}.json"
                done = json.loads(path.read_text()) if path.is_file() else {"recipe": recipe, "seed": seed, "fold": k, "held_out": held, "hist": {}}
                start = time.perf_counter()
                budgets = sorted({int(p.stem[1:]) for p in run_dir(recipe, seed, k).glob("e*.safetensors")} | set(BUDGETS))
                for epochs in budgets:
                    ckpt = snapshot(run_dir(recipe, seed, k), epochs)
                    options = OPTIONS if epochs == BUDGETS[-1] else {"plain": OPTIONS["plain"]}
                    for option, (tta, harmonize) in options.items():
                        key = f"e{epochs}/{option}"
                        maps_missing = epochs == BUDGETS[-1] and not all(_map(recipe, seed, k, option, c).is_file() for c in held)
                        if not ckpt.is_file() or (key in done["hist"] and not maps_missing):
                            continue
                        done["hist"][key] = {}
                        for city in held:
                            prob, valid, label = predict_scene(ckpt, scenes[city][0], city, tta, harmonize)
                            done["hist"][key][city] = _encode(histogram(prob, valid, label))
                            if epochs == BUDGETS[-1]:
                                _maps_dir(recipe, seed, k).mkdir(exist_ok=True)
                                np.savez_compressed(_map(recipe, seed, k, option, city),
                                                    prob=prob.astype(np.float16), valid=valid, label=label)
                        path.write_text(json.dumps(done))
                print(f"{recipe} seed {seed} fold {k}: {time.perf_counter() - start:.0f} s", flush=True)


def pooled_f1(hists: dict[str, ProbabilityHistogram], rule: str, folds_: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Pooled F1 (and per city) of held-out histograms under a threshold rule (see select_oscd's docstring)."""
    total, per_city = Confusion(), {}
    for city, hist in hists.items():
        if rule == "crossfit":
            others = [h for c, h in hists.items() if folds_[c] != folds_[city]]
            threshold = sum(others[1:], others[0]).best_threshold()
        else:
            threshold = scene_threshold("otsu" if rule == "otsu" else "fixed", 0.5, hist)
        conf = hist.confusion(threshold)
        per_city[city] = conf.metrics()["f1"]
        total = total + conf
    return total.metrics()["f1"], per_city


def _all_cities_threshold(hists: dict[str, ProbabilityHistogram]) -> float:
    """The F1-optimal threshold of every city's held-out prediction pooled: a final model's fixed threshold."""
    values = list(hists.values())
    return sum(values[1:], values[0]).best_threshold()


def _load() -> dict[tuple[str, int], dict[str, dict[str, ProbabilityHistogram]]]:
    """(recipe, seed) -> key -> scene -> histogram, for keys with every scene of the recipe predicted."""
    runs: dict[tuple[str, int], dict[str, dict[str, ProbabilityHistogram]]] = {}
    for path in sorted(RESULTS.glob("*_fold*.json")):
        data = json.loads(path.read_text())
        run = runs.setdefault((data["recipe"], data["seed"]), {})
        for key, cities in data["hist"].items():
            run.setdefault(key, {}).update({c: _decode(h) for c, h in cities.items()})
    n = {recipe: len(labelled_scenes(recipe)) for recipe in {r for r, _ in runs}}
    return {rs: {k: v for k, v in keys.items() if len(v) == n[rs[0]]} for rs, keys in runs.items()}


def _ensemble_and_regions(recipe: str, seeds: list[int], folds_: dict[str, int]) -> dict[str, Any]:
    """Seed-ensemble histograms (mean probability of the seeds' maps) and region removal, from the maps."""
    cities, out = sorted(folds_), {}
    maps = {s: {c: np.load(_map(recipe, s, folds_[c], "plain", c)) for c in cities} for s in seeds}
    ens = {c: np.mean([maps[s][c]["prob"].astype(np.float32) for s in seeds], axis=0) for c in cities}
    first = maps[seeds[0]]
    out["ensemble"] = {c: histogram(ens[c], first[c]["valid"], first[c]["label"]) for c in cities}
    for min_pixels in MIN_REGIONS[1:]:
        for rule in ("0.5", "otsu"):
            per_seed = []
            for s in seeds:
                total = Confusion()
                for c in cities:
                    m = maps[s][c]
                    prob, valid, label = m["prob"].astype(np.float32), m["valid"], m["label"]
                    t = scene_threshold("otsu" if rule == "otsu" else "fixed", 0.5, histogram(prob, valid, label))
                    mask, _ = drop_small_regions((prob >= t) & valid, min_pixels)
                    total = total + Confusion().update(mask, label, valid)
                per_seed.append(total.metrics()["f1"])
            out[f"minregion{min_pixels}@{rule}"] = per_seed
    return out


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def report() -> dict[str, Any]:
    """Print the CV tables; write ``benchmarks/results/select_oscd.json``."""
    runs = _load()
    table: dict[str, Any] = {"folds": {}, "rows": {}}
    print(f"{'recipe':<14} {'budget/option':<16} {'seeds':>5} " + " ".join(f"{r:>15}" for r in RULES))
    for recipe in RECIPES:
        seeds = sorted(s for r, s in runs if r == recipe)
        if not seeds:
            continue
        folds_ = fold_of(recipe)
        cities = sorted(folds_)
        table["folds"][recipe] = folds_
        keys = sorted({k for s in seeds for k in runs[(recipe, s)]})
        for key in keys:
            have = [s for s in seeds if key in runs[(recipe, s)]]
            row = {rule: [pooled_f1(runs[(recipe, s)][key], rule, folds_)[0] for s in have] for rule in RULES}
            cities_f1 = {rule: {c: float(np.mean([pooled_f1(runs[(recipe, s)][key], rule, folds_)[1][c] for s in have]))
                                for c in cities} for rule in RULES}
            table["rows"][f"{recipe}/{key}"] = {"seeds": have, "pooled_f1": row, "per_city_mean": cities_f1,
                                                "threshold_all": [_all_cities_threshold(runs[(recipe, s)][key]) for s in have]}
            print(f"{recipe:<14} {key:<16} {len(have):>5} " + " ".join(f"{_fmt(row[r]):>15}" for r in RULES))
        last = f"e{BUDGETS[-1]}/plain"
        full = [s for s in seeds if last in runs[(recipe, s)]
                and all(_map(recipe, s, k, "plain", c).is_file() for c, k in folds_.items())]
        if len(full) >= 2:
            extra = _ensemble_and_regions(recipe, full, folds_)
            ens_hists = extra.pop("ensemble")
            ens = {rule: [pooled_f1(ens_hists, rule, folds_)[0]] for rule in RULES}
            table["rows"][f"{recipe}/e{BUDGETS[-1]}/ensemble{len(full)}"] = {
                "seeds": full, "pooled_f1": ens, "threshold_all": [_all_cities_threshold(ens_hists)],
                "per_city_mean": {rule: pooled_f1(ens_hists, rule, folds_)[1] for rule in RULES}}
            print(f"{recipe:<14} {'ensemble of ' + str(len(full)):<16} {1:>5} " + " ".join(f"{ens[r][0]:>15.3f}" for r in RULES))
            for name, values in extra.items():
                table["rows"][f"{recipe}/e{BUDGETS[-1]}/{name}"] = {"seeds": full, "pooled_f1": values}
                print(f"{recipe:<14} {name:<16} {len(values):>5} {_fmt(values):>15}")
    _keep_earlier_rows(table)
    path = RESULTS.parent / "select_oscd.json"
    path.with_suffix(".tmp").write_text(json.dumps(table, indent=1))
    path.with_suffix(".tmp").replace(path)
    return table


def _keep_earlier_rows(table: dict[str, Any]) -> None:
    """Rows of the earlier table that need maps not on this machine (ensembles, region removal) are kept."""
    path = RESULTS.parent / "select_oscd.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "folds": {}}
    for key, row in earlier["rows"].items():
        if key not in table["rows"] and key.split("/", 1)[0] in RECIPES:
            table["rows"][key] = row
            print(f"{key:<31} kept from the earlier table (its maps are not here): "
                  + " ".join(f"{r} {_fmt(v)}" for r, v in row["pooled_f1"].items()) if isinstance(row["pooled_f1"], dict)
                  else f"{key:<31} kept from the earlier table: {_fmt(row['pooled_f1'])}")
    for recipe, folds_ in earlier.get("folds", {}).items():
        table["folds"].setdefault(recipe, folds_)
