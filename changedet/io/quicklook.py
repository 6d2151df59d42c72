"""A small PNG preview of the change probability (for reports and Prefect artifacts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling

from changedet.io.writers import writing


def write_quicklook(prob_path: str | Path, png_path: str | Path, max_size: int = 512) -> Path:
    """Write ``png_path``: probability 0→1 as dark→yellow/red, nodata transparent, read from overviews."""
    with rasterio.open(prob_path) as src:
        scale = max(src.width, src.height) / max_size
        shape = (max(1, round(src.height / max(scale, 1))), max(1, round(src.width / max(scale, 1))))
        prob = src.read(1, out_shape=shape, resampling=Resampling.average, masked=True)
    p = np.clip(prob.filled(0).astype(np.float32), 0, 1)
    rgba = np.stack([255 * np.sqrt(p), 255 * p**2, 40 * (1 - p), np.where(prob.mask, 0, 255)], axis=-1)
    with writing(png_path):
        Image.fromarray(rgba.astype(np.uint8), "RGBA").save(png_path)
    return Path(png_path)
