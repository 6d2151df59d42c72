"""Benchmark: co-registration on the 14 OSCD cities (``detect --coregister``, run.json ``coregistration``).

    python benchmarks/coregistration.py [--cities bercy paris ...] [--fresh]

Per city: the offset measured between its two real dates (OSCD's own misregistration); the offset
measured after planting known shifts in t2's geotransform (pixels untouched), and the error of the
planted shift recovered (measured - native - planted, t1 pixels); for the 10 labelled cities, F1 of
``changedet detect`` (the bundled default model) on the real pair, on the pair with (1.5, -2.25) px
planted, and on both with ``--coregister``. The bundled model is trained on these 10 cities: F1 values
are training-city figures; what this measures is how much of the map a shift costs and how much the
correction gives back. Resumable: one JSON per city in benchmarks/results/coregistration/;
the summary table goes to benchmarks/results/coregistration.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from changedet.evaluate import evaluate_mask
from changedet.io.scene import open_scene
from changedet.pipeline.align import align_pair
from changedet.pipeline.coregistration import measure_offset
from changedet.pipeline.detect import DetectParams, detect_changes
from changedet.testing.misregistration import write_shifted_date

ROOT = Path(__file__).resolve().parents[1]
OSCD = ROOT.parent / "shared" / "data" / "oscd"
RESULTS = ROOT / "benchmarks" / "results" / "coregistration"
PLANTED = [(1.5, -2.25), (-0.6, 0.35), (4.0, 3.0)]
F1_SHIFT = PLANTED[0]


def _measure(t1: Path, t2: Path) -> dict:
    return measure_offset(align_pair(open_scene(t1), open_scene(t2))).to_dict()


def _f1(t1: Path, t2: Path, label: Path, out: Path, correct: bool) -> dict:
    result = detect_changes(t1, t2, out, DetectParams(coregister=correct), overwrite=True)
    return {"f1": round(evaluate_mask(result.path("change_mask.tif"), label)["f1"], 4),
            "seconds": round(result.summary.get("timings", {}).get("total_s", float("nan")), 2)}  # fmt: skip


def city_result(city: str, work: Path) -> dict:
    """Every measurement of one city (see the module docstring)."""
    images = OSCD / "images" / city
    t1, t2 = images / "imgs_1", images / "imgs_2"
    native = _measure(t1, t2)
    row: dict = {"city": city, "native": native, "planted": []}
    for shift in PLANTED:
        moved = write_shifted_date(t2, work / f"{city}_{shift[0]}_{shift[1]}", shift)
        measured = _measure(t1, moved)
        error = None
        if measured["shift_px"] is not None and native["shift_px"] is not None:
            error = [round(m - n - p, 3) for m, n, p in zip(measured["shift_px"], native["shift_px"], shift)]
        row["planted"].append({"shift": list(shift), "measured": measured, "error_px": error})
    label = OSCD / "labels" / city / "cm" / f"{city}-cm.tif"
    if label.exists():
        moved = work / f"{city}_{F1_SHIFT[0]}_{F1_SHIFT[1]}"
        row["f1"] = {
            "real": _f1(t1, t2, label, work / "out", False),
            "real_coregistered": _f1(t1, t2, label, work / "out", True),
            "planted": _f1(t1, moved, label, work / "out", False),
            "planted_coregistered": _f1(t1, moved, label, work / "out", True),
        }
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| city | native offset (px) | conf. | windows agreeing | planted error max (px) | F1 real | F1 real+co | F1 planted | F1 planted+co |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        n = r["native"]
        errors = [abs(e) for p in r["planted"] if p["error_px"] for e in p["error_px"]]
        f1 = r.get("f1", {})
        cells = [f"{f1[k]['f1']:.3f}" if k in f1 else "-" for k in ("real", "real_coregistered", "planted", "planted_coregistered")]
        shift = "-" if n["shift_px"] is None else f"({n['shift_px'][0]:+.2f}, {n['shift_px'][1]:+.2f})"
        worst = f"{max(errors):.3f}" if len(errors) == 2 * len(PLANTED) else f"{max(errors or [np.nan]):.3f} (some untrusted)"
        lines.append(f"| {r['city']} | {shift} | {n['confidence']} | {n['agreeing']}/{n['windows']} | {worst} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cities", nargs="*", default=sorted(p.name for p in (OSCD / "images").iterdir() if p.is_dir()))
    parser.add_argument("--fresh", action="store_true", help="recompute cities that have a result")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for city in args.cities:
        path = RESULTS / f"{city}.json"
        if path.exists() and not args.fresh:
            rows.append(json.loads(path.read_text()))
            continue
        work = Path(tempfile.mkdtemp(prefix=f"coreg-{city}-"))
        try:
            row = city_result(city, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        path.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(f"{city}: native {row['native']['shift_px']} ({row['native']['confidence']}), f1 {row.get('f1')}", flush=True)
    errors = [abs(e) for r in rows for p in r["planted"] if p["error_px"] for e in p["error_px"]]
    f1 = [r["f1"] for r in rows if "f1" in r]
    summary = {
        "planted_shifts": PLANTED,
        "planted_error_px": {"max": max(errors), "median": float(np.median(errors)), "n": len(errors)},
        "f1_mean": {k: round(float(np.mean([f[k]["f1"] for f in f1])), 4) for k in f1[0]} if f1 else {},
        "rows": rows,
    }
    (RESULTS.parent / "coregistration.json").write_text(json.dumps(summary, indent=1))
    print(_table(rows))
    print(f"planted-shift error: max {summary['planted_error_px']['max']:.3f} px, median {summary['planted_error_px']['median']:.3f} px "
          f"over {len(errors)} axis estimates; mean F1 {summary['f1_mean']}")


if __name__ == "__main__":
    main()
