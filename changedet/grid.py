"""An immutable raster grid (CRS, affine transform, shape) in the spirit of odc-geo's GeoBox."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from changedet.errors import GridError


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: ``crs`` (None for a plain pixel grid), ``transform``, ``height`` × ``width``."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @classmethod
    def from_dataset(cls, dataset: Any) -> "Grid":
        """The grid of an open rasterio dataset (pixel grid with identity transform when no CRS)."""
        crs = dataset.crs if dataset.crs else None
        return cls(crs, dataset.transform, dataset.width, dataset.height)

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)``, both positive."""
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return min(left, right), min(top, bottom), max(left, right), max(top, bottom)

    @property
    def is_georeferenced(self) -> bool:
        """True when the grid has a CRS."""
        return self.crs is not None

    def window(self, window: Window) -> "Grid":
        """The sub-grid covering ``window`` (row/col offsets in this grid's pixels)."""
        transform = self.transform @ Affine.translation(window.col_off, window.row_off)
        return Grid(self.crs, transform, int(window.width), int(window.height))

    def window_of(self, other: "Grid") -> Window:
        """Window of ``other`` inside this grid; both must share CRS and pixel size with integer offset."""
        col, row = ~self.transform @ (other.transform.c, other.transform.f)
        if not (self.same_lattice(other) and abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6):
            raise GridError("grids are not on the same pixel lattice")
        return Window(round(col), round(row), other.width, other.height)

    def same_lattice(self, other: "Grid") -> bool:
        """Same CRS, orientation and pixel size (sub-pixel tolerance 1e-9 relative)."""
        a, b = self.transform, other.transform
        return (
            self.crs == other.crs
            and math.isclose(a.a, b.a, rel_tol=1e-9)
            and math.isclose(a.e, b.e, rel_tol=1e-9)
            and a.b == b.b == 0
            and a.d == b.d == 0
        )

    def bounds_in(self, crs: CRS | None) -> tuple[float, float, float, float]:
        """This grid's bounds reprojected (densified) into ``crs``."""
        if crs is None or self.crs is None or crs == self.crs:
            return self.bounds
        return transform_bounds(self.crs, crs, *self.bounds, densify_pts=21)

    def clip_to_bounds(self, bounds: tuple[float, float, float, float]) -> "Grid":
        """Sub-grid of the pixels (more than half) inside ``bounds``; :class:`GridError` if empty."""
        left, bottom, right, top = bounds
        inv = ~self.transform
        cols = sorted(inv @ (x, y) for x in (left, right) for y in (bottom, top))
        col0 = max(0, round(min(c for c, _ in cols)))
        col1 = min(self.width, round(max(c for c, _ in cols)))
        row0 = max(0, round(min(r for _, r in cols)))
        row1 = min(self.height, round(max(r for _, r in cols)))
        if col1 <= col0 or row1 <= row0:
            raise GridError(f"the scenes do not overlap (bounds {self.bounds} vs {tuple(round(v, 6) for v in bounds)})")
        return self.window(Window(col0, row0, col1 - col0, row1 - row0))

    def reprojected(self, crs: CRS | None = None, resolution: float | None = None) -> "Grid":
        """The grid covering the same area in ``crs`` at ``resolution`` (CRS units)."""
        if self.crs is None:
            raise GridError("cannot reproject a pixel grid without CRS (--crs/--resolution need georeferenced input)")
        dst_crs = crs or self.crs
        if dst_crs == self.crs and resolution is None:
            return self
        res = (resolution, resolution) if resolution else None
        transform, width, height = calculate_default_transform(
            self.crs, dst_crs, self.width, self.height, *self.bounds, resolution=res
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
