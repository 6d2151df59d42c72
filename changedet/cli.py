"""Command line: ``changedet detect``, ``monitor``, ``evaluate``, ``train``, ``quantize``, ``prune``, ``stac-search``, ``robustness``, ``domain-shift``, ``models``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Sequence

from changedet.failures import ErrorLineParser, command_main


def _add_detect(sub: argparse._SubParsersAction) -> None:
    from changedet.options import add_model_options
    from changedet.pipeline.params import DetectParams

    p = sub.add_parser("detect", help="detect changes between two dates and write georeferenced maps")
    p.add_argument("--t1", required=True, help="date 1: raster file, folder of per-band files, glob, raster URL "
                   "(http(s)://, s3://, gs://: range reads) or STAC Item (.json path or URL)")
    p.add_argument("--t2", required=True, help="date 2: same forms as --t1")
    p.add_argument("--out", required=True, help="output folder")
    add_model_options(p, DetectParams)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    from changedet.monitoring.params import NOT_MONITOR_OPTIONS, MonitorParams
    from changedet.options import add_model_options

    p = sub.add_parser("monitor", help="compare every new clear acquisition of a STAC catalog over an area with a "
                       "baseline; confirmed changes, their first date, per-zone hectares, alerts (incremental)")
    p.add_argument("--out", required=True, help="output folder; its state makes a rerun process only new acquisitions")
    add_model_options(p, MonitorParams, exclude=NOT_MONITOR_OPTIONS)
    p.add_argument("--quiet", action="store_true", help="no per-date lines or summary")


def _run_monitor(args: argparse.Namespace) -> int:
    from changedet.monitoring.params import MonitorParams
    from changedet.monitoring.run import monitor_area
    from changedet.options import given_values

    params = MonitorParams(**given_values(args, MonitorParams))

    def report(row: dict) -> None:
        if row["status"] == "compared":
            print(f"{row['date']}  compared  changed {row['changed_ha']:.2f} ha, confirmed {row['confirmed_ha']:.2f} ha "
                  f"(+{row['new_confirmed_ha']:.2f}), valid {row['valid_fraction']:.0%}", file=sys.stderr)
        else:
            print(f"{row['date']}  {row['status']}{': ' + row['reason'] if row['reason'] else ''}", file=sys.stderr)

    result = monitor_area(args.out, params, None if args.quiet else report)
    for alert in result.alerts:
        print(f"alert: zone {alert['zone']} confirmed {alert['confirmed_ha']:.2f} ha > {alert['limit_ha']:g} ha on {alert['date']}")
    if not args.quiet:
        print(f"{len(result.new_rows)} new acquisition(s), {len(result.timeline)} in all; outputs in {result.out_dir}/")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a change mask against a label raster")
    p.add_argument("--pred", required=True, help="change_mask.tif written by detect")
    p.add_argument("--label", required=True, help="label raster (georeferenced, or on the t1 pixel grid)")
    p.add_argument("--change-value", type=int, default=None, help="label value meaning change (default: inferred)")
    p.add_argument("--ignore-value", type=int, action="append", default=None, help="label value to skip (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_stac_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stac-search", help="save the items of a STAC API search as JSON files, to give as --t1/--t2")
    p.add_argument("--api", required=True, help="STAC API root URL (with /search)")
    p.add_argument("--collection", required=True, action="append", help="collection id (repeatable)")
    p.add_argument("--bbox", type=_bbox, default=None, help="west,south,east,north in WGS84 degrees")
    p.add_argument("--datetime", default=None, help="a date, or a range such as 2020-01-01/2020-12-31")
    p.add_argument("--max-cloud", type=float, default=None, help="leave out items above this eo:cloud_cover fraction (0-1)")
    p.add_argument("--limit", type=int, default=100, help="at most this many items")
    p.add_argument("--out", required=True, help="folder for the item files (<id>.json)")


def _bbox(text: str) -> tuple[float, float, float, float]:
    from changedet.options import comma_floats
    from changedet.pipeline.grid import wgs84_bbox

    try:
        return wgs84_bbox(comma_floats(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_stac_search(args: argparse.Namespace) -> int:
    from changedet.io.stac import save_item, search_items

    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings: the error line says what failed
    items = search_items(args.api, args.collection, args.bbox, args.datetime, args.max_cloud, args.limit)
    for item in items:
        cloud = item.properties.get("eo:cloud_cover")
        print(f"{save_item(item, args.out)}\t{item.datetime.isoformat() if item.datetime else ''}\t"
              f"{'' if cloud is None else f'{float(cloud):.1f}% cloud'}")
    print(f"{len(items)} item(s) in {args.out}", file=sys.stderr)
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from changedet.pipeline.quantization import DEFAULT_CALIBRATION_TILES

    p = sub.add_parser("quantize", help="write a checkpoint's int8 graph for --runtime onnx-int8, calibrated on its training scenes")
    p.add_argument("--model", required=True, help="checkpoint (.safetensors) or bundled model name")
    p.add_argument("--calibrate", nargs=2, action="append", required=True, metavar=("T1", "T2"),
                   help="a calibration pair (same forms as detect's --t1/--t2), the model's training scenes; repeat for more")
    p.add_argument("--tiles", type=int, default=DEFAULT_CALIBRATION_TILES, help="tiles per pair, spread over the scene "
                   f"(default {DEFAULT_CALIBRATION_TILES})")
    p.add_argument("--tile", type=int, default=None, help="calibration tile side (default: detect's --tile default)")
    p.add_argument("--out", default=None, help="where to write the graph (default: beside the checkpoint, <stem>.int8.onnx, "
                   "where --runtime onnx-int8 looks)")


def _run_quantize(args: argparse.Namespace) -> int:
    from changedet.pipeline.quantization import quantize_checkpoint

    graph = quantize_checkpoint(args.model, [tuple(p) for p in args.calibrate], args.tiles, args.out, args.tile)
    print(f"int8 graph {graph.path} ({graph.path.stat().st_size / 2**20:.1f} MiB), calibrated on {graph.calibration['tiles']} tiles "
          f"of {len(args.calibrate)} pair(s)")
    return 0


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="keep a share of every convolution's filters (largest L1 norm); fine-tune with train --init-weights")
    p.add_argument("--model", required=True, help="checkpoint (.safetensors) or bundled model name")
    p.add_argument("--keep", type=float, default=0.5, help="share of each convolution's filters kept (default 0.5)")
    p.add_argument("--out", required=True, help="the pruned checkpoint (.safetensors)")


def _run_prune(args: argparse.Namespace) -> int:
    from changedet.train.pruning import prune_checkpoint

    record = prune_checkpoint(args.model, args.out, args.keep)
    print(f"pruned checkpoint {args.out}: {record['parameters_before']} -> {record['parameters_after']} parameters; "
          f"fine-tune it: changedet train --config CONFIG --init-weights {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a change model from a YAML config (configs/train/*.yaml)")
    p.add_argument("--config", required=True, help="training config, e.g. configs/train/oscd.yaml")
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    p.add_argument("--init-weights", default=None, help="fine-tune this checkpoint (e.g. from changedet prune): its "
                   "architecture replaces the config's model")


def _run_train(args: argparse.Namespace) -> int:
    from changedet.train import train_from_config

    overrides: dict = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.output_dir is not None:
        overrides["output_dir"] = args.output_dir
    if args.no_resume:
        overrides["resume"] = False
    if args.init_weights is not None:
        overrides["init_weights"] = args.init_weights
    result = train_from_config(args.config, overrides or None)
    pooled = (result.metrics or {}).get("pooled", result.metrics or {})
    print(f"best checkpoint {result.best_checkpoint} (epoch {result.best_epoch}, threshold {result.threshold:.3f})")
    if pooled:
        print("validation " + ", ".join(f"{k} {pooled[k]:.4f}" for k in ("precision", "recall", "f1", "iou", "kappa") if k in pooled))
    return 0


def _run_detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from changedet.options import given_values
    from changedet.pipeline.detect import DetectParams, detect_changes

    params = DetectParams(**given_values(args, DetectParams))
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


def _add_evaluation_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="report folder (report.json, report.md, plot)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--quiet", action="store_true", help="no per-job progress lines")


def _add_stages(sub: argparse._SubParsersAction) -> None:
    from changedet.evaluation.stages import add_stage_parsers

    add_stage_parsers(sub, _add_evaluation_common)


def _run_stage(args: argparse.Namespace) -> int:
    from changedet.evaluation.report import check_out_dir, markdown, write_report
    from changedet.evaluation.runs import run_evaluation
    from changedet.evaluation.stages import stage_config
    from changedet.io.outdir import check_out_dir as check_not_an_input

    config = stage_config(args.command, args)
    check_not_an_input(args.out, [args.data])
    check_out_dir(config.stage, args.out, args.overwrite)
    report = run_evaluation(config, None if args.quiet else lambda job: print(f"{job.checkpoint} {job.scene} {job.setting}", file=sys.stderr))
    paths = write_report(report, args.out, args.overwrite)
    print(markdown(report))
    print(f"report in {', '.join(str(p) for p in paths.values())}")
    return 0


def build_parser(stages: bool = True) -> argparse.ArgumentParser:
    """The ``changedet`` argument parser (without the evaluation stages' commands when ``stages`` is
    False: their registry imports the evaluation package, and torch, which a detect may not need)."""
    parser = ErrorLineParser(prog="changedet", description="Change detection for two co-located rasters. "
                             "--debug (anywhere on the command line) prints the traceback of a failure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ErrorLineParser)
    _add_detect(sub)
    _add_monitor(sub)
    _add_evaluate(sub)
    _add_train(sub)
    _add_quantize(sub)
    _add_prune(sub)
    _add_stac_search(sub)
    if stages:
        _add_stages(sub)
    sub.add_parser("models", help="list registered models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status with one ``error: <reason>`` line on stderr
    (statuses in :mod:`changedet.failures`: 1 system, 2 bad input, 3 internal, 75 busy, 130 interrupted)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    runners = {"detect": _run_detect, "evaluate": _run_evaluate, "train": _run_train, "models": _run_models,
               "stac-search": _run_stac_search, "monitor": _run_monitor, "quantize": _run_quantize, "prune": _run_prune}

    def work(args: list[str]) -> int:
        command = next((a for a in args if not a.startswith("-")), None)
        parsed = build_parser(stages=command not in runners).parse_args(args)
        return runners.get(parsed.command, _run_stage)(parsed)  # the others are evaluation stages

    return command_main(argv, work)


if __name__ == "__main__":
    sys.exit(main())
