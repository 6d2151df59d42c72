"""Cross-domain test scenes: OSCD (Sentinel-2) models tested on Landsat-7 ETM+ (Taizhou).

ETM+ bands 1, 2, 3, 4, 5, 7 (0.48, 0.57, 0.66, 0.83, 1.65, 2.22 µm) correspond to Sentinel-2
B02, B03, B04, B08, B11, B12 (:data:`ETM_TO_S2`): a model trained on those six OSCD bands reads a
Taizhou pair band for band. Units differ (OSCD: reflectance × 10000; Taizhou: 8-bit DN), which is
the domain gap that histogram matching to the source (:func:`~changedet.evaluation.adaptation.match_scene`)
and AdaBN address. Taizhou labels are sparse: only sampled pixels count (:func:`taizhou_scene`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from changedet.data.discovery import SceneRecord
from changedet.data.scenes import IGNORE, ChangeScene

#: Sentinel-2 band standing in for each Taizhou ETM+ band, in file order
ETM_TO_S2 = ("B02", "B03", "B04", "B08", "B11", "B12")


def taizhou_label(root: str | Path) -> np.ndarray:
    """The sparse Taizhou label: 1 sampled change, 0 sampled no-change, :data:`IGNORE` elsewhere."""
    root = Path(root)
    change = np.asarray(Image.open(root / "change.bmp").convert("L")) > 0
    unchanged = np.asarray(Image.open(root / "unchanged.bmp").convert("L")) > 0
    label = np.full(change.shape, IGNORE, np.uint8)
    label[unchanged] = 0
    label[change] = 1
    return label


def taizhou_scene(root: str | Path, work_dir: str | Path) -> ChangeScene:
    """The Taizhou 2000/2003 pair (6 bands, held in memory) with :func:`taizhou_label` written to
    ``work_dir/taizhou-label.tif`` (no CRS: on the image's pixel grid)."""
    root, work_dir = Path(root), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    label = taizhou_label(root)
    path = work_dir / "taizhou-label.tif"
    tmp = work_dir / f".taizhou-label.{os.getpid()}.tif"
    profile = {"driver": "GTiff", "width": label.shape[1], "height": label.shape[0], "count": 1, "dtype": "uint8"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(label, 1)
    tmp.replace(path)
    record = SceneRecord("taizhou", str(root / "2000TM"), str(root / "2003TM"), str(path), change_value=1, ignore_values=(IGNORE,))
    return ChangeScene.open(record).cache()
