"""Benchmark: heterogeneous change detection (leave-one-scene-out) and HSI–LiDAR cross-modal learning.

    python benchmarks/hetero.py                    # both parts (~15 min on 2 CPU cores)
    python benchmarks/hetero.py --part loso        # only the leave-one-scene-out table
    python benchmarks/hetero.py --part houston     # only the Houston 2013 numbers

**Leave-one-scene-out** over the 11 ``hetero_cd`` scenes and the 2 ``sar_cd`` pairs (13 folds: each
scene is predicted by models trained on the 12 others). Inputs (:func:`changedet.data.hetero.prepare_scene`):
every date standardised per band with its own statistics, single-band dates repeated to 3 bands,
SAR-vs-optical pairs swapped to optical-vs-SAR. Methods, on the same inputs:

* pseudo-Siamese: ``pseudo-siamese-fc`` (base 8), two unshared FC-Siam encoders;
* Siamese: ``fc-siam-diff`` (base 8, no dropout), the same encoder shared by both dates (the 1-band
  dates repeated to 3 bands are what makes the channel counts equal);
* CVA on the per-modality standardised inputs, Otsu threshold per scene (no training).

The networks are scored twice: at the threshold tuned on the fold's training scenes, and at Otsu's
threshold of the held-out scene's probability map ("Otsu" columns: scene-adaptive like CVA, no label
used), because a threshold tuned on other sensors transfers poorly to an unseen one.

Both networks: loss ``bce+dice+0.5*crossmodal``, 64 px patches (half placed on changes), paired
flips/rotations, AdamW, identical schedule and seed; the threshold is the F1-optimal one on uniformly
drawn patches of the fold's training scenes (never the held-out scene); the held-out scene is
predicted whole (sliding window, as ``changedet detect``).

**Houston 2013**: the 2832 training samples (both modalities) split by region
(:func:`changedet.data.houston.held_apart_split`, whole polygons per class on one side); features
standardised with fit-part statistics. ``pseudo-siamese-pixel`` (144 -> 32 and 21 -> 32) is trained
only with the cross-modal loss (same location = positive, other locations = negatives, mined) on the
fit part; HSI->LiDAR retrieval among N candidates and a linear probe (softmax on the concatenated
HSI+LiDAR embeddings, fitted on the fit part) are measured on the held-apart part.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import DataLoader

from changedet.data import PairedAugment, PatchDataset, collate_patches, open_scenes
from changedet.data.hetero import hetero_cd_scenes, prepare_scene, sar_cd_scenes
from changedet.data.houston import HoustonSamples, held_apart_split, load_houston
from changedet.data.scenes import IGNORE, ChangeScene
from changedet.losses import CrossModalLoss, build_loss
from changedet.metrics import Confusion, classification_metrics
from changedet.models import create_model
from changedet.models.cva import otsu_threshold
from changedet.train import (
    ProbabilityHistogram,
    Trainer,
    TrainSettings,
    evaluate_scenes,
)
from changedet.train.crossmodal import (
    embed_pixels,
    linear_probe,
    matching_distances,
    pixel_batches,
    retrieval_topk,
    train_cross_modal,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / "benchmarks" / "_work" / "hetero"
CHANNELS = 3
IDENTITY = {d: {"mean": [0.0] * CHANNELS, "std": [1.0] * CHANNELS} for d in ("t1", "t2")}
NETWORKS = {
    "pseudo-Siamese": ("pseudo-siamese-fc", {"base_channels": 8}),
    "Siamese": ("fc-siam-diff", {"base_channels": 8, "dropout": 0.0}),
}
LOSS = "bce+dice+0.5*crossmodal"


def train_network(name: str, config: dict, train: list[ChangeScene], out_dir: Path, args: argparse.Namespace) -> tuple:
    """Train one network on ``train``; returns the model and the threshold tuned on ``train``."""
    torch.manual_seed(args.seed)
    model = create_model(name, in_channels=CHANNELS, **config)
    data = PatchDataset(train, 64, IDENTITY, PairedAugment(gain=0.05, offset=0.05, noise=0.02), args.samples, 0.5, args.seed)
    settings = TrainSettings(epochs=args.epochs, batch_size=8, lr=args.lr, device="cpu", progress=False, resume=False, patience=None)
    Trainer(model, name, config, build_loss(LOSS), data, [], IDENTITY, out_dir, settings).fit()
    return model, tune_threshold(model, train, args.seed)


def tune_threshold(model: torch.nn.Module, train: list[ChangeScene], seed: int) -> float:
    """The F1-optimal threshold on uniformly drawn patches of the training scenes (never the held-out one)."""
    data = PatchDataset(train, 128, IDENTITY, None, length=32, change_fraction=0.0, seed=seed + 1)
    hist = ProbabilityHistogram()
    for batch in DataLoader(data, batch_size=8, collate_fn=collate_patches):
        prob = model.predict(batch["t1"], batch["t2"]).probability[:, 0].numpy()
        hist.update(prob, batch["target"].numpy() > 0.5, batch["valid"].numpy())
    return hist.best_threshold()


def cva_confusion(scene: ChangeScene) -> Confusion:
    """CVA + Otsu on one (standardised) scene."""
    h, w = scene.shape
    x1, x2, valid = scene.read(Window(0, 0, w, h))
    model = create_model("cva", in_channels=CHANNELS)
    s1, s2 = (torch.from_numpy(np.ascontiguousarray(x[:, valid].T)) for x in (x1, x2))
    model.fit_scene(s1, s2, torch.ones(len(s1), dtype=torch.bool))
    prob = model.predict(torch.from_numpy(x1)[None], torch.from_numpy(x2)[None]).probability[0, 0].numpy()
    label = scene.label
    return Confusion().update(prob >= 0.5, label == 1, valid & (label != IGNORE))


def otsu_of_histogram(hist: ProbabilityHistogram) -> float:
    """Otsu's threshold of a scene's predicted probabilities (all evaluated pixels; labels unused)."""
    return otsu_threshold(np.repeat((np.arange(hist.bins) + 0.5) / hist.bins, hist.pos + hist.neg))


def _cell(c: Confusion) -> str:
    m = c.metrics()
    return f"{m['f1']:6.3f} {m['kappa']:6.3f}"


def loso(args: argparse.Namespace) -> None:
    records = hetero_cd_scenes(SHARED / "hetero_cd") + sar_cd_scenes(SHARED / "sar_cd")
    prepared = [prepare_scene(r, WORK / "prepared", CHANNELS) for r in records]
    scenes = open_scenes([p.record for p in prepared], cache_bytes=2**31)
    methods = [*NETWORKS, *(f"{n} Otsu" for n in NETWORKS), "CVA"]
    rows: dict[str, dict[str, Confusion]] = {}
    held_out = [s for s in scenes if not args.scenes or s.name in args.scenes]
    for scene in held_out:
        start = time.perf_counter()
        train = [s for s in scenes if s.name != scene.name]
        rows[scene.name] = {}
        for label, (name, config) in NETWORKS.items():
            model, threshold = train_network(name, config, train, WORK / "runs" / name / scene.name, args)
            hist = evaluate_scenes(model, [scene], IDENTITY).scenes[scene.name]
            rows[scene.name][label] = hist.confusion(threshold)
            rows[scene.name][f"{label} Otsu"] = hist.confusion(otsu_of_histogram(hist))
        rows[scene.name]["CVA"] = cva_confusion(scene)
        print(f"  fold {scene.name}: {time.perf_counter() - start:.0f} s", flush=True)
    modality = {p.name: "-".join(m[:3] for m in p.modalities) for p in prepared}
    short = {"pseudo-Siamese": "pseudo-Siam.", "pseudo-Siamese Otsu": "pseudo-S.Otsu"}
    header = f"{'scene':>11} {'t1-t2':>7} {'change':>6} | " + " | ".join(f"{short.get(m, m):>13}" for m in methods)
    print(f"\nLeave-one-scene-out, F1 and kappa of the change class per held-out scene\n{header}")
    print(f"{'':>11} {'':>7} {'':>6} | " + " | ".join(f"{'F1':>6} {'kappa':>6}" for _ in methods))
    for scene in held_out:
        change = scene.change_fraction() * 100
        print(f"{scene.name:>11} {modality[scene.name]:>7} {change:5.1f}% | " + " | ".join(_cell(rows[scene.name][m]) for m in methods))
    pooled = {m: sum((r[m] for r in rows.values()), Confusion()) for m in methods}
    print(f"{'pooled':>11} {'':>7} {'':>6} | " + " | ".join(_cell(pooled[m]) for m in methods))
    means = [np.mean([[r[m].metrics()[k] for k in ("f1", "kappa")] for r in rows.values()], axis=0) for m in methods]
    print(f"{'mean':>11} {'':>7} {'':>6} | " + " | ".join(f"{a:6.3f} {b:6.3f}" for a, b in means))


def _standardised(fit: HoustonSamples, part: HoustonSamples) -> tuple[np.ndarray, np.ndarray]:
    return tuple((getattr(part, k) - getattr(fit, k).mean(0)) / np.maximum(getattr(fit, k).std(0), 1e-6) for k in ("hsi", "lidar"))


def houston(args: argparse.Namespace) -> None:
    samples = load_houston(SHARED / "houston2013_partial")
    fit_idx, held_idx = held_apart_split(samples, 0.3, args.seed)
    fit, held = samples.subset(fit_idx), samples.subset(held_idx)
    (fh, fl), (hh, hl) = _standardised(fit, fit), _standardised(fit, held)
    n = len(held)
    print(f"\nHouston 2013: {len(fit)} fit / {n} held-apart samples (whole regions per class), 15 classes")
    print(f"retrieval: HSI query -> its own location's LiDAR among N candidates (chance top-1 = 1/N: {1 / 100:.3f} at N=100, {1 / n:.4f} at N={n})")
    header = (f"{'encoders':>38} | {'d match':>7} {'d other':>7} | {'N=100 @1':>8} {'@5':>6} | {f'N={n} @1':>8} {'@5':>6} "
              f"| {'OA':>6} {'AA':>6} {'kappa':>6}")  # fmt: skip
    print(header)
    pred = linear_probe(np.hstack([fh, fl]), fit.labels, np.hstack([hh, hl]), seed=args.seed)
    m = classification_metrics(pred, held.labels)
    print(f"{'raw HSI+LiDAR features (reference)':>38} | {'':>7} {'':>7} | {'':>8} {'':>6} | {'':>8} {'':>6} "
          f"| {m['oa']:6.3f} {m['aa']:6.3f} {m['kappa']:6.3f}")  # fmt: skip
    for mining in (None, "batch-hard", "semi-hard"):
        torch.manual_seed(args.seed)
        model = create_model("pseudo-siamese-pixel", in_channels=(fh.shape[1], fl.shape[1]))
        start = time.perf_counter()
        if mining is not None:
            loss = CrossModalLoss(mining=mining, max_per_class=128, seed=args.seed)
            train_cross_modal(model, pixel_batches(fh, fl, 128, args.steps, args.seed), loss, lr=2e-3)
        seconds = time.perf_counter() - start
        e1, e2 = embed_pixels(model, hh, hl)
        f1, f2 = embed_pixels(model, fh, fl)
        match, other = matching_distances(e1, e2, args.seed)
        top100 = retrieval_topk(e1, e2, (1, 5), 100, args.seed)
        top_all = retrieval_topk(e1, e2, (1, 5))
        pred = linear_probe(np.hstack([f1, f2]), fit.labels, np.hstack([e1, e2]), seed=args.seed)
        m = classification_metrics(pred, held.labels)
        name = "untrained" if mining is None else f"cross-modal {mining}, {args.steps} steps, {seconds:.0f} s"
        print(f"{name:>38} | {match:7.3f} {other:7.3f} | {top100[1]:8.3f} {top100[5]:6.3f} | {top_all[1]:8.3f} {top_all[5]:6.3f} "
              f"| {m['oa']:6.3f} {m['aa']:6.3f} {m['kappa']:6.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "loso", "houston"], default="all")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fold and network")
    parser.add_argument("--samples", type=int, default=640, help="patches per epoch (batch 8)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the networks")
    parser.add_argument("--steps", type=int, default=400, help="Houston cross-modal steps (batch 128)")
    parser.add_argument("--scenes", nargs="*", default=None, help="held-out scenes (default: all 13)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (SHARED / "hetero_cd").is_dir():
        raise SystemExit(f"needs the shared data at {SHARED}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.part in ("all", "loso"):
        loso(args)
    if args.part in ("all", "houston"):
        houston(args)
    print(f"\ntotal {(time.perf_counter() - start) / 60:.1f} min, {args.threads} torch threads")


if __name__ == "__main__":
    main()
