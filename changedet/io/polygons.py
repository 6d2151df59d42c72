"""Polygonise a change mask strip by strip into a GeoPackage (one feature per change region).

Connected components (4-connectivity) are labelled per strip and merged across strip borders with
a union-find, so regions spanning strips become one feature and memory stays bounded by one strip.
Geometry is traced in integer pixel coordinates (exact unions) and mapped to the grid CRS at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.windows import Window

from changedet.pipeline.grid import Grid
from changedet.io.scene import open_raster
from changedet.io.writers import writing

STRIP_PIXELS = 1 << 22  # pixels per strip: memory stays flat whatever the scene width
#: what polygonising imports when it runs (not with this module: detect imports it in the background
#: while tiles are predicted, see :func:`changedet.pipeline.detect.detect_changes`)
POLYGON_MODULES = ("geopandas", "shapely", "pyproj", "scipy.ndimage", "rasterio.features")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [0]

    def add(self, n: int) -> None:
        self.parent.extend(range(len(self.parent), len(self.parent) + n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def areas_m2(geoms: list, crs) -> list[float | None]:
    """Area of each geometry in m²: geodesic on a geographic CRS, planar times the unit's factor otherwise;
    None without CRS."""
    if crs is None:
        return [None] * len(geoms)
    if crs.is_geographic:
        from pyproj import Geod

        geod = Geod(ellps="WGS84") if crs.to_epsg() == 4326 else Geod(**_ellipsoid(crs))
        return [abs(geod.geometry_area_perimeter(g)[0]) for g in geoms]
    factor = crs.linear_units_factor[1] if crs.linear_units_factor else 1.0
    return [g.area * factor**2 for g in geoms]


def _ellipsoid(crs) -> dict[str, float]:
    from pyproj import CRS as ProjCRS

    ellipsoid = ProjCRS.from_wkt(crs.to_wkt()).ellipsoid
    return {"a": ellipsoid.semi_major_metre, "b": ellipsoid.semi_minor_metre}


def polygonize_mask(
    mask_path: str | Path, prob_path: str | Path, out_path: str | Path, layer: str = "changes"
) -> tuple[int, float]:
    """Write one polygon per connected change region of ``mask_path`` (value 1) to a GeoPackage.

    Attributes: ``id``, ``pixels``, ``area_m2`` (geodesic on geographic CRSs; empty without CRS)
    and ``mean_prob`` (mean change probability from ``prob_path``).
    Returns the feature count and the total changed area in m² (0 without CRS).
    """
    import geopandas as gpd
    import shapely
    from rasterio.features import shapes
    from scipy import ndimage
    from shapely.geometry import shape

    with open_raster(mask_path) as mask_ds, open_raster(prob_path) as prob_ds:
        grid = Grid.from_dataset(mask_ds)
        uf = _UnionFind()
        pixels: list[float] = [0.0]
        prob_sum: list[float] = [0.0]
        pieces: dict[int, list] = {}
        previous_last_row: np.ndarray | None = None
        strip = max(1, STRIP_PIXELS // grid.width)
        for row0 in range(0, grid.height, strip):
            n = min(strip, grid.height - row0)
            window = Window(0, row0, grid.width, n)
            changed = mask_ds.read(1, window=window) == 1
            prob = prob_ds.read(1, window=window)
            local, count = ndimage.label(changed)
            offset = len(uf.parent) - 1
            uf.add(count)
            labels = np.where(local > 0, local + np.int32(offset), np.int32(0))
            pixels.extend(np.bincount(local.ravel(), minlength=count + 1)[1:].astype(float))
            prob_sum.extend(np.bincount(local.ravel(), weights=prob.ravel(), minlength=count + 1)[1:])
            if previous_last_row is not None:
                touching = (previous_last_row > 0) & (labels[0] > 0)
                for a, b in set(zip(previous_last_row[touching].tolist(), labels[0][touching].tolist())):
                    uf.union(a, b)
            previous_last_row = labels[-1].copy()
            to_pixels = Affine.translation(0, row0)
            for geom, value in shapes(labels, mask=labels > 0, connectivity=4, transform=to_pixels):
                pieces.setdefault(int(value), []).append(shape(geom))
        groups: dict[int, list[int]] = {}
        for label in pieces:
            groups.setdefault(uf.find(label), []).append(label)
        records = []
        for root, labels in sorted(groups.items()):
            geom = shapely.union_all([p for lab in labels for p in pieces[lab]])
            npx = sum(pixels[lab] for lab in labels)
            psum = sum(prob_sum[lab] for lab in labels)
            records.append((geom, npx, psum / npx))
        t = grid.transform
        geoms = [shapely.affinity.affine_transform(g, (t.a, t.b, t.d, t.e, t.c, t.f)) for g, _, _ in records]
        frame = gpd.GeoDataFrame(
            {
                "id": np.arange(1, len(records) + 1, dtype=np.int64),
                "pixels": np.array([r[1] for r in records], dtype=np.int64),
                "area_m2": np.array(areas_m2(geoms, grid.crs), dtype=np.float64),
                "mean_prob": np.array([r[2] for r in records], dtype=np.float64),
            },
            geometry=gpd.GeoSeries(geoms, crs=grid.crs),
        )
        with writing(out_path):  # SQLite's "database or disk is full" -> OSError(ENOSPC, ..., out_path)
            frame.to_file(out_path, layer=layer, driver="GPKG", engine="pyogrio", geometry_type="Polygon")
        return len(frame), float(np.nansum(frame["area_m2"])) if len(frame) else 0.0
