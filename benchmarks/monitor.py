"""Monitoring on a generated time series of the bundled Bercy date: how well planted changes are dated, what a
cloud does with and without the cloud mask, and what an incremental step costs against a full run.

    python benchmarks/monitor.py            # -> benchmarks/results/monitor.json (about 3 min on 2 cores)

The catalog is tests/test_monitor.py's: changes A (2017-03-06) and B (2017-05-05) planted as the content
of another place, a cloud over 2017-04-05 and 2017-05-05, one date too cloudy (2017-03-20). Each setting is
one ``changedet monitor`` process (wall time and peak RSS of the process).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_monitor import A, B, BBOX, CLOUD, DATES  # noqa: E402

from changedet.pipeline.grid import Grid  # noqa: E402
from changedet.testing.timeseries import write_time_series  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "monitor.json"


def _run(catalog: Path, out: Path, *extra: str) -> dict:
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "changedet.cli", "monitor", "--stac", str(catalog), "--bbox", BBOX, "--out", str(out),
                    "--quiet", *extra], check=True)  # fmt: skip
    return {"wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)}


def _scores(out: Path, source: Grid) -> dict:
    with rasterio.open(out / "first_change_date.tif") as ds:
        first, grid = ds.read(1), Grid.from_dataset(ds)
    w = source.window_of(grid)
    crop = lambda m: m[int(w.row_off) : int(w.row_off + w.height), int(w.col_off) : int(w.col_off + w.width)]  # noqa: E731
    shape = (source.height, source.width)
    in_a, in_b = crop(A.mask(shape)), crop(B.mask(shape))
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    cloud = crop(np.hypot(rows + 0.5 - CLOUD[0], cols + 0.5 - CLOUD[1]) < CLOUD[2])
    confirmed = (first > 0) & (first != 4294967295)
    return {"A_dated_right": round(float((first[in_a] == 20170306).mean()), 4), "A_dated_wrong": int((confirmed & in_a & (first != 20170306)).sum()),
            "B_dated_right": round(float((first[in_b] == 20170505).mean()), 4), "B_dated_wrong": int((confirmed & in_b & (first != 20170505)).sum()),
            "confirmed_outside_planted_px": int((confirmed & ~in_a & ~in_b).sum()), "confirmed_under_cloud_px": int((confirmed & cloud & ~in_a & ~in_b).sum()),
            "grid_px": int(first.size)}  # fmt: skip


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="monitor-bench-"))
    try:
        catalog = write_time_series(REPO / "data/sample/oscd_bercy/imgs_1", work / "catalog", DATES)
        with rasterio.open(next((catalog.parent / "2017-01-05" / "bands").glob("*B04.tif"))) as ds:
            source = Grid.from_dataset(ds)
        results = {}
        for name, extra in {"cloud-mask auto, persistence 2": ["--max-cloud", "0.5"],
                            "cloud-mask none, persistence 2": ["--cloud-mask", "none"],
                            "cloud-mask auto, persistence 1": ["--max-cloud", "0.5", "--persistence", "1"],
                            "cloud-mask auto, median:3": ["--max-cloud", "0.5", "--baseline", "median:3"]}.items():  # fmt: skip
            out = work / name.replace(" ", "_").replace(",", "").replace(":", "")
            results[name] = {**_run(catalog, out, *extra), **_scores(out, source)}
            print(name, results[name], flush=True)
        out = work / "incremental"
        steps = {"first 6 dates": _run(catalog, out, "--max-cloud", "0.5", "--end", "2017-05-05"),
                 "7th date only": _run(catalog, out, "--max-cloud", "0.5"),
                 "nothing new": _run(catalog, out, "--max-cloud", "0.5")}  # fmt: skip
        full = work / "cloud-mask_auto_persistence_2"
        names = sorted(p.name for p in full.iterdir() if p.is_file())
        steps["identical_to_full_run"] = all((full / n).read_bytes() == (out / n).read_bytes() for n in names)
        results["incremental"] = steps
        print("incremental", steps)
        RESULT.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {RESULT}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
