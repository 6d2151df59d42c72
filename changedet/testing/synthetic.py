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
    common = {"driver": "GTiff", "width": width, "height": height, "crs": crs, "transform": transform, "tiled": True,
              "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "zstd", "zstd_level": 1, "bigtiff": "if_safer"}
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


# --------------------------------------------------------------------------------------------
# heterogeneous pair: hyperspectral (date 1) vs LiDAR DSM (date 2)
# --------------------------------------------------------------------------------------------

#: Land-cover classes of the synthetic HSI/LiDAR scene and their heights above the terrain (m).
COVER_HEIGHTS: dict[str, tuple[float, float]] = {
    "grass": (0.0, 0.0),
    "road": (0.0, 0.0),
    "tree": (4.0, 10.0),
    "roof": (6.0, 15.0),
    "water": (-0.5, -0.5),
}
_COVERS = tuple(COVER_HEIGHTS)


def _cover_map(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class index and object height per pixel: grass, a road grid, a pond, buildings and trees."""
    cover = np.zeros((height, width), np.uint8)
    above = np.zeros((height, width), np.float32)
    step = max(16, min(height, width) // 3)
    cover[step // 2 :: step, :], cover[:, step // 2 :: step] = 1, 1
    y, x = np.mgrid[:height, :width]
    pond = (y - 0.8 * height) ** 2 + (x - 0.15 * width) ** 2 < (0.08 * min(height, width)) ** 2
    cover[pond] = 4
    for kind, count in (("roof", max(2, height * width // 600)), ("tree", max(3, height * width // 400))):
        lo, hi = COVER_HEIGHTS[kind]
        for _ in range(count):
            r, c = int(rng.integers(0, height - 3)), int(rng.integers(0, width - 3))
            size = int(rng.integers(3, 8))
            box = (slice(r, min(r + size, height)), slice(c, min(c + size, width)))
            free = cover[box] == 0
            cover[box][free] = _COVERS.index(kind)
            above[box][free] = rng.uniform(lo, hi)
    above[cover == 4] = COVER_HEIGHTS["water"][0]
    return cover, above


def _spectra(bands: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre wavelengths (nm, 380–1050 like CASI) and a smooth reflectance spectrum per class ``(classes, bands)``."""
    nm = np.linspace(380, 1050, bands)
    red_edge = 1 / (1 + np.exp(-(nm - 715) / 12))
    curves = {
        "grass": 0.05 + 0.05 * np.exp(-(((nm - 550) / 30) ** 2)) + 0.40 * red_edge,
        "road": 0.08 + 0.00012 * (nm - 380),
        "tree": 0.03 + 0.03 * np.exp(-(((nm - 550) / 30) ** 2)) + 0.30 * red_edge,
        "roof": 0.20 + 0.10 * np.sin((nm - 380) / 220) ** 2,
        "water": 0.06 * np.exp(-(nm - 380) / 200),
    }
    return nm, np.stack([curves[k] for k in _COVERS])


def write_synthetic_hsi_lidar(
    out_dir: str | Path,
    height: int = 64,
    width: int = 64,
    bands: int = 120,
    crs: str = "EPSG:32615",
    resolution: float = 2.0,
    lidar_factor: int = 2,
    n_changes: int = 4,
    nodata_columns: int = 2,
    seed: int = 0,
) -> SyntheticPair:
    """Write a small georeferenced heterogeneous pair: ``hsi.tif`` (date 1), ``lidar_dsm.tif`` (date 2), ``label.tif``.

    * ``hsi.tif``: ``bands`` bands (uint16 reflectance x 10000, nodata 0, band descriptions are
      the centre wavelengths), ``height`` x ``width`` px of ``resolution`` m;
    * ``lidar_dsm.tif``: 1 band float32 surface heights (m, nodata -9999) on a ``lidar_factor``
      times finer grid over the same footprint, with a gap of ``nodata_columns`` HSI pixels
      wide of nodata (no LiDAR returns) in the middle;
    * ``label.tif``: uint8 0/1 on the HSI grid, 1 where the cover changed between the dates.

    Both dates show one scene (terrain, a road grid, a pond, buildings, trees; spectra and heights
    per class); ``n_changes`` squares change cover before the LiDAR date (new buildings on grass,
    demolished buildings, felled trees). Whole arrays are built in memory: keep scenes small.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cover, above = _cover_map(height, width, rng)
    cover2, above2 = cover.copy(), above.copy()
    label = np.zeros((height, width), np.uint8)
    for i in range(n_changes):
        size = max(3, min(height, width) // 8)
        r, c = int(rng.integers(1, height - size - 1)), int(rng.integers(1, width - size - 1))
        box = (slice(r, r + size), slice(c, c + size))
        if i % 3 == 0:  # new building
            cover2[box], above2[box] = _COVERS.index("roof"), rng.uniform(*COVER_HEIGHTS["roof"])
        else:  # demolished building / felled trees: bare ground
            cover2[box], above2[box] = _COVERS.index("grass"), 0.0
        label[box] = (cover2[box] != cover[box]) | (np.abs(above2[box] - above[box]) > 1.0)
    nm, spectra = _spectra(bands)
    brightness = rng.uniform(0.85, 1.15, (height, width))
    hsi = spectra[cover].transpose(2, 0, 1) * brightness + rng.normal(0, 0.004, (bands, height, width))
    y, x = np.mgrid[:height, :width]
    terrain = 12 + 0.03 * x + 0.02 * y + np.sin(x / 9.0) * np.cos(y / 13.0)
    f = lidar_factor
    dsm = np.kron(terrain + above2, np.ones((f, f))) + rng.normal(0, 0.05, (height * f, width * f))
    gap = slice((width // 2) * f, (width // 2 + nodata_columns) * f)
    dsm[:, gap] = -9999.0
    transform = Affine.translation(271000.0, 3290000.0) @ Affine.scale(resolution, -resolution)
    common = {"driver": "GTiff", "crs": crs, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    paths = SyntheticPair(out / "hsi.tif", out / "lidar_dsm.tif", out / "label.tif")
    with rasterio.open(paths.t1, "w", width=width, height=height, count=bands, dtype="uint16", nodata=0,
                       transform=transform, interleave="band", **common) as dst:  # fmt: skip
        dst.write(np.clip(hsi * 10000, 1, 65535).astype(np.uint16))
        dst.descriptions = tuple(f"{w:.1f} nm" for w in nm)
    with rasterio.open(paths.t2, "w", width=width * f, height=height * f, count=1, dtype="float32", nodata=-9999.0,
                       transform=transform @ Affine.scale(1 / f), **common) as dst:  # fmt: skip
        dst.write(dsm.astype(np.float32)[None])
    with rasterio.open(paths.label, "w", width=width, height=height, count=1, dtype="uint8", transform=transform, **common) as dst:
        dst.write(label[None])
    return paths


def write_synthetic_optical_sar(out_dir: str | Path, side: int = 160, seed: int = 0) -> tuple[Path, Path, Path]:
    """Write a georeferenced optical/SAR pair (EPSG:32631, 10 m) and its change label; returns
    ``(optical.tif, sar.tif, label.tif)``.

    Land cover of 4 classes in 16 px blocks; t1 is optical (3 bands, reflectance-like, noise 0.03), t2 a
    1-band SAR-like image in dB of the t2 classes, through a class-to-backscatter map that is not a
    monotone function of the optical values, with multiplicative (gamma, 4 looks) speckle. One block
    of ``side / 4`` pixels changes class (label 1; elsewhere 0).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    blocks = -(-side // 16)
    classes = np.kron(rng.integers(0, 4, (blocks, blocks)), np.ones((16, 16), int))[:side, :side]
    change = np.zeros((side, side), bool)
    q = side // 4
    change[q : 2 * q, side - 2 * q - q // 2 : side - q - q // 2] = True
    after = classes.copy()
    after[change] = np.where(classes[change] == 3, 1, 3)
    colours = np.array([[0.1, 0.3, 0.1], [0.5, 0.4, 0.3], [0.2, 0.2, 0.6], [0.8, 0.8, 0.7]])
    optical = colours[classes].transpose(2, 0, 1) + rng.normal(0, 0.03, (3, side, side))
    sar = np.array([-12.0, -6.0, -18.0, -2.0])[after] + 10 * np.log10(rng.gamma(4.0, 0.25, (side, side)))
    transform = Affine(10, 0, 500000, 0, -10, 4600000)
    paths = []
    for name, data, dtype in (("optical.tif", optical, "float32"), ("sar.tif", sar[None], "float32"),
                              ("label.tif", change[None], "uint8")):
        path = out / name
        with rasterio.open(path, "w", driver="GTiff", count=data.shape[0], height=side, width=side, dtype=dtype,
                           crs="EPSG:32631", transform=transform) as ds:
            ds.write(data.astype(dtype))
        paths.append(path)
    return paths[0], paths[1], paths[2]
