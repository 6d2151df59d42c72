"""The outputs of a monitored area, written from its state alone (so reruns give the same bytes).

=========================== ============================================================================
``first_change_date.tif``   uint32 YYYYMMDD of the first confirmed change (the first acquisition of
                            the confirming run); 0 no confirmed change; :data:`DATE_NODATA` never compared
``last_change_probability.tif`` float32 change probability on the last acquisition where the pixel was
                            compared; -9999 never compared (QGIS style beside it)
``confirmed_changes.gpkg``  one polygon per 4-connected region of one first-change date: ``first_date``,
                            ``pixels``, ``area_m2``, ``area_ha``, ``mean_probability`` (mean over the
                            confirming acquisitions); with zones, a ``zones`` layer (each zone's last
                            compared date) and a ``zones_timeline`` layer (each zone on every compared
                            date: the rows of ``zones_timeline.csv`` with the zone's polygon)
``timeline.csv``            per acquisition: status (baseline, compared, skipped + reason), valid and
                            cloud fraction, changed ha, newly confirmed ha, confirmed ha
``timeline.png``            the timeline plotted
``zones_timeline.csv``      with ``--zones``: per date and zone, changed, newly confirmed and confirmed ha,
                            valid fraction and mean probability
``alerts.json``             with ``--alert-ha``: per zone, the date its confirmed area first exceeded it
``state.json``              options, grid, timeline and alerts (the hidden ``.monitor`` folder holds the
                            per-pixel state)
=========================== ============================================================================
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.errors import WindowError
from rasterio.features import geometry_window, rasterize, shapes
from rasterio.windows import Window
from shapely.geometry import shape

from changedet.io.styles import write_probability_style
from changedet.io.writers import BlockRasterWriter, OutputStaging, write_cog, write_text, writing
from changedet.monitoring.params import MonitorParams
from changedet.monitoring.state import MonitorState
from changedet.pipeline.grid import Grid
from changedet.pipeline.output_table import FLOAT_NODATA

DATE_NODATA = 4294967295
#: options that name where and when to look, not what a date gives (left out of state.json: a rerun with a later --end writes the same file)
PERIOD_FIELDS = ("stac", "collection", "start", "end", "threads", "batch_size")
FIRST_CHANGE = "first_change_date.tif"
LAST_PROBABILITY = "last_change_probability.tif"
LAST_PROBABILITY_STYLE = "last_change_probability.qml"
CONFIRMED = "confirmed_changes.gpkg"
TIMELINE_CSV = "timeline.csv"
TIMELINE_PNG = "timeline.png"
ZONES_TIMELINE = "zones_timeline.csv"
ALERTS = "alerts.json"
STATE_JSON = "state.json"
TIMELINE_COLUMNS = ("date", "item", "status", "reason", "valid_fraction", "cloud_fraction", "changed_ha", "new_confirmed_ha",
                    "confirmed_ha", "threshold")
ZONE_COLUMNS = ("date", "zone", "valid_fraction", "changed_ha", "new_confirmed_ha", "confirmed_ha", "mean_probability")


def output_names(params: MonitorParams) -> list[str]:
    """The files a monitoring step writes with these options."""
    names = [FIRST_CHANGE, LAST_PROBABILITY, LAST_PROBABILITY_STYLE, CONFIRMED, TIMELINE_CSV, TIMELINE_PNG, STATE_JSON]
    if params.zones is not None:
        names.append(ZONES_TIMELINE)
    if params.alert_ha is not None:
        names.append(ALERTS)
    return names


def zone_masks(path: str, grid: Grid) -> list[tuple[str, tuple[slice, slice], np.ndarray]]:
    """Each zone's label, window slices on ``grid`` and pixel mask there (pixel centres inside)."""
    from changedet.io.zones import read_zones

    zones, masks = read_zones(path, grid), []
    full = Window(0, 0, grid.width, grid.height)
    for label, geometry in zip(zones["zone"], zones.geometry):
        try:
            window = geometry_window_of(grid, geometry).intersection(full).round_offsets().round_lengths()
        except (ValueError, WindowError):  # outside the grid
            continue
        rows, cols = window.toslices()
        transform = grid.transform @ Affine.translation(window.col_off, window.row_off)
        inside = rasterize([(geometry, 1)], out_shape=(int(window.height), int(window.width)), transform=transform,
                           fill=0, dtype="uint8") == 1  # fmt: skip
        masks.append((label, (rows, cols), inside))
    return masks


def geometry_window_of(grid: Grid, geometry) -> Window:
    """The window of ``grid`` holding ``geometry``."""
    class _Dataset:  # geometry_window needs only the transform and the size
        transform, height, width = grid.transform, grid.height, grid.width

    return geometry_window(_Dataset, [geometry])


