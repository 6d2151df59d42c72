"""The outputs of a detect run: their names, nodata values, and how they are written.

:func:`write_outputs` blends the stored tile predictions into COGs on the common grid, writes the QGIS
styles, the polygons, ``run.json``, ``report.html`` and ``quicklook.png`` inside a hidden staging folder, and moves
everything into the output folder only when all of them exist (:class:`~changedet.io.writers.OutputStaging`).
The CLI and the Prefect flow both write exactly :data:`~changedet.pipeline.output_table.OUTPUT_NAMES`
(what each file is: :mod:`changedet.pipeline.output_table`).
"""

from __future__ import annotations

import json
import math
import platform
import resource
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio

import changedet
from changedet.errors import ChangeDetError, InputError
from changedet.io.polygons import polygonize_mask
from changedet.io.zones import read_zones, write_zones, zone_statistics
from changedet.io.styles import write_mask_style, write_probability_style
from changedet.io.writers import BlockRasterWriter, OutputStaging, write_cog, write_text
from changedet.metrics import ProbabilityHistogram
from changedet.pipeline.mosaic import StreamingMosaic
from changedet.pipeline.output_table import (  # noqa: F401 - the output table, re-exported for writers' callers
    CERTIFIED_RADIUS, DIFFERENCE, FLOAT_NODATA, MASK, MASK_NODATA, MASK_STYLE, OUTPUT_NAMES, POLYGONS, PROBABILITY,
    PROBABILITY_STYLE, QUICKLOOK, RASTERS, REPORT_HTML, RUN_JSON, ZONES_CSV, output_names, run_rasters,
)
from changedet.pipeline.smoothing import ABSTAIN
from changedet.pipeline.params import DetectParams
from changedet.pipeline.planning import RunPlan, open_tile_store
from changedet.pipeline.postprocess import drop_small_regions, scene_threshold
from changedet.pipeline.tilestore import TileStore
from changedet.runtime.memory import release_freed_memory

def _blend(plan: RunPlan, store: TileStore, sink: Callable[[int, np.ndarray, np.ndarray], None]) -> int:
    """Blend the stored tiles in row order into ``sink(row_off, values, valid)``; returns the tiles skipped (no valid pixel)."""
    mosaic = StreamingMosaic.of(plan.params.tiling, plan.pair.grid.shape, plan.tiles, 2, sink)
    skipped = 0
    for tile in plan.tiles:
        values, valid = store.read(tile.index)
        if valid.any():
            mosaic.add(tile, values, valid)
        else:
            mosaic.skip(tile)
            skipped += 1
    return skipped


def _scene_threshold(plan: RunPlan, store: TileStore) -> float:
    """The threshold of the run's rule: the plan's fixed one, or Otsu's of the blended probability."""
    if plan.params.threshold_rule != "otsu":
        return plan.threshold
    histogram = ProbabilityHistogram()

    def sink(row_off: int, values: np.ndarray, valid: np.ndarray) -> None:
        histogram.update(values[0], np.zeros(valid.shape, bool), valid)

    _blend(plan, store, sink)
    return scene_threshold("otsu", plan.threshold, histogram)


def _drop_small_regions(path: Path, min_pixels: int) -> dict[str, int]:
    """Rewrite the scratch mask at ``path`` without its regions of fewer than ``min_pixels`` pixels."""
    with rasterio.open(path, "r+") as ds:
        band = ds.read(1)
        mask, dropped = drop_small_regions(band == 1, min_pixels)
        if dropped:
            ds.write(np.where(band == MASK_NODATA, MASK_NODATA, mask).astype(np.uint8), 1)
    return {"changed_pixels": int(mask.sum()), "dropped_regions": dropped}


def _mosaic_to_scratch(plan: RunPlan, store: TileStore, paths: dict[str, Path], threshold: float) -> dict[str, int]:
    grid, smoothing = plan.pair.grid, plan.smoothing
    writers = {o.name: BlockRasterWriter(paths[o.name], grid, o.dtype, o.nodata) for o in run_rasters(smoothing is not None)}
    counts = {"valid_pixels": 0, "changed_pixels": 0, "tiles": len(plan.tiles), "skipped_tiles": 0}
    if smoothing is not None:
        counts["abstained_pixels"] = 0

    def sink(row_off: int, values: np.ndarray, valid: np.ndarray) -> None:
        prob, diff = values
        if smoothing is None:
            mask = (prob >= threshold).astype(np.uint8)
        else:  # the vote fraction: certified majority or abstain
            mask, radius = smoothing.certify(prob)
            writers[CERTIFIED_RADIUS].write_rows(row_off, np.where(valid, radius, FLOAT_NODATA))
            counts["abstained_pixels"] += int((valid & (mask == ABSTAIN)).sum())
        changed = valid & (mask == 1)
        writers[PROBABILITY].write_rows(row_off, np.where(valid, prob, FLOAT_NODATA))
        writers[DIFFERENCE].write_rows(row_off, np.where(valid, diff, FLOAT_NODATA))
        writers[MASK].write_rows(row_off, np.where(valid, mask, MASK_NODATA).astype(np.uint8))
        counts["valid_pixels"] += int(valid.sum())
        counts["changed_pixels"] += int(changed.sum())

    try:
        counts["skipped_tiles"] = _blend(plan, store, sink)
    finally:
        for w in writers.values():
            w.discard()
    if counts["valid_pixels"] == 0:
        raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    for w in writers.values():
        w.close()
    return counts


