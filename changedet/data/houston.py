"""Houston 2013 (IEEE GRSS DFC 2013) hyperspectral + LiDAR labelled pixel samples (``houston2013_partial``).

Only the training samples carry both modalities (the folder has no hyperspectral test vectors):
2832 pixels with a 144-band spectrum (band-wise 0–1), 21 LiDAR-derived features (0–1) and a class
1–15, at known positions of the 349×1905 scene grid (row ``i`` of the sample arrays is the
``i``-th labelled pixel of the TR class raster in row-major order).

:func:`held_apart_split` sets part of those samples apart **by region**: the labelled pixels
come in small polygons (connected groups of one class), and neighbouring pixels of a polygon are
near-duplicates, so a random pixel split would leak. Whole regions go to one side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.io import loadmat

from changedet.errors import InputError
from changedet.io.scene import open_raster

FC_DIR = Path("IEEE_TGRS_MDL-RS") / "MDL-RS_FC-Nets" / "HSI_LiDAR_FC"
TR_RASTER = Path("ISPRS_S2FL") / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif"


@dataclass(frozen=True)
class HoustonSamples:
    """Co-located samples: ``hsi (N, 144)``, ``lidar (N, 21)`` float32, ``labels (N,)`` 1–15 and
    their ``rows``/``cols`` on the scene grid."""

    hsi: np.ndarray
    lidar: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> HoustonSamples:
        """The samples at ``index``."""
        return HoustonSamples(*(a[index] for a in (self.hsi, self.lidar, self.labels, self.rows, self.cols)))


def _mat(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"Houston 2013 file {path} is missing")
    return loadmat(path)[path.stem]


def load_houston(root: str | Path) -> HoustonSamples:
    """The training samples with both modalities and their positions (checked against the TR raster)."""
    root = Path(root)
    hsi = _mat(root / FC_DIR / "HSI_TrSet.mat").astype(np.float32)
    lidar = _mat(root / FC_DIR / "LiDAR_TrSet.mat").astype(np.float32)
    labels = _mat(root / FC_DIR / "TrLabel.mat").ravel().astype(np.int64)
    with open_raster(root / TR_RASTER) as ds:
        raster = ds.read(1)
    rows, cols = np.nonzero(raster)
    if not len(hsi) == len(lidar) == len(labels) == len(rows) or not np.array_equal(raster[rows, cols], labels):
        raise InputError(f"Houston 2013 samples under {root} do not match the TR class raster")
    return HoustonSamples(hsi, lidar, labels, rows, cols)


def held_apart_split(samples: HoustonSamples, fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, held_apart)``: per class, whole 8-connected regions of that class in random
    order are set apart until at least ``fraction`` of the class's samples are; every class keeps
    at least one region on each side."""
    rng = np.random.default_rng(seed)
    shape = (int(samples.rows.max()) + 1, int(samples.cols.max()) + 1)
    held = np.zeros(len(samples), bool)
    for cls in np.unique(samples.labels):
        members = np.flatnonzero(samples.labels == cls)
        grid = np.zeros(shape, bool)
        grid[samples.rows[members], samples.cols[members]] = True
        regions, count = ndimage.label(grid, structure=np.ones((3, 3)))
        region_of = regions[samples.rows[members], samples.cols[members]]
        taken = 0
        for region in rng.permutation(np.arange(1, count + 1))[: max(count - 1, 0)]:
            if taken >= fraction * len(members):
                break
            inside = members[region_of == region]
            held[inside] = True
            taken += len(inside)
    return np.flatnonzero(~held), np.flatnonzero(held)
