"""Benchmark: ``hetero-unsupervised`` (structure consistency, fitted on each pair) against CVA, leave-one-scene-out.

    python benchmarks/hetero_unsupervised.py          # all 13 shared hetero/SAR scenes (resumes from its JSON)

Every run goes through ``changedet detect`` on the raw pair (PNG/BMP/TIF as shipped, no preparation):
the method standardises each date itself. Variants of the registered defaults (:data:`VARIANTS`,
box-filter sizes of the features and of the score) and two threshold rules (the model's own Otsu
threshold of its fit samples, ``--threshold-rule otsu`` on the blended probability) are run on every
scene. **Leave-one-scene-out**: each scene is scored with the variant and rule that maximise pooled F1
on the 12 other scenes, so no choice looks at the scene it is scored on. CVA (per-date standardisation,
1-band dates repeated to 3 bands, Otsu) is the baseline. Minutes per megapixel are the detect wall time.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

from changedet.checkpoint import save_checkpoint
from changedet.data.hetero import hetero_cd_scenes, sar_cd_scenes
from changedet.data.scenes import ChangeScene
from changedet.metrics import IGNORE, Confusion
from changedet.models import create_model
from changedet.pipeline.detect import MASK, DetectParams, detect_changes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULT = ROOT / "benchmarks" / "results" / "hetero_unsupervised.json"
VARIANTS = {  # name -> builder arguments (the registered defaults are "f5s9", the leave-one-scene-out choice)
    "f5s5": {"smoothing": 5, "score_smoothing": 5},
    "f5s9": {"smoothing": 5, "score_smoothing": 9},
    "f9s9": {"smoothing": 9, "score_smoothing": 9},
}
RULES = ("fixed", "otsu")


def _checkpoint(folder: Path, config: dict) -> Path:
    """An untrained ``hetero-unsupervised`` with ``config`` as a checkpoint (what ``--model PATH`` takes)."""
    path = folder / f"hetero-unsupervised-{'-'.join(f'{k}{v}' for k, v in config.items())}.safetensors"
    save_checkpoint(path, create_model("hetero-unsupervised", **config), {"model": "hetero-unsupervised", "config": config})
    return path


def _run(t1: str, t2: str, label: np.ndarray, params: DetectParams) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = detect_changes(t1, t2, Path(tmp) / "out", params)
        seconds = time.perf_counter() - start
        with rasterio.open(result.path(MASK)) as ds:
            mask = ds.read(1)
    known = (mask != 255) & (label != IGNORE)
    c = Confusion().update(mask == 1, label == 1, known)
    return {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn, "seconds": seconds, "pixels": int(mask.size)}


def measure() -> dict:
    """Every (scene, method) not yet in the result file."""
    done = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    records = hetero_cd_scenes(DATA / "hetero_cd") + sar_cd_scenes(DATA / "sar_cd")
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {name: _checkpoint(Path(tmp), cfg) for name, cfg in VARIANTS.items()}
        for rec in records:
            scene = ChangeScene.open(rec.record, allow_different_bands=True)
            label, channels = scene.label, scene.channels
            scene.close()
            row = done.setdefault(rec.name, {"modalities": list(rec.modalities)})
            t1, t2 = rec.record.t1, rec.record.t2
            jobs = {"cva": DetectParams(model="cva")}
            for name, path in ckpts.items():
                for rule in RULES:
                    jobs[f"{name}/{rule}"] = DetectParams(model=str(path), threshold_rule=rule)
            for key, params in jobs.items():
                if key in row:
                    continue
                if key == "cva" and channels[0] != channels[1]:
                    row[key] = _cva_repeated(t1, t2, label)
                else:
                    row[key] = _run(t1, t2, label, params)
                RESULT.write_text(json.dumps(done, indent=1))
            print(rec.name, " ".join(f"{k} {_f1(v):.3f}" for k, v in row.items() if k != "modalities"), flush=True)
    return done


def _cva_repeated(t1: str, t2: str, label: np.ndarray) -> dict:
    """CVA on a 1-band vs 3-band pair: the 1-band date repeated to 3 bands (as the hetero benchmark does)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, src in enumerate((t1, t2)):
            with rasterio.open(src) as ds:
                data = ds.read()
            data = np.repeat(data, 3, 0) if data.shape[0] == 1 else data
            path = Path(tmp) / f"t{i + 1}.tif"
            with rasterio.open(path, "w", driver="GTiff", count=3, height=data.shape[1], width=data.shape[2], dtype=data.dtype) as dst:
                dst.write(data)
            paths.append(str(path))
        return _run(*paths, label, DetectParams(model="cva"))


def _f1(counts: dict) -> float:
    return Confusion(counts["tp"], counts["fp"], counts["fn"], counts["tn"]).metrics()["f1"]


def _pooled(rows: dict, scenes: list[str], key: str) -> float:
    total = Confusion()
    for s in scenes:
        c = rows[s][key]
        total = total + Confusion(c["tp"], c["fp"], c["fn"], c["tn"])
    return total.metrics()["f1"]


def report(rows: dict) -> dict:
    """Leave-one-scene-out table: per scene the choice made on the others, and pooled F1."""
    scenes = sorted(rows)
    keys = [f"{v}/{r}" for v in VARIANTS for r in RULES]
    total, chosen, out = Confusion(), {}, {"scenes": {}}
    print(f"{'scene':>12} {'pair':>8} {'CVA':>6} {'chosen on the other 12':>24} {'F1':>6}")
    for s in scenes:
        others = [o for o in scenes if o != s]
        best = max(keys, key=lambda k: _pooled(rows, others, k))
        chosen[s] = best
        c = rows[s][best]
        total = total + Confusion(c["tp"], c["fp"], c["fn"], c["tn"])
        out["scenes"][s] = {"chosen": best, "f1": _f1(c), "cva_f1": _f1(rows[s]["cva"])}
        print(f"{s:>12} {'-'.join(m[:3] for m in rows[s]['modalities']):>8} {_f1(rows[s]['cva']):>6.3f} {best:>24} {_f1(c):>6.3f}")
    loso, cva = total.metrics()["f1"], _pooled(rows, scenes, "cva")
    seconds = sum(rows[s]["f5s9/fixed"]["seconds"] for s in scenes)
    mpx = sum(rows[s]["f5s9/fixed"]["pixels"] for s in scenes) / 1e6
    out.update(loso_pooled_f1=loso, cva_pooled_f1=cva, gain=loso - cva, minutes_per_mpx=seconds / 60 / mpx,
               defaults_pooled_f1={k: _pooled(rows, scenes, k) for k in keys})
    print(f"pooled F1: hetero-unsupervised (leave-one-scene-out choice) {loso:.3f}, CVA {cva:.3f}, gain {loso - cva:+.3f}")
    print("pooled F1 of every variant on all 13 (for reading, not for choosing): "
          + ", ".join(f"{k} {v:.3f}" for k, v in out["defaults_pooled_f1"].items()))
    print(f"detect wall time (f5s9, all 13 scenes): {seconds / 60 / mpx:.2f} min per megapixel")
    return out


def main() -> int:
    if not (DATA / "hetero_cd").is_dir():
        print(f"error: {DATA / 'hetero_cd'} is missing (../shared/data)", file=sys.stderr)
        return 2
    rows = measure()
    summary = report(rows)
    (RESULT.parent / "hetero_unsupervised_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