def _polygons(staging: OutputStaging, timings: dict[str, float]) -> dict[str, Any]:
    start = time.perf_counter()
    n, area = polygonize_mask(staging.path(MASK), staging.path(PROBABILITY), staging.path(POLYGONS))
    timings["polygons_s"] = time.perf_counter() - start
    return {"regions": n, "changed_area_m2": area, "changed_area_ha": area / 1e4}


def _zones(plan: RunPlan, staging: OutputStaging, timings: dict[str, float]) -> list[dict[str, Any]]:
    start = time.perf_counter()
    zones = read_zones(plan.params.zones, plan.pair.grid)
    rows = zone_statistics(zones, plan.pair.grid, staging.path(MASK), staging.path(PROBABILITY), MASK_NODATA)
    write_zones(zones, rows, staging.path(ZONES_CSV), staging.path(POLYGONS))
    timings["zones_s"] = time.perf_counter() - start
    return rows


def _versions() -> dict[str, str]:
    return {
        "changedet": changedet.__version__,
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "onnxruntime": metadata.version("onnxruntime"),
        "timm": metadata.version("timm"),
        "segmentation_models_pytorch": metadata.version("segmentation-models-pytorch"),
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "numpy": np.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, which starts afresh at ``exec``; ``ru_maxrss`` keeps the
    parent's peak across fork + exec (a run started by a 3 GB process would report 3 GB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _strict_json(value: Any) -> Any:
    """``value`` with non-finite floats as strings (``"nan"``, ``"inf"``): ``run.json`` stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def write_outputs(
    plan: RunPlan,
    store_root: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    inputs: dict[str, str] | None = None,
    timings: dict[str, float] | None = None,
    started: float | None = None,
    extra_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Blend stored tiles into COGs, polygonise, write ``run.json``; move all into ``out_dir``.

    Nothing appears in ``out_dir`` unless every output was produced; returns the ``run.json`` summary.
    """
    timings = {**plan.timings, **(timings or {})}
    release_freed_memory()  # what the model calls' buffers left in the heap: the mosaic maps its own
    store = open_tile_store(plan, store_root)
    missing = len(plan.tiles) - len(store.done())
    if missing:
        raise ChangeDetError(f"{missing} tiles have no prediction yet in {store.path}")
    smoothed = plan.smoothing is not None
    names = output_names(smoothed, plan.params.zones is not None)
    with OutputStaging(out_dir, names, overwrite) as staging:
        start = time.perf_counter()
        scratch = {o.name: staging.path(f"scratch_{o.name}") for o in run_rasters(smoothed)}
        threshold = 0.5 if smoothed else _scene_threshold(plan, store)  # smoothed: the majority of the votes
        counts = {**_mosaic_to_scratch(plan, store, scratch, threshold), **(extra_counts or {})}
        if (plan.params.min_region or 0) > 1:
            counts.update(_drop_small_regions(scratch[MASK], plan.params.min_region))
        timings["mosaic_s"] = time.perf_counter() - start
        start = time.perf_counter()
        write_cog(scratch[PROBABILITY], staging.path(PROBABILITY), "average")
        write_cog(scratch[DIFFERENCE], staging.path(DIFFERENCE), "average")
        write_cog(scratch[MASK], staging.path(MASK), "nearest")
        if smoothed:
            write_cog(scratch[CERTIFIED_RADIUS], staging.path(CERTIFIED_RADIUS), "min")  # overviews never overstate a radius
        timings["cog_s"] = time.perf_counter() - start
        write_probability_style(staging.path(PROBABILITY_STYLE), threshold, FLOAT_NODATA)
        write_mask_style(staging.path(MASK_STYLE), MASK_NODATA, ABSTAIN if smoothed else None)
        changes = _polygons(staging, timings)
        zones = _zones(plan, staging, timings) if plan.params.zones is not None else None
        if started is not None:
            timings["total_s"] = time.perf_counter() - started
        summary = {
            "inputs": inputs or {"t1": plan.pair.t1.source, "t2": plan.pair.t2.source},
            **plan.pair.to_dict(),
            "model": {**plan.spec.describe(), "runtime": plan.runtime},
            "parameters": plan.params.model_dump(),
            "threshold": threshold,
            "fingerprint": plan.fingerprint,
            "warnings": plan.warnings,
            "counts": counts,
            "changes": changes,
            **({"smoothing": plan.smoothing.describe()} if smoothed else {}),
            **({"zones": zones} if zones is not None else {}),
            "outputs": {name: name for name in names},
            "nodata": {o.name: o.nodata for o in run_rasters(smoothed)},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "versions": _versions(),
        }
        write_text(staging.path(RUN_JSON), json.dumps(_strict_json(summary), indent=2, default=str, allow_nan=False))
        from changedet.pipeline.run_report import write_report  # here: matplotlib only once a run writes outputs

        written = {name: staging.path(name) for name in (MASK, PROBABILITY, POLYGONS)}
        write_report(staging.path(REPORT_HTML), staging.path(QUICKLOOK), summary, plan.pair, written, DetectParams().model_dump())
        staging.commit()
    return summary


