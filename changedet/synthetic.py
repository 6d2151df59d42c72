"""Synthetic georeferenced scene pairs with planted changes, written block-wise (any size).

Used by tests (tiny pairs) and benchmarks (8k² / 16k² pairs) without holding a scene in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

BLOCK = 512


@dataclass(frozen=True)
class SyntheticPair:
    """Paths of a generated pair and its label."""

    t1: Path
    t2: Path
    label: Path


def _background(rows: np.ndarray, cols: np.ndarray, band: int) -> np.ndarray:
    y, x = np.meshgrid(rows, cols, indexing="ij")
    f = 0.004 * (band + 1)
    return 3000 + 800 * np.sin(f * x + band) * np.cos(0.7 * f * y) + 300 * np.sin(0.05 * (x + 2 * y))


def _changes(height: int, width: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = max(4, min(height, width) // 40)
    r0 = rng.integers(0, max(1, height - size), n)
    c0 = rng.integers(0, max(1, width - size), n)
    return np.stack([r0, c0, r0 + size, c0 + size], axis=1)


def write_synthetic_pair(
    out_dir: str | Path,
    height: int,
    width: int,
    bands: int = 4,
    crs: str = "EPSG:32631",
    resolution: float = 10.0,
    n_changes: int = 50,
    nodata: int = 0,
    seed: int = 0,
) -> SyntheticPair:
    """Write ``t1.tif``, ``t2.tif`` (uint16, ``bands`` bands) and ``label.tif`` (uint8 0/1).

    t2 = t1 with a radiometric gain/offset and noise, plus ``n_changes`` square patches whose
    spectra are replaced (the label marks them). Written in 512-row blocks, tiled and compressed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transform = Affine.translation(500000.0, 5400000.0) @ Affine.scale(resolution, -resolution)
    common = dict(driver="GTiff", width=width, height=height, crs=crs, transform=transform, tiled=True,
                  blockxsize=BLOCK, blockysize=BLOCK, compress="zstd", zstd_level=1, bigtiff="if_safer")
    boxes = _changes(height, width, n_changes, seed)
    rng = np.random.default_rng(seed + 1)
    paths = SyntheticPair(out / "t1.tif", out / "t2.tif", out / "label.tif")
    with (
        rasterio.open(paths.t1, "w", count=bands, dtype="uint16", nodata=nodata, **common) as d1,
        rasterio.open(paths.t2, "w", count=bands, dtype="uint16", nodata=nodata, **common) as d2,
        rasterio.open(paths.label, "w", count=1, dtype="uint8", **common) as dl,
    ):
        cols = np.arange(width)
        for row0 in range(0, height, BLOCK):
            n = min(BLOCK, height - row0)
            rows = np.arange(row0, row0 + n)
            label = np.zeros((n, width), np.uint8)
            for r0, c0, r1, c1 in boxes:
                if r1 > row0 and r0 < row0 + n:
                    label[max(r0 - row0, 0) : min(r1 - row0, n), c0:c1] = 1
            window = Window(0, row0, width, n)
            for b in range(bands):
                base = _background(rows, cols, b)
                x1 = base + rng.normal(0, 30, base.shape)
                x2 = 1.05 * base + 40 + rng.normal(0, 30, base.shape)
                x2 = np.where(label == 1, 6500 - 0.8 * base, x2)
                d1.write(np.clip(x1, 1, 65535).astype(np.uint16), b + 1, window=window)
                d2.write(np.clip(x2, 1, 65535).astype(np.uint16), b + 1, window=window)
            dl.write(label, 1, window=window)
    return paths
