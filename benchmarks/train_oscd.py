"""Benchmark: train a bundled model (leave-cities-out) and print the validation table.

    python benchmarks/train_oscd.py                      # train with configs/train/oscd_bundled.yaml (resumes)
    python benchmarks/train_oscd.py --report-only        # table of an existing output folder
    python benchmarks/train_oscd.py --report-only --bundle   # also copy best.safetensors into changedet/weights
    python benchmarks/train_oscd.py --config configs/train/rgb_bundled.yaml --bundle-name rgb   # the RGB model
    python benchmarks/train_oscd.py --report-only --fit-check   # also F1 on the TRAINING cities (underfitting check)

Prints per-city and pooled validation metrics (full scenes, threshold tuned on validation, plus F1 at
0.5), training minutes (sum of epoch times), model size, and the best epoch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from changedet.checkpoint import METADATA_KEY, read_metadata
from changedet.data import discover_scenes
from changedet.evaluation.loading import load_model, open_labelled_scenes
from changedet.metrics import Confusion
from changedet.train import evaluate_scenes, load_train_config, train_from_config
from changedet.weights import BUNDLED, bundled_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def training_minutes(history: list[dict]) -> float:
    """Minutes spent training and validating: the sum of the epochs' ``train_seconds`` and validation ``seconds``."""
    return sum(h.get("train_seconds", 0) + (h.get("val") or {}).get("seconds", 0) for h in history) / 60


def table(out_dir: Path) -> None:
    meta = read_metadata(out_dir / "best.safetensors")
    history = json.loads((out_dir / "result.json").read_text())["history"]
    metrics = meta["metrics"]
    rows = sorted(metrics["per_scene"].items())
    sources = (meta.get("data") or {}).get("sources", [])
    for source in sources if len(sources) > 1 else []:  # pooled per source of a multi-source model
        names = {r.name for r in discover_scenes(source["root"], source["layout"])} & set(metrics["per_scene"])
        parts = [metrics["per_scene"][n] for n in names]
        pooled = sum((Confusion.from_metrics(m) for m in parts), Confusion())
        rows.append((f"{source['layout']} pooled", pooled.metrics()))
    rows += [("pooled", metrics["pooled"]), ("pooled@0.5", metrics["pooled_at_0.5"])]
    width = max(10, *(len(name) for name, _ in rows))
    print(f"{'scene':>{width}} {'precision':>9} {'recall':>7} {'F1':>7} {'IoU':>7} {'OA':>7} {'kappa':>7}")
    for name, m in rows:
        print(f"{name:>{width}} {m['precision']:>9.4f} {m['recall']:>7.4f} {m['f1']:>7.4f} {m['iou']:>7.4f} {m['oa']:>7.4f} {m['kappa']:>7.4f}")
    minutes = training_minutes(history)
    size = (out_dir / "best.safetensors").stat().st_size / 2**20
    print(f"\nmodel {meta['model']} {meta['config']}, {size:.2f} MiB; threshold {meta['threshold']:.3f} (tuned on validation)")
    print(f"best epoch {meta['training']['best_epoch']} of {len(history)} run; training time {minutes:.1f} min on {meta['training']['device']}")
    print(f"train scenes: {', '.join(meta['split']['train'])}; validation scenes: {', '.join(meta['split']['val'])}")


def fit_check(out_dir: Path, root: Path) -> None:
    """F1 on the training cities under ``root``: how well the model fits what it saw (never a validation figure)."""
    loaded = load_model(str(out_dir / "best.safetensors"))
    scenes = open_labelled_scenes(root, loaded.spec.metadata["split"]["train"], loaded.bands)
    result = evaluate_scenes(loaded.model, scenes, loaded.normalization)
    for label, threshold in (("validation threshold", loaded.threshold), ("threshold tuned on them", result.tune_threshold())):
        m = result.metrics(threshold)
        cities = ", ".join(f"{name} {s['f1']:.4f}" for name, s in sorted(m["per_scene"].items()))
        print(f"training cities (fit, not validation) at {label} {threshold:.3f}: pooled F1 {m['pooled']['f1']:.4f} ({cities})")


def bundle(out_dir: Path, config: Path, name: str) -> Path:
    """Copy the best checkpoint into the package as the bundled model ``name``."""
    meta = read_metadata(out_dir / "best.safetensors")
    cfg = load_train_config(config)
    meta["training"].setdefault("validation", {"tile": cfg.validation.tile, "overlap": cfg.validation.overlap})
    meta["source_config"] = str(config.relative_to(ROOT)) if config.is_absolute() else str(config)
    target = bundled_checkpoint(name) or ROOT / "changedet" / "weights" / BUNDLED[name]
    save_file(load_file(str(out_dir / "best.safetensors")), str(target), metadata={METADATA_KEY: json.dumps(meta)})
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/train/oscd_bundled.yaml"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--bundle", action="store_true")
    parser.add_argument("--fit-check", action="store_true", help="also print F1 on the training cities")
    parser.add_argument("--bundle-name", choices=sorted(BUNDLED), default="oscd-s2", help="bundle under this name (implies --bundle)")
    args = parser.parse_args()
    cfg = load_train_config(args.config)
    out_dir = Path(cfg.output_dir)
    if not args.report_only:
        train_from_config(args.config)
    table(out_dir)
    if args.fit_check:
        fit_check(out_dir, cfg.data.source_list()[0].root)
    if args.bundle or args.bundle_name != "oscd-s2":
        print(f"bundled as {bundle(out_dir, args.config, args.bundle_name)}")


if __name__ == "__main__":
    main()
