"""Plant a known misregistration in a real date without resampling it (tests and benchmarks)."""

from __future__ import annotations

import shutil
from pathlib import Path

from affine import Affine
import rasterio

from changedet.io.scene import open_scene


def write_shifted_date(src: str | Path, dst: str | Path, shift_px: tuple[float, float]) -> Path:
    """Copy the raster files of the folder ``src`` to ``dst`` with every georeference moved so that a
    feature at column c, row r of the original appears at column c + dx, row r + dy of the copy once
    read on the original's finest grid (pixel values untouched: only the geotransforms change)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    finest = open_scene(src).finest_band().grid.transform
    gx, gy = finest.a * shift_px[0] + finest.b * shift_px[1], finest.d * shift_px[0] + finest.e * shift_px[1]
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        target = dst / path.name
        shutil.copyfile(path, target)
        if path.suffix.lower() in (".tif", ".tiff"):
            with rasterio.open(target, "r+") as ds:
                ds.transform = Affine.translation(gx, gy) @ ds.transform
    return dst
