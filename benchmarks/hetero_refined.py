"""Benchmark and bundling of ``hetero``: structure consistency refined by a trained network, leave-one-scene-out.

    python benchmarks/hetero_refined.py cv --seeds 0 1 2 3 4     # 13 folds x variants x seeds (resumes)
    python benchmarks/hetero_refined.py report                   # the table from the committed results
    python benchmarks/hetero_refined.py bundle                   # prior-only, trained on all 13 scenes -> changedet/weights

Model: ``structure-refined`` (:class:`changedet.models.structure.StructureRefined`). The structure
logit of every scene is computed once through ``changedet detect`` (an untrained ``structure-refined``
whose residual head is zero, per-scene normalisation: exactly the bundled model's prior) and kept with
the per-date standardised images (1-band dates repeated to 3, dates in their given order) as a
training band. Variants (:data:`VARIANTS`): ``refine`` (images + structure logit) and ``prior-only``
(the structure logit alone), trained identically (:data:`RECIPE`: bce+dice, 64 px patches half on
changes, flips/rotations and small gain/offset/noise, AdamW, constant lr, EMA of the weights).

**Leave-one-scene-out** over the 11 ``hetero_cd`` scenes and the 2 ``sar_cd`` pairs: every scene is
predicted by a model trained on the 12 others; no epoch or threshold is chosen on it. Threshold rules:
``fixed`` 0.5 and ``otsu`` (label-free, per scene, never below 0.15, as ``--threshold-rule otsu``).
Pooled F1 over the 13 scenes per seed, then mean ± std over seeds; the ``nested`` row picks the rule
of each scene by pooled F1 on the 12 others (the expected figure of a model that chose its rule by CV). The baselines are read from
``hetero_unsupervised_summary.json`` (``hetero-unsupervised``, CVA through detect).
Per-fold results: ``benchmarks/results/hetero_refined/<variant>/s<seed>/<scene>.json`` (probability
histograms of the held-out scene); the table: ``benchmarks/results/hetero_refined.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
import os
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "benchmarks" / "_work" / "hetero_refined"
RESULTS = ROOT / "benchmarks" / "results" / "hetero_refined"
TABLE = RESULTS.parent / "hetero_refined.json"
VARIANTS = {"refine": {"use_images": True}, "prior-only": {"use_images": False}}
RECIPE = {"epochs": 10, "samples": 640, "batch": 8, "patch": 64, "lr": 1e-3, "ema_decay": 0.99}
RULES = ("fixed", "otsu")
BINS = 1000


def _records() -> list:
    from changedet.data.hetero import hetero_cd_scenes, sar_cd_scenes

    return hetero_cd_scenes(DATA / "hetero_cd") + sar_cd_scenes(DATA / "sar_cd")


def prior_checkpoint(folder: Path) -> Path:
    """An untrained ``structure-refined`` whose output is its structure logit (zero residual head),
    with the bundled model's per-scene normalisation: ``changedet detect`` with it writes the prior."""
    import torch

    from changedet.checkpoint import save_checkpoint
    from changedet.models import create_model

    model = create_model("structure-refined")
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()
    path = folder / "prior.safetensors"
    save_checkpoint(path, model, {"model": "structure-refined", "config": {}, "normalization": "per-scene", "threshold": 0.5})
    return path


