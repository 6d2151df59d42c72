"""A run's ``report.html`` and ``quicklook.png``: what changed, where, how much, and can it be trusted.

Written by :func:`~changedet.pipeline.outputs.write_outputs` inside the run's staging folder (CLI and
flow alike), after ``run.json``'s summary is known. The page (:mod:`changedet.io.html_page`) holds:

* true-colour composites of t1 and t2 (bands by role: red, green, blue; else the first band in grey)
  with one shared percentile stretch, and t2 with the change mask overlaid — same scale, legend,
  threshold, scale bar, north arrow (:func:`changedet.io.report_figures.change_figure`); the same
  figure is ``quicklook.png``;
* the change-probability histogram with the threshold;
* every change region of ``changes.gpkg`` (largest :data:`MAX_REGION_ROWS` when there are more),
  sortable: area (ha), pixels, mean probability, centroid in the grid CRS and in lon/lat; with ``--zones``, the zone table;
* the run's facts (inputs, grid, model and its expected F1 on unseen scenes, parameters that differ
  from the defaults, counts, timings, peak RSS) and the warnings that matter for trust.
"""

from __future__ import annotations

import ast
import html
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from changedet.io.bands import scene_roles
from changedet.io.html_page import Section, facts, image, page, table, warnings_block
from changedet.io.report_figures import change_figure, composite, histogram_figure, png_bytes, shared_stretch
from changedet.io.scene import Scene
from changedet.io.writers import write_text, writing
from changedet.io.zones import ZONE_COLUMNS
from changedet.pipeline.align import AlignedPair, read_scene_block_mean
from changedet.pipeline.grid import Grid
from changedet.pipeline.output_table import MASK_NODATA

DISPLAY_SIDE = 640  # px: the longer side of the report's images
HISTOGRAM_PIXELS = 4_000_000  # probabilities read (from overviews) for the histogram
MAX_REGION_ROWS = 500
INVALID_WARNING = 0.10  # warn when more than this fraction of the grid has no data
SHIFT_WARNING_PX = 0.5
CLOUD_WARNING = 0.01


def display_bands(scene: Scene) -> list[int]:
    """Positions of the red, green and blue bands of ``scene`` (by role), else ``[0]`` (grey)."""
    roles = scene_roles(scene)
    if all(r in roles for r in ("red", "green", "blue")):
        return [roles.index(r) for r in ("red", "green", "blue")]
    return [0]


def display_images(pair: AlignedPair, side: int = DISPLAY_SIDE) -> tuple[np.ndarray, np.ndarray, Grid, int]:
    """Both dates' composites (``(h, w, 3)``, one stretch when their bands are alike) on the coarse
    grid of ``pair.grid`` whose longer side is at most ``side``; returns them, that grid and its factor."""
    factor = max(1, math.ceil(max(pair.grid.width, pair.grid.height) / side))
    coarse = pair.grid.coarsened(factor)
    reads = []
    for scene in (pair.t1, pair.t2):
        chosen = Scene(scene.source, tuple(scene.bands[i] for i in display_bands(scene)))
        reads.append(read_scene_block_mean(chosen, pair, factor))
    (v1, ok1), (v2, ok2) = reads
    if v1.shape[0] == v2.shape[0] and [b.name for b in pair.t1.bands] == [b.name for b in pair.t2.bands]:
        lo, hi = shared_stretch([v1, v2], [ok1, ok2])
        return composite(v1, ok1, lo, hi), composite(v2, ok2, lo, hi), coarse, factor
    images = [composite(v, ok, *shared_stretch([v], [ok])) for v, ok in reads]  # other sensors: each its own stretch
    return images[0], images[1], coarse, factor


def _read_mask(path: Path, coarse: Grid, factor: int) -> np.ndarray:
    """The mask on ``coarse`` (nearest); a last block that sticks out of the raster is nodata."""
    with rasterio.open(path) as ds:
        rows, cols = ds.height // factor, ds.width // factor
        mask = np.full(coarse.shape, MASK_NODATA, np.uint8)
        if rows and cols:
            window = Window(0, 0, cols * factor, rows * factor)
            mask[:rows, :cols] = ds.read(1, window=window, out_shape=(rows, cols), resampling=Resampling.nearest)
        return mask


