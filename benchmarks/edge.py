"""Benchmark: torch vs ONNX Runtime float32 vs ONNX Runtime int8 weights, with the bundled OSCD model.

    python benchmarks/edge.py [--cities bercy bordeaux hongkong]

For each runtime: detect on each validation city (the bundled model's held-out cities), pooled F1
at the model's threshold, time inside the model, and the ratio to torch.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from changedet.checkpoint import read_metadata
from changedet.pipeline.detect import MASK, DetectParams, detect_changes
from changedet.evaluate import evaluate_mask
from changedet.metrics import Confusion
from changedet.weights import bundled_checkpoint

OSCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "oscd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cities", nargs="+", default=None, help="default: the bundled model's validation cities")
    parser.add_argument("--oscd", type=Path, default=OSCD)
    args = parser.parse_args()
    cities = args.cities or read_metadata(bundled_checkpoint("oscd-s2"))["split"]["val"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in ("torch", "onnx", "onnx-int8"):
            pooled, model_s = Confusion(), 0.0
            for city in cities:
                root = args.oscd / "images" / city
                out = Path(tmp) / runtime / city
                result = detect_changes(root / "imgs_1", root / "imgs_2", out, DetectParams(model="oscd-s2", runtime=runtime))
                m = evaluate_mask(result.path(MASK), args.oscd / "labels" / city / "cm" / f"{city}-cm.tif")
                pooled += Confusion.from_metrics(m)
                model_s += result.summary["timings"]["model_s"]
            rows.append((runtime, pooled.metrics()["f1"], model_s))
    base_f1, base_s = rows[0][1], rows[0][2]
    print(f"{'runtime':>10} {'pooled F1':>9} {'ΔF1':>8} {'model s':>8} {'time ratio':>10}   cities: {', '.join(cities)}")
    for runtime, f1, seconds in rows:
        print(f"{runtime:>10} {f1:>9.4f} {f1 - base_f1:>+8.4f} {seconds:>8.2f} {seconds / base_s:>10.2f}")


if __name__ == "__main__":
    main()
