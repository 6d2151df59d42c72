"""Benchmark: adversarial robustness and domain shift of the bundled OSCD model on its validation cities.

    python benchmarks/robustness.py [--scenes bercy bordeaux hongkong] [--steps 5] [--refit]

1. FGSM/PGD (random start) per ε (0, 1, 2, 4, 8 /255 reflectance) and mode (t1/t2/both untargeted, hide,
   fake) on the bundled oscd-s2 and oscd-s2-robust, on --scenes. Both are trained on every labelled OSCD
   city: these are training-city figures; the unseen-city ones are ``benchmarks/robust_oscd.py``'s;
2. every domain shift at the top severity (5) on t2, without adaptation, with AdaBN and with histogram
   matching (t2 onto t1), F1 and ECE;
3. cross-domain: a 6-band model (B02 B03 B04 B08 B11 B12) trained briefly on the same 7 OSCD cities,
   tested on its OSCD validation cities and on Landsat-7 Taizhou (sparse labels; ETM+ 1 2 3 4 5 7),
   without adaptation, with histogram matching onto the OSCD training distribution, with AdaBN, and both.

Metrics are pooled over --scenes at each checkpoint's threshold rule.
Reports (report.json, report.md, PNG) go to benchmarks/_work/{robustness,domain_shift}/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from changedet.checkpoint import read_metadata
from changedet.evaluation.adaptation import adabn, match_scene, reference_quantiles
from changedet.evaluation.calibration import histogram_ece
from changedet.evaluation.cross_domain import ETM_TO_S2, taizhou_scene
from changedet.evaluation.loading import load_model, open_labelled_scenes
from changedet.evaluation.report import markdown, write_report
from changedet.evaluation import DomainShiftConfig, RobustnessConfig
from changedet.evaluation.runs import run_evaluation
from changedet.train import load_train_config, train_from_config
from changedet.pipeline.validation import evaluate_scenes
from changedet.weights import bundled_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OSCD = ROOT.parent / "shared" / "data" / "oscd"
TAIZHOU = ROOT.parent / "shared" / "data" / "landsat" / "taizhou"
WORK = ROOT / "benchmarks" / "_work"


def adversarial(scenes: list[str], steps: int) -> None:
    """The bundled oscd-s2 and oscd-s2-robust (when bundled) under FGSM/PGD on ``scenes``."""
    checkpoints = [name for name in ("oscd-s2", "oscd-s2-robust") if bundled_checkpoint(name) is not None]
    cfg = RobustnessConfig(checkpoints=checkpoints, data=str(OSCD), scenes=scenes, steps=[steps], random_start=True)
    report = run_evaluation(cfg)
    write_report(report, WORK / "robustness", overwrite=True)
    print(markdown(report))


def domain_shift(scenes: list[str]) -> None:
    cfg = DomainShiftConfig(data=str(OSCD), scenes=scenes, severities=[5])
    report = run_evaluation(cfg)
    write_report(report, WORK / "domain_shift", overwrite=True)
    print(markdown(report))


def cross_domain(refit: bool) -> None:
    out = WORK / "cross_domain_s2_6band"
    overrides = {
        "data": {"root": str(OSCD), "bands": list(ETM_TO_S2), "patch_size": 64, "samples_per_epoch": 384},
        "model": {"config": {"base_channels": 8, "dropout": 0.2}},
        "epochs": 3, "output_dir": str(out), "progress": False, "resume": not refit,
    }  # fmt: skip
    if refit or not (out / "best.safetensors").is_file():
        train_from_config(load_train_config(ROOT / "configs" / "train" / "oscd_bundled.yaml", overrides=overrides))
    loaded = load_model(str(out / "best.safetensors"))
    split = loaded.spec.metadata["split"]
    train = open_labelled_scenes(OSCD, split["train"], loaded.bands)
    val = open_labelled_scenes(OSCD, split["val"], loaded.bands)
    target = taizhou_scene(TAIZHOU, WORK)
    matched = match_scene(target, reference_quantiles(train))
    rows = [("OSCD val (source)", loaded.model, val)]
    rows += [("Taizhou, none", loaded.model, [target]), ("Taizhou, histmatch→OSCD", loaded.model, [matched])]
    rows += [("Taizhou, AdaBN", adabn(loaded.model, [target], loaded.normalization), [target])]
    rows += [("Taizhou, histmatch+AdaBN", adabn(loaded.model, [matched], loaded.normalization), [matched])]
    print(f"## cross-domain: 6-band FC-Siam-diff (OSCD {', '.join(split['train'])}) -> Landsat-7 Taizhou "
          f"(threshold {loaded.threshold:.3f} tuned on OSCD {', '.join(split['val'])})\n")  # fmt: skip
    print("| test set | F1 | IoU | precision | recall | ECE |\n|---|---|---|---|---|---|")
    for name, model, scenes in rows:
        result = evaluate_scenes(model, scenes, loaded.normalization)
        m = result.metrics(loaded.threshold)["pooled"]
        cells = [f"{m[k]:.4f}" if m[k] is not None else "–" for k in ("f1", "iou", "precision", "recall")]
        print(f"| {name} | {' | '.join(cells)} | {histogram_ece(result.pooled):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=["bercy", "bordeaux", "hongkong"], help="OSCD cities to evaluate on")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps of the evaluation attacks")
    parser.add_argument("--refit", action="store_true", help="train the cross-domain model again even if it exists")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(bundled_checkpoint("oscd-s2"))
    val = (meta.get("split") or {}).get("val") or []
    print(f"bundled model {meta['model']}; its validation cities: {', '.join(val) or 'none (trained on every labelled city)'}; "
          f"evaluated on {', '.join(args.scenes)}\n")  # fmt: skip
    start = time.perf_counter()
    for name, stage in (("adversarial", lambda: adversarial(args.scenes, args.steps)),
                        ("domain shift", lambda: domain_shift(args.scenes)), ("cross-domain", lambda: cross_domain(args.refit))):  # fmt: skip
        t = time.perf_counter()
        stage()
        print(f"[{name}: {time.perf_counter() - t:.0f} s]\n")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
