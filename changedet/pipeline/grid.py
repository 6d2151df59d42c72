"""An immutable raster grid (CRS, affine transform, shape) in the spirit of odc-geo's GeoBox."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from changedet.errors import GridError

_LATTICE_TOL = 1e-9  # relative to the pixel size
_HALF_TOL = 1e-6  # pixels: a pixel half inside a box (within this) counts as not more than half inside


def _clean(value: float) -> float:
    """``value`` rounded to 12 significant digits (``hypot`` noise: 10.000000000000002 -> 10.0)."""
    return float(f"{value:.12g}")


def wgs84_bbox(values: Sequence[float]) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` in WGS84 degrees, checked (``--bbox``); ValueError naming what is wrong."""
    if len(values) != 4:
        raise ValueError(f"--bbox takes west,south,east,north (4 numbers), got {len(values)}")
    west, south, east, north = (float(v) for v in values)
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise ValueError(f"--bbox {','.join(f'{v:g}' for v in values)}: need -180 <= west < east <= 180 and "
                         "-90 <= south < north <= 90 (WGS84 degrees)")  # fmt: skip
    return west, south, east, north


@dataclass(frozen=True)
class Grid:
    """A pixel grid of any affine ``transform`` (north-up, south-up, east-to-west, rotated or sheared):
    ``crs`` (None for a plain pixel grid), ``transform``, ``height`` × ``width``.

    :meth:`north_up` gives the north-up grid the pipeline works on; :meth:`clip_to_bounds` needs an
    axis-aligned grid (no rotation or shear).
    """

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @classmethod
    def from_dataset(cls, dataset: Any) -> "Grid":
        """The grid of an open rasterio dataset (``crs`` None when it has none; the transform GDAL
        reports, identity when there is no geotransform)."""
        crs = dataset.crs if dataset.crs else None
        return cls(crs, dataset.transform, dataset.width, dataset.height)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)``, both positive: the lengths of the column and row vectors of the
        transform (``|a|, |e|`` for an axis-aligned grid, the pixel sides for a rotated one)."""
        t = self.transform
        return math.hypot(t.a, t.d), math.hypot(t.b, t.e)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units squared (``|det|`` of the transform; any affine)."""
        return abs(self.transform.determinant)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units: the box around all four corners."""
        xs, ys = zip(*(self.transform @ (c, r) for c in (0, self.width) for r in (0, self.height)))
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def is_axis_aligned(self) -> bool:
        """No rotation or shear (north-up, south-up or east-to-west)."""
        return self.transform.b == 0 and self.transform.d == 0

    @property
    def is_north_up(self) -> bool:
        """Axis-aligned with columns going east and rows going south (``a > 0``, ``e < 0``)."""
        return self.is_axis_aligned and self.transform.a > 0 and self.transform.e < 0

    @property
    def orientation(self) -> str:
        """``north-up``, ``south-up``, ``east-to-west``, ``east-to-west south-up`` or ``rotated/sheared``."""
        if not self.is_axis_aligned:
            return "rotated/sheared"
        west, south = self.transform.a < 0, self.transform.e > 0
        return " ".join(["east-to-west"] * west + ["south-up"] * south) or "north-up"

    def north_up(self) -> "Grid":
        """The north-up grid of this one (``self`` when already north-up).

        An axis-aligned grid is flipped exactly (same pixels, same footprint). A rotated/sheared one
        becomes the north-up grid at its pixel size (:attr:`res`) covering its footprint's bounding
        box (``calculate_default_transform``); pixels of that box outside the footprint hold no data.
        """
        if self.is_north_up:
            return self
        if self.is_axis_aligned:
            left, bottom, right, top = self.bounds
            rx, ry = self.res
            return Grid(self.crs, Affine(rx, 0.0, left, 0.0, -ry, top), self.width, self.height)
        if self.crs is None:
            raise GridError("cannot turn a rotated/sheared grid without CRS into a north-up grid")
        res = tuple(_clean(r) for r in self.res)
        transform, width, height = calculate_default_transform(
            self.crs, self.crs, self.width, self.height, *self.bounds, resolution=res
        )
        return Grid(self.crs, transform, int(width), int(height))

    @property
    def is_georeferenced(self) -> bool:
        """True when the grid has a CRS."""
        return self.crs is not None

    def coarsened(self, factor: int) -> "Grid":
        """The grid of ``factor`` x ``factor`` pixel blocks over this one (same origin; the last block of a
        row or column may stick out)."""
        return Grid(self.crs, self.transform @ Affine.scale(factor), -(-self.width // factor), -(-self.height // factor))

    @property
    def pixel_metres(self) -> float:
        """Approximate ground size of a pixel's side in metres: degrees at the grid's mid-latitude on a
        geographic CRS, the CRS's linear unit otherwise (pixel units without CRS)."""
        size = abs(self.transform.a) if self.is_axis_aligned else math.hypot(self.transform.a, self.transform.d)
        if self.crs is None:
            return size
        if self.crs.is_geographic:
            south, north = self.bounds[1], self.bounds[3]
            return size * 111_320.0 * math.cos(math.radians((south + north) / 2))
        return size * (self.crs.linear_units_factor[1] if self.crs.linear_units_factor else 1.0)

    def window(self, window: Window) -> "Grid":
        """The sub-grid covering ``window`` (row/col offsets in this grid's pixels)."""
        transform = self.transform @ Affine.translation(window.col_off, window.row_off)
        return Grid(self.crs, transform, int(window.width), int(window.height))

    def window_of(self, other: "Grid") -> Window:
        """Window of ``other`` inside this grid: same lattice (:meth:`same_lattice`) and an integer
        pixel offset, else :class:`GridError`. Valid for any affine, flipped or rotated."""
        col, row = ~self.transform @ (other.transform.c, other.transform.f)
        if not (self.same_lattice(other) and abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6):
            raise GridError("grids are not on the same pixel lattice")
        return Window(round(col), round(row), other.width, other.height)

    def same_lattice(self, other: "Grid") -> bool:
        """Same CRS and the same linear part of the transform (orientation, pixel size, rotation),
        within 1e-9 of the pixel size; the offsets may differ."""
        a, b = self.transform, other.transform
        tol = _LATTICE_TOL * max(self.res)
        return self.crs == other.crs and all(abs(x - y) <= tol for x, y in zip((a.a, a.b, a.d, a.e), (b.a, b.b, b.d, b.e)))

    def bounds_in(self, crs: CRS | None) -> tuple[float, float, float, float]:
        """This grid's bounds reprojected (densified) into ``crs``."""
        if crs is None or self.crs is None or crs == self.crs:
            return self.bounds
        return transform_bounds(self.crs, crs, *self.bounds, densify_pts=21)

    def clip_to_bounds(self, bounds: tuple[float, float, float, float]) -> "Grid":
        """Sub-grid of the pixels (more than half) inside ``bounds``; :class:`GridError` if empty or if
        this grid is rotated/sheared (use :meth:`north_up` first)."""
        if not self.is_axis_aligned:
            raise GridError("cannot clip a rotated/sheared grid to bounds: use its north-up grid")
        left, bottom, right, top = bounds
        cols, rows = zip(*(~self.transform @ (x, y) for x in (left, right) for y in (bottom, top)))
        # pixel i spans [i, i + 1]: kept when more than half of it is inside (exact halves are not)
        col0, row0 = (max(0, math.floor(min(v) + 0.5 + _HALF_TOL)) for v in (cols, rows))
        col1 = min(self.width, math.ceil(max(cols) - 0.5 - _HALF_TOL))
        row1 = min(self.height, math.ceil(max(rows) - 0.5 - _HALF_TOL))
        if col1 <= col0 or row1 <= row0:
            raise GridError(f"the scenes do not overlap (bounds {self.bounds} vs {tuple(round(v, 6) for v in bounds)})")
        return self.window(Window(col0, row0, col1 - col0, row1 - row0))

    def reprojected(self, crs: CRS | None = None, resolution: float | None = None) -> "Grid":
        """The north-up grid covering the same area in ``crs`` at ``resolution`` (CRS units); without
        either, :meth:`north_up`."""
        if self.crs is None:
            raise GridError("cannot reproject a pixel grid without CRS (--crs/--resolution need georeferenced input)")
        base = self.north_up()
        dst_crs = crs or base.crs
        if dst_crs == base.crs and resolution is None:
            return base
        res = (resolution, resolution) if resolution else None
        transform, width, height = calculate_default_transform(
            base.crs, dst_crs, base.width, base.height, *base.bounds, resolution=res
        )
        return Grid(dst_crs, transform, int(width), int(height))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (CRS as WKT and EPSG when known)."""
        return {
            "crs": self.crs.to_wkt() if self.crs else None,
            "epsg": self.crs.to_epsg() if self.crs else None,
            "transform": list(self.transform)[:6],
            "width": self.width,
            "height": self.height,
            "bounds": list(self.bounds),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Grid":
        """Inverse of :meth:`to_dict`."""
        crs = CRS.from_wkt(data["crs"]) if data.get("crs") else None
        return cls(crs, Affine(*data["transform"]), int(data["width"]), int(data["height"]))
