"""Plant an opaque cloud in a real Sentinel-2 date (tests and benchmarks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import rasterio

from changedet.io.scene import band_name_from_filename, open_scene

#: top-of-atmosphere digital numbers of a thick cloud: bright and flat from B01 to B12, a little cirrus signal in B10
CLOUD_DN = {"B10": 600}
CLOUD_BRIGHT_DN = 6500


def write_clouded_date(src: str | Path, dst: str | Path, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Copy the per-band folder ``src`` to ``dst`` with a disk of cloud (``centre`` = (row, col) and
    ``radius`` in pixels of the date's finest grid) written into every band; returns the disk on that grid."""
    dst = Path(dst)
    shutil.copytree(src, dst)
    finest = open_scene(dst).finest_band().grid
    for path in sorted(p for p in dst.iterdir() if p.suffix.lower() in (".tif", ".tiff")):
        with rasterio.open(path, "r+") as ds:
            data = ds.read(1)
            scale = finest.height / ds.height  # finest-grid pixels per pixel of this band
            rows, cols = np.mgrid[0 : ds.height, 0 : ds.width]
            disk = np.hypot((rows + 0.5) * scale - centre[0], (cols + 0.5) * scale - centre[1]) < radius
            value = CLOUD_DN.get(band_name_from_filename(str(path)), CLOUD_BRIGHT_DN)
            ds.write(np.where(disk, value, data).astype(data.dtype), 1)
    rows, cols = np.mgrid[0 : finest.height, 0 : finest.width]
    return np.hypot(rows + 0.5 - centre[0], cols + 0.5 - centre[1]) < radius
