"""Command line: ``changedet detect``, ``evaluate``, ``train``, ``robustness``, ``domain-shift``, ``models``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import TYPE_CHECKING, Sequence

from changedet.failures import ErrorLineParser, comma_list, command_main

if TYPE_CHECKING:
    from changedet.evaluation.runs import EvaluationConfig


def _add_detect(sub: argparse._SubParsersAction) -> None:
    from changedet.detect import DetectParams
    from changedet.predictor import DEFAULT_MODEL

    p = sub.add_parser("detect", help="detect changes between two dates and write georeferenced maps")
    p.add_argument("--t1", required=True, help="date 1: raster file, folder of per-band files, or glob")
    p.add_argument("--t2", required=True, help="date 2: same forms as --t1")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled model (oscd-s2, rgb), registry name or checkpoint path; default {DEFAULT_MODEL}: "
                   "oscd-s2 for scenes with its 13 Sentinel-2 bands, rgb for 3-band scenes, else cva")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default 32)")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: model's, else 0.5)")
    p.add_argument("--crs", default=None, help="target CRS, e.g. EPSG:32631 (default: t1's)")
    p.add_argument("--resolution", type=float, default=None, help="target pixel size in CRS units (default: t1's finest)")
    p.add_argument("--bands", type=comma_list, default=None, help="comma-separated band names or 1-based indexes")
    p.add_argument("--nodata", type=float, default=None, help="nodata value for inputs that declare none")
    p.add_argument("--resampling", default="bilinear", help="resampling for up-sampled bands (default bilinear)")
    p.add_argument("--blend", default="cosine", choices=["cosine", "mean"], help="overlap blending (default cosine)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per model call (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8"],
                   help="inference engine: torch, ONNX Runtime float32, or ONNX Runtime with int8 weights (CPU)")
    p.add_argument("--max-pixels", type=int, default=DetectParams.max_pixels,
                   help=f"refuse common grids larger than this many pixels (default {DetectParams.max_pixels})")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a change mask against a label raster")
    p.add_argument("--pred", required=True, help="change_mask.tif written by detect")
    p.add_argument("--label", required=True, help="label raster (georeferenced, or on the t1 pixel grid)")
    p.add_argument("--change-value", type=int, default=None, help="label value meaning change (default: inferred)")
    p.add_argument("--ignore-value", type=int, action="append", default=None, help="label value to skip (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a change model from a YAML config (configs/train/*.yaml)")
    p.add_argument("--config", required=True, help="training config, e.g. configs/train/oscd.yaml")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")


def _run_train(args: argparse.Namespace) -> int:
    from changedet.train import train_from_config

    overrides: dict = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.no_resume:
        overrides["resume"] = False
    result = train_from_config(args.config, overrides or None)
    pooled = (result.metrics or {}).get("pooled", result.metrics or {})
    print(f"best checkpoint {result.best_checkpoint} (epoch {result.best_epoch}, threshold {result.threshold:.3f})")
    if pooled:
        print("validation " + ", ".join(f"{k} {pooled[k]:.4f}" for k in ("precision", "recall", "f1", "iou", "kappa") if k in pooled))
    return 0


def _run_detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from changedet.detect import DetectParams, detect_changes

    params = DetectParams(
        model=args.model, tile=args.tile, overlap=args.overlap, threshold=args.threshold, crs=args.crs,
        resolution=args.resolution, bands=args.bands, nodata=args.nodata, resampling=args.resampling,
        blend=args.blend, batch_size=args.batch_size, device=args.device, runtime=args.runtime,
        max_pixels=args.max_pixels,
    )
    bar = None

    def on_planned(plan) -> None:
        nonlocal bar
        bar = tqdm(total=len(plan.tiles), unit="tile", desc="detect", disable=args.quiet or not sys.stderr.isatty())

    try:
        result = detect_changes(args.t1, args.t2, args.out, params, args.overwrite, lambda n: bar.update(n), on_planned)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        s = result.summary
        grid = s["grid"]
        print(f"outputs in {result.out_dir}/ ({', '.join(s['outputs'])})")
        print(f"grid {grid['height']}x{grid['width']} px, EPSG:{grid['epsg']}; model {s['model']['name']}, threshold {s['threshold']:.3f}")
        print(
            f"changed {s['counts']['changed_pixels']} of {s['counts']['valid_pixels']} valid px, "
            f"{s['changes']['regions']} regions, {s['changes']['changed_area_ha']:.2f} ha; {s['timings']['total_s']:.2f} s"
        )
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from changedet.evaluate import evaluate_mask

    ignore = set(args.ignore_value) if args.ignore_value else None
    metrics = evaluate_mask(args.pred, args.label, args.change_value, ignore)
    if args.json:  # strict JSON: an undefined metric (no positive pixel) is null, not NaN
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}, indent=2))
    else:
        for key in ("precision", "recall", "f1", "iou", "oa", "kappa"):
            print(f"{key:>9}  {metrics[key]:.4f}")
        print(f"{'pixels':>9}  tp={metrics['tp']} fp={metrics['fp']} fn={metrics['fn']} tn={metrics['tn']}")
        print(f"{'scored':>9}  {metrics['scored_pixels']} px; not scored: {metrics['unscored_pixels']} outside the label "
              f"or on its nodata, {metrics['ignored_pixels']} on ignored label values")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from changedet.models import list_models, model_entry

    for name in list_models():
        entry = model_entry(name)
        print(f"{name:28s} {entry.family:16s} {entry.description.splitlines()[0] if entry.description else ''}")
    return 0


def _floats(value: str) -> list[float]:
    return [float(v) for v in comma_list(value)]


def _add_evaluation_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root (OSCD, LEVIR-CD or pair folders), e.g. ../shared/data/oscd")
    p.add_argument("--out", required=True, help="report folder (report.json, report.md, plot)")
    p.add_argument("--model", action="append", default=None, help="trained checkpoint or bundled name (repeatable; default oscd-s2)")
    p.add_argument("--scenes", type=comma_list, default=None, help="comma-separated labelled scenes (default: the model's validation scenes)")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per model call (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--quiet", action="store_true", help="no per-job progress lines")


def _add_robustness(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robustness", help="F1 under FGSM/PGD attacks per budget and mode (optionally after PGD fine-tuning)")
    _add_evaluation_common(p)
    p.add_argument("--eps", type=_floats, default=[0, 1, 2, 4, 8], help="L-inf budgets in 1/255 reflectance (default 0,1,2,4,8)")
    p.add_argument("--modes", type=comma_list, default=None, help="t1,t2,both (untargeted), hide, fake (default: all)")
    p.add_argument("--methods", type=comma_list, default=None, help="fgsm,pgd (default: both)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10)")
    p.add_argument("--step-size", type=float, default=None, help="PGD step in 1/255 units (default 2.5 eps / steps)")
    p.add_argument("--random-start", action="store_true", help="PGD from a random point of the eps-ball")
    p.add_argument("--adv-finetune", default=None, metavar="OUT.safetensors",
                   help="first PGD-fine-tune the (first) model on its training scenes into this file, then evaluate both")
    p.add_argument("--finetune-steps", type=int, default=200, help="optimiser steps of --adv-finetune (default 200)")


def _add_domain_shift(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("domain-shift", help="F1 and calibration under radiometric/geometric shifts, with AdaBN / histogram matching")
    _add_evaluation_common(p)
    p.add_argument("--shifts", type=comma_list, default=None, help="comma-separated shifts (default: all registered)")
    p.add_argument("--severities", type=_floats, default=[1, 2, 3, 4, 5], help="severities (default 1,2,3,4,5)")
    p.add_argument("--adaptations", type=comma_list, default=None, help="none,adabn,histmatch (default: all)")
    p.add_argument("--dates", default="t2", choices=["t2", "both"], help="dates the shift applies to (default t2)")


def _run_stage(config: EvaluationConfig, args: argparse.Namespace) -> int:
    from changedet.evaluation.report import check_out_dir, markdown, write_report
    from changedet.evaluation.runs import run_evaluation
    from changedet.io.outdir import check_out_dir as check_not_an_input

    check_not_an_input(args.out, [args.data])
    check_out_dir(config.stage, args.out, args.overwrite)
    report = run_evaluation(config, None if args.quiet else lambda job: print(f"{job.checkpoint} {job.scene} {job.setting}", file=sys.stderr))
    paths = write_report(report, args.out, args.overwrite)
    print(markdown(report))
    print(f"report in {', '.join(str(p) for p in paths.values())}")
    return 0


def _common_config(args: argparse.Namespace) -> dict:
    return {"checkpoints": args.model or ["oscd-s2"], "data": args.data, "scenes": args.scenes, "tile": args.tile,
            "overlap": args.overlap, "batch_size": args.batch_size, "device": args.device}


def _run_robustness(args: argparse.Namespace) -> int:
    from changedet.evaluation.runs import RobustnessConfig

    common = _common_config(args)
    if args.adv_finetune:
        from changedet.evaluation.defence import finetune_checkpoint

        finetune_checkpoint(common["checkpoints"][0], args.adv_finetune, args.data, steps=args.finetune_steps, device=args.device)
        common["checkpoints"] = [*common["checkpoints"], args.adv_finetune]
    options = {k: getattr(args, k) for k in ("eps", "modes", "methods", "steps", "step_size", "random_start") if getattr(args, k) is not None}
    return _run_stage(RobustnessConfig(**common, **options), args)


def _run_domain_shift(args: argparse.Namespace) -> int:
    from changedet.evaluation.runs import DomainShiftConfig

    options = {k: getattr(args, k) for k in ("shifts", "severities", "adaptations", "dates") if getattr(args, k) is not None}
    return _run_stage(DomainShiftConfig(**_common_config(args), **options), args)


def build_parser() -> argparse.ArgumentParser:
    """The ``changedet`` argument parser."""
    parser = ErrorLineParser(prog="changedet", description="Change detection for two co-located rasters. "
                             "--debug (anywhere on the command line) prints the traceback of a failure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ErrorLineParser)
    _add_detect(sub)
    _add_evaluate(sub)
    _add_train(sub)
    _add_robustness(sub)
    _add_domain_shift(sub)
    sub.add_parser("models", help="list registered models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status with one ``error: <reason>`` line on stderr
    (statuses in :mod:`changedet.failures`: 1 system, 2 bad input, 3 internal, 75 busy, 130 interrupted)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    runners = {"detect": _run_detect, "evaluate": _run_evaluate, "train": _run_train, "models": _run_models,
               "robustness": _run_robustness, "domain-shift": _run_domain_shift}

    def work(args: list[str]) -> int:
        parsed = build_parser().parse_args(args)
        return runners[parsed.command](parsed)

    return command_main(argv, work)


if __name__ == "__main__":
    sys.exit(main())