def zone_rows(masks, date: str, pixels: dict[str, np.ndarray], probability: np.ndarray, confirmed: np.ndarray,
              area_ha: np.ndarray) -> list[dict[str, Any]]:  # fmt: skip
    """One :data:`ZONE_COLUMNS` row per zone for one compared date."""
    rows = []
    for label, (ys, xs), inside in masks:
        area = np.broadcast_to(area_ha, confirmed.shape)[ys, xs]
        compared = pixels["compared"][ys, xs] & inside
        total = int(inside.sum())
        rows.append({"date": date, "zone": label, "valid_fraction": compared.sum() / total if total else 0.0,
                     "changed_ha": float(((pixels["changed"][ys, xs] & inside) * area).sum()),
                     "new_confirmed_ha": float(((pixels["confirmed"][ys, xs] & inside) * area).sum()),
                     "confirmed_ha": float(((confirmed[ys, xs] & inside) * area).sum()),
                     "mean_probability": float(probability[ys, xs][compared].mean()) if compared.any() else None})  # fmt: skip
    return rows


def alerts(state: MonitorState, params: MonitorParams, out_dir: Path) -> list[dict[str, Any]]:
    """Per zone, the first date its confirmed area exceeded ``--alert-ha`` (one alert per crossing). The
    folder's name is the area's; its path is not written (a moved folder keeps the same bytes)."""
    if params.alert_ha is None:
        return []
    found: dict[str, dict[str, Any]] = {}
    for row in state.zones:
        if row["zone"] not in found and row["confirmed_ha"] > params.alert_ha:
            found[row["zone"]] = {"id": f"{out_dir.name}/{row['zone']}/{row['date']}", "area": out_dir.name, "zone": row["zone"],
                                  "date": row["date"], "confirmed_ha": round(row["confirmed_ha"], 4), "limit_ha": params.alert_ha}  # fmt: skip
    return list(found.values())


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in columns})
    return buffer.getvalue()


def _raster(staging: OutputStaging, name: str, grid: Grid, values: np.ndarray, dtype: str, nodata: float) -> None:
    scratch = staging.path(f".{name}.scratch.tif")
    writer = BlockRasterWriter(scratch, grid, dtype, nodata)
    for row in range(0, grid.height, 512):
        writer.write_rows(row, values[row : row + 512])
    writer.close()
    write_cog(scratch, staging.path(name), "nearest")
    scratch.unlink()


def _polygons(path: Path, grid: Grid, first: np.ndarray, probability: np.ndarray, stamp: str, zones: dict[str, Any] | None = None) -> None:
    """The ``confirmed_changes`` layer (and the zone layers, when given: name -> frame) of ``path``, its GeoPackage
    ``last_change`` set to ``stamp`` (the last acquisition's date) instead of the clock, so the same
    state writes the same bytes."""
    import geopandas as gpd
    import pyogrio
    import shapely
    from scipy import ndimage

    from changedet.io.polygons import areas_m2
    from changedet.io.writers import writing

    dated = np.where(first == DATE_NODATA, 0, first).astype(np.int64)
    labels = np.zeros(first.shape, np.int32)
    for value in np.unique(dated[dated > 0]):
        regions, _ = ndimage.label(dated == value)
        labels[regions > 0] = regions[regions > 0] + labels.max()
    count = int(labels.max()) + 1
    pixels = np.bincount(labels.ravel(), minlength=count)
    prob_sum = np.bincount(labels.ravel(), weights=probability.ravel().astype(np.float64), minlength=count)
    stamp_of = np.zeros(count, np.int64)
    stamp_of[labels.ravel()] = dated.ravel()
    t = grid.transform
    pieces: dict[int, list] = {}
    for geometry, value in shapes(labels, mask=labels > 0, connectivity=4):
        pieces.setdefault(int(value), []).append(shape(geometry))
    ids = sorted(pieces)
    geoms = [shapely.affinity.affine_transform(shapely.union_all(pieces[i]), (t.a, t.b, t.d, t.e, t.c, t.f)) for i in ids]
    dates = [f"{stamp_of[i] // 10000:04d}-{stamp_of[i] // 100 % 100:02d}-{stamp_of[i] % 100:02d}" for i in ids]
    frame = gpd.GeoDataFrame({"id": np.arange(1, len(ids) + 1, dtype=np.int64), "first_date": dates,
                              "pixels": np.array([pixels[i] for i in ids], np.int64),
                              "area_m2": np.array(areas_m2(geoms, grid.crs), np.float64),
                              "mean_probability": np.array([prob_sum[i] / pixels[i] for i in ids], np.float64)},
                             geometry=gpd.GeoSeries(geoms, crs=grid.crs))  # fmt: skip
    frame["area_ha"] = frame["area_m2"] / 1e4
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": stamp})
    try:
        with writing(path):
            frame.to_file(path, layer="confirmed_changes", driver="GPKG", engine="pyogrio", geometry_type="Polygon")
            for layer, table in (zones or {}).items():
                table.to_file(path, layer=layer, driver="GPKG", engine="pyogrio")
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": None})


