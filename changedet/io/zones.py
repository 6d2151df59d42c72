"""Zone statistics: changed hectares and mean change probability per polygon of a zones file
(parcels, districts), for ``detect --zones`` — ``zones.csv`` and a ``zones`` layer in ``changes.gpkg``.

Zones come from any vector file OGR reads (GeoPackage, shapefile, GeoJSON, …) in any CRS, reprojected
onto the run's grid. Each zone is measured on its own pixels (a pixel belongs to a zone when its centre
is inside it, as GDAL rasterizes), so overlapping zones are each counted in full. Areas are geodesic
per pixel row on geographic grids (as the polygons' ``area_m2``), pixel area in the CRS unit squared
otherwise.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import geometry_window, rasterize
from rasterio.windows import Window
from shapely.geometry import box

from changedet.errors import InputError
from changedet.pipeline.grid import Grid

ZONE_COLUMNS = ("zone", "zone_ha", "valid_fraction", "changed_pixels", "changed_ha", "changed_fraction", "mean_probability")
_LABELS = ("name", "zone", "id", "code")
_BLOCK_PIXELS = 1 << 22


def read_zones(path: str | Path, grid: Grid):
    """The polygons of ``path`` in ``grid``'s CRS with a ``zone`` label (the first of the columns
    ``name``, ``zone``, ``id``, ``code``; else the feature's position); :class:`InputError` when the
    file cannot be read, holds no polygon, has no CRS (on a georeferenced grid) or no zone meets the grid."""
    import geopandas as gpd

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = gpd.read_file(path)
    except Exception as exc:  # pyogrio's DataSourceError and friends: the reason is in the message
        raise InputError(f"cannot read zones {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    polygons = frame[frame.geometry.notna() & frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polygons.empty:
        kinds = ", ".join(sorted(set(frame.geometry.geom_type.dropna()))) or "no geometry"
        raise InputError(f"zones {path} hold no polygon ({kinds}): give parcels or districts as polygons")
    if grid.crs is not None:
        if polygons.crs is None:
            raise InputError(f"zones {path} have no CRS: the grid is in {grid.crs.to_string()}; give the file a CRS")
        polygons = polygons.to_crs(grid.crs.to_wkt())
    column = next((c for c in polygons.columns if c.lower() in _LABELS), None)
    labels = polygons[column].astype(str) if column else [str(i + 1) for i in range(len(polygons))]
    polygons = polygons.assign(zone=list(labels))[["zone", "geometry"]].reset_index(drop=True)
    west, south, east, north = grid.bounds
    inside = polygons.intersects(box(west, south, east, north))
    if not inside.any():
        raise InputError(f"none of the {len(polygons)} zones of {path} meets the grid (bounds {grid.bounds})")
    return polygons


def row_areas(grid: Grid, row0: int, rows: int) -> np.ndarray:
    """Area in m² of one pixel in each of ``rows`` rows from ``row0`` (north-up grids)."""
    if grid.crs is None:
        return np.ones(rows)
    if not grid.crs.is_geographic:
        unit = grid.crs.linear_units_factor[1] if grid.crs.linear_units_factor else 1.0
        return np.full(rows, abs(grid.transform.a * grid.transform.e) * unit**2)
    from pyproj import Geod

    geod = Geod(ellps="WGS84")
    t = grid.transform
    tops = t.f + t.e * (row0 + np.arange(rows))
    west, east = t.c, t.c + t.a
    return np.array([abs(geod.polygon_area_perimeter([west, east, east, west], [y, y, y + t.e, y + t.e])[0]) for y in tops])


def zone_statistics(zones, grid: Grid, mask_path: str | Path, prob_path: str | Path, mask_nodata: int) -> list[dict]:
    """One row per zone (:data:`ZONE_COLUMNS`): its area on the grid, the valid fraction, changed
    pixels and hectares, changed fraction of the valid area and mean probability over valid pixels."""
    rows = []
    with rasterio.open(mask_path) as mask_ds, rasterio.open(prob_path) as prob_ds:
        full = Window(0, 0, grid.width, grid.height)
        for label, geometry in zip(zones["zone"], zones.geometry):
            total = valid = changed = 0
            area = changed_area = prob_sum = 0.0
            try:
                window = geometry_window(mask_ds, [geometry]).intersection(full)
            except (rasterio.errors.WindowError, ValueError):  # outside the grid
                window = None
            if window is not None:
                window = window.round_offsets().round_lengths()
                step = max(1, _BLOCK_PIXELS // max(1, int(window.width)))
                for r0 in range(int(window.row_off), int(window.row_off + window.height), step):
                    part = Window(window.col_off, r0, window.width, min(step, int(window.row_off + window.height) - r0))
                    inside = rasterize([(geometry, 1)], out_shape=(int(part.height), int(part.width)),
                                       transform=mask_ds.window_transform(part), fill=0, dtype="uint8") == 1  # fmt: skip
                    mask, prob = mask_ds.read(1, window=part), prob_ds.read(1, window=part)
                    ok = inside & (mask != mask_nodata)
                    hit = ok & (mask == 1)
                    pixel_area = row_areas(grid, r0, int(part.height))[:, None]
                    total += int(inside.sum())
                    valid += int(ok.sum())
                    changed += int(hit.sum())
                    area += float((inside * pixel_area).sum())
                    changed_area += float((hit * pixel_area).sum())
                    prob_sum += float(prob[ok].astype(np.float64).sum())
            rows.append({"zone": label, "zone_ha": area / 1e4, "valid_fraction": valid / total if total else 0.0,
                         "changed_pixels": changed, "changed_ha": changed_area / 1e4,
                         "changed_fraction": changed / valid if valid else 0.0,
                         "mean_probability": prob_sum / valid if valid else None})  # fmt: skip
    return rows


def write_zones(zones, rows: list[dict], csv_path: str | Path, gpkg_path: str | Path) -> None:
    """``rows`` as ``csv_path`` and as a ``zones`` layer (the zones' polygons in the grid CRS with the
    same columns) added to the GeoPackage ``gpkg_path``."""
    import csv

    import geopandas as gpd

    from changedet.io.writers import writing

    with writing(csv_path), open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ZONE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    frame = gpd.GeoDataFrame(rows, geometry=list(zones.geometry), crs=zones.crs)
    with writing(gpkg_path):
        frame.to_file(gpkg_path, layer="zones", driver="GPKG", engine="pyogrio")