def prepare() -> list[str]:
    """Per scene (once): ``t1.tif``/``t2.tif`` = 3 standardised bands + the structure logit, ``gt.tif``."""
    import rasterio

    from changedet.data.hetero import prepare_scene
    from changedet.models.structure import PRIOR_CLAMP
    from changedet.pipeline.detect import PROBABILITY, DetectParams, detect_changes

    names = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        for rec in _records():
            names.append(rec.name)
            folder = WORK / "prepared" / rec.name
            if (folder / "done").is_file():
                continue
            ckpt = ckpt or prior_checkpoint(Path(tmp))
            start = time.perf_counter()
            result = detect_changes(rec.record.t1, rec.record.t2, Path(tmp) / rec.name, DetectParams(model=str(ckpt)))
            with rasterio.open(result.path(PROBABILITY)) as ds:
                prob, valid = ds.read(1), ds.read_masks(1) > 0
            p = np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7)
            prior = np.where(valid, np.clip(np.log(p / (1 - p)), -PRIOR_CLAMP, PRIOR_CLAMP), 0).astype(np.float32)
            written = prepare_scene(rec, folder.parent, 3, optical_first=False).record
            for path in (written.t1, written.t2):
                with rasterio.open(path) as ds:
                    data, profile = ds.read(), ds.profile
                profile.update(count=data.shape[0] + 1)
                with rasterio.open(path, "w", **profile) as ds:
                    ds.write(np.concatenate([data, prior[None]]))
            (folder / "done").write_text("ok")
            print(f"prepared {rec.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return names


def _record(name: str):  # noqa: ANN202
    from changedet.data.discovery import SceneRecord

    folder = WORK / "prepared" / name
    return SceneRecord(name, str(folder / "t1.tif"), str(folder / "t2.tif"), str(folder / "gt.tif"))


def _scene(name: str):  # noqa: ANN202
    from changedet.data.scenes import ChangeScene

    return ChangeScene.open(_record(name))


def train(variant: str, seed: int, names: list[str], out: Path):  # noqa: ANN201
    """A ``structure-refined`` of ``variant`` trained on the prepared scenes ``names`` (returns the EMA model)."""
    import torch
    from safetensors.torch import load_file

    from changedet.data import PairedAugment, PatchDataset
    from changedet.data.scenes import open_scenes
    from changedet.losses import build_loss
    from changedet.models import ChangeModel, ChangeOutput, create_model
    from changedet.train import Trainer, TrainSettings

    class PriorInLastBand(ChangeModel):
        """Training view: the prepared dates carry the structure logit as their 4th band."""

        def __init__(self, net: ChangeModel) -> None:
            super().__init__()
            self.net, self.in_channels = net, (4, 4)

        def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
            logits = self.net.refine(t1[:, :3], t2[:, :3], t1[:, 3:])
            return ChangeOutput(logits=logits, difference=torch.zeros_like(logits))

    torch.manual_seed(seed)
    net = create_model("structure-refined", **VARIANTS[variant])
    identity = {d: {"mean": [0.0] * 4, "std": [1.0] * 4} for d in ("t1", "t2")}
    scenes = open_scenes([_record(n) for n in names], cache_bytes=2**30)
    data = PatchDataset(scenes, RECIPE["patch"], identity, PairedAugment(gain=0.05, offset=0.05, noise=0.02),
                        RECIPE["samples"], 0.5, seed)
    settings = TrainSettings(epochs=RECIPE["epochs"], batch_size=RECIPE["batch"], lr=RECIPE["lr"], device="cpu", progress=False,
                             resume=False, patience=None, ema_decay=RECIPE["ema_decay"], scheduler="constant", seed=seed)
    config = VARIANTS[variant]
    state = out / "trainer_state.json"
    if not (state.is_file() and json.loads(state.read_text())["epoch"] == RECIPE["epochs"]):  # a finished run is reused
        Trainer(PriorInLastBand(net), "structure-refined", config, build_loss("bce+dice"), data, [], identity, out, settings).fit()
    state = {k.removeprefix("net."): v for k, v in load_file(str(out / "best.safetensors")).items()}
    net.load_state_dict(state, strict=False)
    return net.eval()


def predict(net, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    """Probability, label and valid mask of a whole prepared scene (the structure logit as input)."""
    import torch
    from rasterio.windows import Window

    from changedet.data.scenes import IGNORE

    scene = _scene(name)
    h, w = scene.shape
    x1, x2, valid = scene.read(Window(0, 0, w, h))
    label = scene.label
    scene.close()
    with torch.inference_mode():
        t1, t2 = torch.from_numpy(x1)[None], torch.from_numpy(x2)[None]
        prob = torch.sigmoid(net.refine(t1[:, :3], t2[:, :3], t1[:, 3:]))[0, 0].numpy()
    return prob, label, valid & (label != IGNORE)


def fold_path(variant: str, seed: int, held: str) -> Path:
    """The result file of one leave-one-scene-out fold."""
    return RESULTS / variant / f"s{seed}" / f"{held}.json"


def run_fold(job: tuple[str, int, str, list[str]]) -> str:
    """Train on every scene but ``held``, predict ``held``, write its histogram (atomically)."""
    variant, seed, held, names = job
    import torch

    from changedet.metrics import ProbabilityHistogram

    torch.set_num_threads(1)
    start = time.perf_counter()
    out = WORK / "runs" / variant / f"s{seed}" / held
    net = train(variant, seed, [n for n in names if n != held], out)
    prob, label, known = predict(net, held)
    hist = ProbabilityHistogram(BINS)
    hist.update(prob, label == 1, known)
    minutes = (time.perf_counter() - start) / 60
    target = fold_path(variant, seed, held)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pos": hist.pos.tolist(), "neg": hist.neg.tolist(), "minutes": minutes, "recipe": RECIPE}))
    os.replace(tmp, target)
    return f"{variant} seed {seed} held {held}: {minutes:.1f} min"


def histogram(variant: str, seed: int, held: str):  # noqa: ANN201
    """The stored histogram of one fold."""
    from changedet.metrics import ProbabilityHistogram

    d = json.loads(fold_path(variant, seed, held).read_text())
    return ProbabilityHistogram(BINS, np.array(d["pos"]), np.array(d["neg"]))


def rule_confusion(hist, rule: str):  # noqa: ANN001, ANN201
    """Confusion of one scene's histogram under a threshold rule (the detect rule's own function)."""
    from changedet.pipeline.postprocess import scene_threshold

    return hist.confusion(scene_threshold(rule, 0.5, hist))


def report(names: list[str], seeds: list[int]) -> dict[str, Any]:
    """Pooled F1 per variant, rule and seed (complete seeds only), per-scene means, baselines."""
    from changedet.metrics import Confusion

    base = json.loads((RESULTS.parent / "hetero_unsupervised_summary.json").read_text())
    table: dict[str, Any] = {"protocol": "leave-one-scene-out over 13 hetero/SAR scenes, benchmarks/hetero_refined.py",
                             "recipe": RECIPE, "rows": {},
                             "baselines": {"hetero-unsupervised": base["loso_pooled_f1"], "cva": base["cva_pooled_f1"]}}
    print(f"{'variant':>11} {'rule':>6} {'seeds':>5} | {'pooled F1 mean ± std':>21} | per seed")

    def add_row(key: str, done: list[int], pooled: list[float], note: str = "", **extra: Any) -> None:
        table["rows"][key] = {"seeds": done, "pooled_f1": pooled, "mean": float(np.mean(pooled)), "std": float(np.std(pooled)), **extra}
        variant, rule = key.split("/")
        print(f"{variant:>11} {rule:>6} {len(done):>5} | {np.mean(pooled):9.3f} ± {np.std(pooled):.3f} | "
              + " ".join(f"{v:.3f}" for v in pooled) + note)

    for variant in VARIANTS:
        done = [s for s in seeds if all(fold_path(variant, s, n).is_file() for n in names)]
        if not done:
            continue
        cells = {s: {(n, r): rule_confusion(hist, r) for n in names for hist in [histogram(variant, s, n)] for r in RULES}
                 for s in done}
        for rule in RULES:
            pooled = [sum((cells[s][(n, rule)] for n in names), Confusion()).metrics()["f1"] for s in done]
            per_scene = {n: float(np.mean([cells[s][(n, rule)].metrics()["f1"] for s in done])) for n in names}
            add_row(f"{variant}/{rule}", done, pooled, per_scene_mean=per_scene)
        pooled, choices = [], Counter()
        for s in done:  # the rule of each scene chosen on the 12 others (nested: no choice sees the scored scene)
            total = Confusion()
            for n in names:
                def others(r: str, held: str = n, seed: int = s) -> float:
                    return sum((cells[seed][(o, r)] for o in names if o != held), Confusion()).metrics()["f1"]
                best = max(RULES, key=others)
                choices[best] += 1
                total = total + cells[s][(n, best)]
            pooled.append(total.metrics()["f1"])
        add_row(f"{variant}/nested", done, pooled, f"  (rule chosen on the other 12: {dict(choices)})",
                chosen={r: choices[r] for r in RULES})
    print(f"baselines (leave-one-scene-out, through detect): hetero-unsupervised {base['loso_pooled_f1']:.3f}, CVA {base['cva_pooled_f1']:.3f}")
    rows = table["rows"]
    if rows:
        per_scene = {k: r for k, r in rows.items() if "per_scene_mean" in r}
        print(f"\nper-scene F1, mean over seeds\n{'scene':>12} {'unsup.':>7} " + " ".join(f"{k:>17}" for k in per_scene))
        for n in names:
            print(f"{n:>12} {base['scenes'][n]['f1']:7.3f} " + " ".join(f"{r['per_scene_mean'][n]:17.3f}" for r in per_scene.values()))
    tmp = TABLE.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, TABLE)
    return table


def bundle(variant: str, rule: str, seed: int, names: list[str]) -> Path:
    """Train ``variant`` on all 13 scenes (once) and write the bundled ``hetero``: the CV figure, the
    figure on the synthetic optical/SAR pair of ``changedet.testing.synthetic`` (what the tests
    reproduce), and per scene the F1 through ``changedet detect`` beside the in-process one (training
    scenes: a check that the two paths agree, not a validation figure)."""
    import rasterio

    from changedet.checkpoint import save_checkpoint
    from changedet.evaluate import evaluate_mask
    from changedet.metrics import Confusion, ProbabilityHistogram
    from changedet.pipeline.detect import MASK, DetectParams, detect_changes
    from changedet.testing.synthetic import write_synthetic_optical_sar
    from changedet.weights import BUNDLED

    table = json.loads(TABLE.read_text())
    row = {**table["rows"][f"{variant}/{rule}"], **table["rows"][f"{variant}/nested"]}  # the figure of a rule chosen by CV
    out = WORK / "runs" / variant / f"s{seed}" / "all"
    net = train(variant, seed, names, out)
    minutes = sum(h.get("train_seconds", 0) for h in json.loads((out / "trainer_state.json").read_text())["history"]) / 60
    meta = {
        "model": "structure-refined", "config": VARIANTS[variant], "normalization": "per-scene", "threshold": 0.5,
        "split": {"train": names, "val": []},
        "test_time": {"tta": "none", "harmonize": "none", "min_region": 0, "threshold_rule": rule},
        "expected_f1_unseen": {"pooled_f1_mean": row["mean"], "pooled_f1_std": row["std"], "seeds": row["seeds"],
                               "protocol": table["protocol"], "row": f"{variant}/nested (rule chosen on the other 12 scenes)",
                               "per_scene_mean_at_bundled_rule": row["per_scene_mean"]},
        "training": {**RECIPE, "loss": "bce+dice", "seed": seed, "minutes": round(minutes, 1), "scenes": names},
        "source_config": f"benchmarks/hetero_refined.py bundle --variant {variant} --rule {rule} --seed {seed}",
    }
    target = ROOT / "changedet" / "weights" / BUNDLED["hetero"]
    save_checkpoint(target, net, meta)
    records = {r.name: r.record for r in _records()}
    print(f"{'scene':>12} {'detect F1':>9} {'in-process F1':>13}  (training scenes: the two paths agree, not a validation figure)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result = detect_changes(records[name].t1, records[name].t2, Path(tmp) / name, DetectParams(model="hetero"))
            with rasterio.open(result.path(MASK)) as ds:
                mask = ds.read(1)
            prob, label, known = predict(net, name)
            hist = ProbabilityHistogram(BINS)
            hist.update(prob, label == 1, known)
            detect_f1 = Confusion().update(mask == 1, label == 1, known & (mask != 255)).metrics()["f1"]
            print(f"{name:>12} {detect_f1:9.3f} {rule_confusion(hist, rule).metrics()['f1']:13.3f}")
        optical, sar, label = write_synthetic_optical_sar(Path(tmp) / "synthetic")
        result = detect_changes(optical, sar, Path(tmp) / "sample", DetectParams(model="hetero"))
        m = evaluate_mask(result.path(MASK), label)
    meta["sample_scene"] = {"scene": "changedet.testing.synthetic.write_synthetic_optical_sar()", "note": "synthetic, never trained on",
                            **{k: m[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn", "tn")}}
    save_checkpoint(target, net, meta)
    print(f"bundled hetero: {target} ({target.stat().st_size / 2**20:.2f} MiB), {minutes:.1f} min; expected pooled F1 on "
          f"unseen scenes {row['mean']:.3f} ± {row['std']:.3f} ({len(row['seeds'])} seeds); synthetic pair F1 {m['f1']:.4f}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["cv", "report", "bundle"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variant", default="prior-only", choices=list(VARIANTS), help="bundle: the variant to ship")
    parser.add_argument("--rule", default="fixed", choices=RULES, help="bundle: its threshold rule")
    parser.add_argument("--seed", type=int, default=0, help="bundle: the training seed")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    if not (DATA / "hetero_cd").is_dir():
        raise SystemExit(f"needs the shared data at {DATA}")
    names = prepare()
    if args.command == "cv":
        jobs = [(v, s, n, names) for s in args.seeds for v in args.variants for n in names if not fold_path(v, s, n).is_file()]
        os.environ["OMP_NUM_THREADS"] = "1"
        with get_context("spawn").Pool(args.processes, maxtasksperchild=1) as pool:
            for line in pool.imap_unordered(run_fold, jobs):
                print(line, flush=True)
        report(names, args.seeds)
    elif args.command == "report":
        report(names, args.seeds)
    else:
        bundle(args.variant, args.rule, args.seed, names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