def _probabilities(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        scale = max(1.0, math.sqrt(ds.width * ds.height / HISTOGRAM_PIXELS))
        shape = (max(1, round(ds.height / scale)), max(1, round(ds.width / scale)))
        values = ds.read(1, out_shape=shape, masked=True, resampling=Resampling.nearest)
    return values.compressed()


def _coordinate(value: float) -> str:
    """A coordinate as text with its full precision (degrees: 6 decimals; metres: 2)."""
    return f"{value:.6f}" if abs(value) <= 360 else f"{value:.2f}"


def _regions(path: Path) -> tuple[int, list[list[Any]]]:
    """Region count and rows (largest first) of ``changes.gpkg``."""
    import geopandas as gpd

    frame = gpd.read_file(path, layer="changes")
    if frame.empty:
        return 0, []
    frame = frame.sort_values(["area_m2" if frame["area_m2"].notna().any() else "pixels", "id"], ascending=[False, True])
    shown = frame.head(MAX_REGION_ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # centroids of geographic polygons: fine at region scale
        centres = shown.geometry.centroid
        lonlat = centres.to_crs("EPSG:4326") if frame.crs is not None else None
    rows = []
    for i, (_, region) in enumerate(shown.iterrows()):
        area = region["area_m2"]
        row = [int(region["id"]), None if area is None or np.isnan(area) else round(float(area) / 1e4, 4), int(region["pixels"]),
               round(float(region["mean_prob"]), 4), _coordinate(centres.iloc[i].x), _coordinate(centres.iloc[i].y)]  # fmt: skip
        row += [f"{lonlat.iloc[i].x:.6f}", f"{lonlat.iloc[i].y:.6f}"] if lonlat is not None else [None, None]
        rows.append(row)
    return len(frame), rows


def _expected_f1(metadata: dict[str, Any]) -> str:
    figure = metadata.get("expected_f1_unseen")
    if isinstance(figure, str):
        try:
            figure = ast.literal_eval(figure)
        except (ValueError, SyntaxError):
            return figure
    if not isinstance(figure, dict) or figure.get("pooled_f1_mean") is None:
        return "not recorded (no cross-validated figure for this model)"
    std = figure.get("pooled_f1_std")
    spread = f" ± {std:.3f}" if isinstance(std, (int, float)) else ""
    return f"{figure['pooled_f1_mean']:.3f}{spread} ({figure.get('protocol', 'cross-validation')})"


def trust_warnings(summary: dict[str, Any], grid: Grid) -> list[str]:
    """The run's warnings plus what the numbers say: much missing data, an uncorrected or unmeasured
    co-registration offset, clouds, a model without a figure on unseen scenes."""
    lines = list(summary.get("warnings") or [])
    valid = summary.get("counts", {}).get("valid_pixels")
    if valid is not None and grid.width * grid.height:
        missing = 1 - valid / (grid.width * grid.height)
        if missing > INVALID_WARNING:
            lines.append(f"{missing:.0%} of the grid has no data in one date or both (nodata, clouds, outside a footprint): "
                         "no change can be seen there")  # fmt: skip
    offset = summary.get("coregistration") or {}
    shift = offset.get("shift_px")
    if offset.get("confidence") in ("low", "none"):
        lines.append(f"the t2 → t1 offset could not be measured reliably ({offset.get('reason') or offset.get('confidence')}): "
                     "misregistration would show as change along edges")  # fmt: skip
    elif shift and not offset.get("applied") and math.hypot(*shift) > SHIFT_WARNING_PX:
        lines.append(f"t2 is offset from t1 by ({shift[0]:+.2f}, {shift[1]:+.2f}) px and was not corrected: edges may show "
                     "as change; rerun with --coregister")  # fmt: skip
    for date, fraction in (summary.get("cloud_fraction") or {}).items():
        if fraction is not None and fraction > CLOUD_WARNING:
            lines.append(f"{date} is {fraction:.1%} cloud or shadow: masked, no change can be seen there")
    if _expected_f1(summary.get("model") or {}).startswith("not recorded"):
        lines.append("the model has no F1 measured on unseen scenes: how good this map is, is unknown")
    return lines


def _grid_facts(grid: Grid) -> dict[str, str]:
    crs = grid.crs
    name = "none (pixel grid)" if crs is None else (f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else crs.to_string()[:80])
    units = "" if crs is None else (" degrees" if crs.is_geographic else f" {crs.linear_units}")
    return {"CRS": name, "size": f"{grid.width} × {grid.height} px",
            "pixel": f"{abs(grid.transform.a):.6g}{units} (~{grid.pixel_metres:.1f} m)" if crs is not None else "1 px",
            "bounds (W, S, E, N)": ", ".join(f"{v:.6f}" for v in grid.bounds)}  # fmt: skip


def build_report(summary: dict[str, Any], pair: AlignedPair, outputs: dict[str, Path], defaults: dict[str, Any]) -> tuple[str, bytes]:
    """The HTML page and the quicklook PNG of a run from its summary and its written outputs
    (``outputs``: name -> path of ``change_mask.tif``, ``change_probability.tif``, ``changes.gpkg``)."""
    t1, t2, coarse, factor = display_images(pair)
    mask = _read_mask(outputs["change_mask.tif"], coarse, factor)
    threshold = summary.get("threshold")
    pixel_m = pair.grid.pixel_metres * factor if pair.grid.crs is not None else None
    overview = change_figure(t1, t2, mask, MASK_NODATA, threshold, pixel_m)
    quicklook = png_bytes(overview, dpi=100)  # also the page's figure
    histogram = png_bytes(histogram_figure(_probabilities(outputs["change_probability.tif"]), threshold))
    total, rows = _regions(outputs["changes.gpkg"])
    model = summary.get("model") or {}
    changes = summary.get("changes") or {}
    params = {k: v for k, v in (summary.get("parameters") or {}).items() if defaults.get(k, object()) != v}
    rule = (summary.get("parameters") or {}).get("threshold_rule") or "fixed"
    label = model.get("name", "?") + (f" ({Path(str(model['checkpoint'])).stem})" if model.get("checkpoint") else "")
    run = {"t1": summary["inputs"]["t1"], "t2": summary["inputs"]["t2"], "model": label,
           "checkpoint": model.get("checkpoint") or "none (registry model)", "expected F1 on unseen scenes": _expected_f1(model),
           "threshold": f"{threshold:.3f} ({rule})" if isinstance(threshold, (int, float)) else str(threshold),
           "changed area": f"{changes.get('changed_area_ha', 0.0):.2f} ha in {changes.get('regions', 0)} regions",
           **{k.replace("_", " "): f"{v:,}" for k, v in (summary.get("counts") or {}).items()},
           "total time": f"{(summary.get('timings') or {}).get('total_s', float('nan')):.1f} s",
           "peak RSS": f"{summary.get('peak_rss_mb', float('nan')):.0f} MiB"}  # fmt: skip
    shown = f"the largest {len(rows)} of {total}" if total > len(rows) else f"all {total}"
    header = ["id", "area (ha)", "pixels", "mean probability", "centroid x", "centroid y", "lon", "lat"]
    trust = f"<p>Model's F1 on scenes it has never seen: <b>{html.escape(_expected_f1(model))}</b>.</p>"
    sections = [
        Section("Can this map be trusted?", trust + warnings_block(trust_warnings(summary, pair.grid))),
        Section("Before, after and change", image(quicklook, "t1, t2 and the change overlay",
                f"Same scale and stretch for both dates; 1 image pixel = {factor} × {factor} grid pixels.", "overview")),  # fmt: skip
        Section("Run", facts(run)),
        Section("Change probability", image(histogram, "histogram of the change probability", "", "histogram")),
        Section(f"Change regions ({shown}; click a header to sort)",
                f'<div data-regions-total="{total}">' + table(header, rows, sortable=True, ident="regions") + "</div>"),
        *([Section("Zones (click a header to sort)", table(ZONE_COLUMNS, [[z[c] for c in ZONE_COLUMNS] for z in summary["zones"]],
                                                          sortable=True, ident="zones"))] if summary.get("zones") else []),  # fmt: skip
        Section("Grid", facts(_grid_facts(pair.grid))),
        Section("Parameters (other than the defaults)", facts(params) if params else "<p>all defaults</p>"),
    ]
    title = f"Change report: {Path(str(summary['inputs']['t1'])).name} → {Path(str(summary['inputs']['t2'])).name}"
    subtitle = f"changedet {summary.get('versions', {}).get('changedet', '')}, fingerprint {summary.get('fingerprint', '')}"
    return page(title, subtitle, sections), quicklook


def write_report(html_path: Path, quicklook_path: Path, summary: dict[str, Any], pair: AlignedPair,
                 outputs: dict[str, Path], defaults: dict[str, Any]) -> None:  # fmt: skip
    """Write ``report.html`` and ``quicklook.png`` (into the run's staging folder: they appear with the
    other outputs or not at all)."""
    text, quicklook = build_report(summary, pair, outputs, defaults)
    write_text(html_path, text)
    with writing(quicklook_path), open(quicklook_path, "wb") as fh:
        fh.write(quicklook)
