"""Benchmark: cloud masks (``detect --cloud-mask``) — false alarms on clear scenes, a planted cloud.

    python benchmarks/clouds.py

1. The 14 OSCD cities' 28 dates are (close to) cloud-free: the fraction s2cloudless flags in each is
   its false-alarm rate on bright cities (roofs, sand, greenhouses). Printed per date for probability
   thresholds 0.4 (s2cloudless's default), 0.5, 0.65 (:data:`S2CLOUDLESS_THRESHOLD`) and 0.8, after its
   smoothing and dilation, on the 60 m coarse grid the pipeline uses.
2. On the bundled sample (bercy), a thick cloud (disk of 40 px at 10 m) planted in t2: the fraction of
   the disk masked, and F1 against the label without a mask, with ``--cloud-mask s2cloudless``, and of
   the clean pair (the bundled model saw bercy in training: F1 values show what a cloud costs and the
   mask gives back, not skill on unseen scenes).

Results: benchmarks/results/clouds.json.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from changedet.evaluate import evaluate_mask
from changedet.io.scene import open_scene
from changedet.pipeline.align import align_pair, read_scene_on_grid
from changedet.pipeline.clouds import S2CLOUDLESS_BANDS, coarse_grid, s2cloudless_mask
from changedet.pipeline.detect import DetectParams, detect_changes
from changedet.testing.clouds import write_clouded_date

ROOT = Path(__file__).resolve().parents[1]
OSCD = ROOT.parent / "shared" / "data" / "oscd"
SAMPLE = ROOT / "data" / "sample" / "oscd_bercy"
RESULT = ROOT / "benchmarks" / "results" / "clouds.json"
THRESHOLDS = (0.4, 0.5, 0.65, 0.8)


def false_alarms(folder: Path) -> list[float]:
    """Fraction of valid coarse pixels s2cloudless flags in one date, per threshold of :data:`THRESHOLDS`."""
    scene = open_scene(folder, list(S2CLOUDLESS_BANDS))
    pair = align_pair(scene, scene)
    coarse, _ = coarse_grid(pair.grid, scene)
    values, valid = read_scene_on_grid(scene, pair, coarse, "bilinear")
    return [float(m.sum() / max(1, valid.sum())) for m in s2cloudless_mask(values, valid, THRESHOLDS)]


def planted_cloud() -> dict:
    """Disk recall of the mask and F1 without/with it on the sample with a cloud planted in t2."""
    label = next((SAMPLE / "cm").glob("*.tif"))
    with tempfile.TemporaryDirectory() as tmp:
        t2 = Path(tmp) / "t2"
        disk = write_clouded_date(SAMPLE / "imgs_2", t2, (200.0, 180.0), 40.0)
        row = {}
        for name, second, params in (("clean", SAMPLE / "imgs_2", DetectParams()), ("cloud, no mask", t2, DetectParams()),
                                     ("cloud, s2cloudless", t2, DetectParams(cloud_mask="s2cloudless"))):  # fmt: skip
            result = detect_changes(SAMPLE / "imgs_1", second, Path(tmp) / name, params)
            row[name] = {"f1": evaluate_mask(result.path("change_mask.tif"), label)["f1"],
                         "cloud_fraction_t2": result.summary.get("cloud_fraction", {}).get("t2")}  # fmt: skip
            if params.cloud_mask != "none":
                import rasterio

                with rasterio.open(result.path("change_mask.tif")) as ds:
                    row[name]["disk_masked"] = float((ds.read(1)[disk] == ds.nodata).mean())
    return row


def main() -> None:
    rows = {}
    if OSCD.is_dir():
        for city in sorted(p.name for p in (OSCD / "images").iterdir() if p.is_dir()):
            for date in ("imgs_1", "imgs_2"):
                rows[f"{city} {date[-1]}"] = false_alarms(OSCD / "images" / city / date)
    planted = planted_cloud()
    RESULT.write_text(json.dumps({"thresholds": THRESHOLDS, "false_alarms": rows, "planted": planted}, indent=1))
    print("| date | " + " | ".join(f"flagged at {t}" for t in THRESHOLDS) + " |")
    print("|---|" + "---|" * len(THRESHOLDS))
    for name, fractions in rows.items():
        print(f"| {name} | " + " | ".join(f"{f:.3f}" for f in fractions) + " |")
    if rows:
        table = np.array(list(rows.values()))
        print("| median | " + " | ".join(f"{v:.3f}" for v in np.median(table, 0)) + " |")
        print("| max | " + " | ".join(f"{v:.3f}" for v in table.max(0)) + " |")
    else:
        print(f"({OSCD} absent: no false-alarm table)")
    print("\n| sample bercy | F1 | t2 cloud fraction | planted disk masked |\n|---|---|---|---|")
    for name, row in planted.items():
        fraction = "-" if row["cloud_fraction_t2"] is None else f"{row['cloud_fraction_t2']:.3f}"
        masked = f"{row['disk_masked']:.3f}" if "disk_masked" in row else "-"
        print(f"| {name} | {row['f1']:.4f} | {fraction} | {masked} |")

if __name__ == "__main__":
    main()