def _zone_layers(params: MonitorParams, state: MonitorState, grid: Grid) -> dict[str, Any]:
    """``zones``: every zone with its last compared date's row; ``zones_timeline``: every (date, zone)
    row of the state with the zone's polygon (a zone absent from a date's rows is absent there too)."""
    import geopandas as gpd

    from changedet.io.zones import read_zones

    zones = read_zones(params.zones, grid)
    polygon = dict(zip(zones["zone"], zones.geometry))
    last = {row["zone"]: row for row in state.zones}
    rows = [last.get(label, {"date": None, "zone": label}) for label in zones["zone"]]
    dated = [row for row in state.zones if row["zone"] in polygon]

    def frame(rows: list[dict], geometry: list) -> gpd.GeoDataFrame:
        return gpd.GeoDataFrame([{k: r.get(k) for k in ZONE_COLUMNS} for r in rows], geometry=geometry, crs=zones.crs)

    return {"zones": frame(rows, list(zones.geometry)), "zones_timeline": frame(dated, [polygon[r["zone"]] for r in dated])}


def timeline_figure(rows: list[dict[str, Any]]):
    """Changed and confirmed hectares per acquisition, skipped dates marked, cloud fraction beside."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    dates = [r["date"] for r in rows]
    x = np.arange(len(rows))
    changed = [r["changed_ha"] or 0.0 for r in rows]
    confirmed = [r["confirmed_ha"] if r["confirmed_ha"] is not None else np.nan for r in rows]
    ax.bar(x, changed, color="#fdae61", label="changed on the date (ha)")
    ax.plot(x, confirmed, "o-", color="#d7191c", label="confirmed, cumulative (ha)")
    for i, r in enumerate(rows):
        if r["status"] == "skipped":
            ax.axvspan(i - 0.4, i + 0.4, color="0.85", zorder=0)
    ax.set_xticks(x, dates, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("hectares")
    ax.set_title("change over time (grey: acquisition skipped; first: baseline)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def write_products(out_dir: Path, state: MonitorState, params: MonitorParams) -> list[dict[str, Any]]:
    """Write every output of :func:`output_names` (staged, then moved into place); returns the alerts."""
    from changedet.errors import InputError
    from changedet.io.report_figures import png_bytes

    if state.grid is None or state.pixels is None:
        reasons = "; ".join(f"{r['date']}: {r['reason']}" for r in state.timeline[-5:])
        raise InputError(f"no usable acquisition over the area yet ({reasons or 'the catalog has none in the period'})")
    grid = Grid.from_dict(state.grid)
    pixels = state.pixels
    found = alerts(state, params, out_dir)
    names = output_names(params)
    with OutputStaging(out_dir, names, overwrite=True) as staging:
        first = np.where(pixels.compared, pixels.first_change, DATE_NODATA).astype(np.uint32)
        _raster(staging, FIRST_CHANGE, grid, first, "uint32", DATE_NODATA)
        last = np.where(pixels.compared, pixels.last_probability, FLOAT_NODATA).astype(np.float32)
        _raster(staging, LAST_PROBABILITY, grid, last, "float32", FLOAT_NODATA)
        threshold = next((r["threshold"] for r in reversed(state.timeline) if r["threshold"] is not None), 0.5)
        write_probability_style(staging.path(LAST_PROBABILITY_STYLE), threshold, FLOAT_NODATA)
        zones = _zone_layers(params, state, grid) if params.zones is not None else None
        stamp = f"{state.timeline[-1]['date']}T00:00:00Z"
        _polygons(staging.path(CONFIRMED), grid, first, np.nan_to_num(pixels.confirmed_probability), stamp, zones)
        write_text(staging.path(TIMELINE_CSV), _csv(state.timeline, TIMELINE_COLUMNS))
        with writing(staging.path(TIMELINE_PNG)):
            staging.path(TIMELINE_PNG).write_bytes(png_bytes(timeline_figure(state.timeline)))
        if params.zones is not None:
            write_text(staging.path(ZONES_TIMELINE), _csv(state.zones, ZONE_COLUMNS))
        if params.alert_ha is not None:
            write_text(staging.path(ALERTS), json.dumps(found, indent=1))
        options = {k: v for k, v in params.model_dump().items() if k not in PERIOD_FIELDS}
        document = {"options": options, "grid": state.grid, "timeline": state.timeline, "alerts": found,
                    "outputs": names, "first_change_date_nodata": DATE_NODATA, "probability_nodata": FLOAT_NODATA}  # fmt: skip
        write_text(staging.path(STATE_JSON), json.dumps(document, indent=1, allow_nan=False))
        staging.commit()
    return found
