"""Common grid: per-band 10/20/60 m stacking, reprojected dates, OSCD size quirks, pixel grids."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from changedet.pipeline.align import PairReader, align_pair, read_scene_block_mean
from changedet.pipeline.grid import Grid
from changedet.io.scene import SENTINEL2_ORDER, open_scene


def _full(pair):
    with PairReader(pair) as reader:
        return reader.read(Window(0, 0, pair.grid.width, pair.grid.height))


def _shift(a: np.ndarray, b: np.ndarray, radius: int = 3) -> tuple[float, float]:
    """Sub-pixel shift of b relative to a from the normalised cross-correlation peak."""
    a = (a - a.mean()) / a.std()
    b = (b - b.mean()) / b.std()
    r = radius
    core = (slice(r, -r), slice(r, -r))
    scores = np.zeros((2 * r + 1, 2 * r + 1))
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = np.roll(np.roll(b, dy, 0), dx, 1)
            scores[dy + r, dx + r] = np.mean(a[core] * shifted[core])
    iy, ix = np.unravel_index(np.argmax(scores), scores.shape)

    def refine(c, m, p):
        denom = m - 2 * c + p
        return 0.0 if denom == 0 else 0.5 * (m - p) / denom

    dy = iy - r + (refine(scores[iy, ix], scores[iy - 1, ix], scores[iy + 1, ix]) if 0 < iy < 2 * r else 0)
    dx = ix - r + (refine(scores[iy, ix], scores[iy, ix - 1], scores[iy, ix + 1]) if 0 < ix < 2 * r else 0)
    return -dy, -dx


def test_per_band_files_stack_onto_the_10m_grid(sample_city):
    t1 = open_scene(sample_city / "imgs_1")
    assert t1.band_names == SENTINEL2_ORDER
    pair = align_pair(t1, open_scene(sample_city / "imgs_2"))
    with rasterio.open(next((sample_city / "imgs_1").glob("*_B02.tif"))) as b02:
        assert pair.grid == Grid.from_dataset(b02)
    x1, x2, valid = _full(pair)
    assert x1.shape == (13, 395, 360) and valid.all()
    assert np.isfinite(x1).all() and np.isfinite(x2).all()
    names = list(SENTINEL2_ORDER)
    # 20 m B8A resampled to 10 m lines up with 10 m B08 (same NIR signal): no shift.
    dy, dx = _shift(x1[names.index("B08")], x1[names.index("B8A")])
    assert abs(dy) < 0.5 and abs(dx) < 0.5
    # 60 m B01 resampled by geotransform lines up with 10 m B02 (a nearest/corner-anchored zoom would not)
    dy, dx = _shift(x1[names.index("B02")], x1[names.index("B01")])
    assert abs(dy) < 0.5 and abs(dx) < 0.5


def _reproject_band(src_path: Path, dst_path: Path, crs: str, res: float) -> None:
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds, resolution=res)
        profile = src.profile | {"crs": crs, "transform": transform, "width": width, "height": height, "dtype": "float32", "nodata": -1.0}
        data = np.full((height, width), -1.0, np.float32)
        reproject(rasterio.band(src, 1), data, dst_transform=transform, dst_crs=crs, resampling=Resampling.bilinear, dst_nodata=-1.0)
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(data, 1)


def test_t2_in_another_crs_and_resolution_aligns_within_half_a_pixel(sample_city, tmp_path):
    b04 = next((sample_city / "imgs_2").glob("*_B04.tif"))
    _reproject_band(b04, tmp_path / "t2_utm.tif", "EPSG:32631", 12.0)
    t1 = open_scene(next((sample_city / "imgs_1").glob("*_B04.tif")))
    t2 = open_scene(tmp_path / "t2_utm.tif")
    pair = align_pair(t1, t2)
    assert pair.grid.crs == t1.bands[0].grid.crs and pair.grid.res == t1.bands[0].grid.res
    x1, x2, valid = _full(pair)
    # the warped-back t2 matches the original t2 band on t1's grid: no shift beyond half a pixel
    original = open_scene(b04)
    ref = _full(align_pair(original, original))[0][0]
    inner = (slice(10, -10), slice(10, -10))
    assert valid[inner].all()
    dy, dx = _shift(ref[inner], x2[0][inner])
    assert abs(dy) < 0.5 and abs(dx) < 0.5, (dy, dx)


def test_target_crs_and_resolution_options(sample_city):
    t1 = open_scene(sample_city / "imgs_1", ["B02", "B03"])
    t2 = open_scene(sample_city / "imgs_2", ["B02", "B03"])
    pair = align_pair(t1, t2, crs="EPSG:32631", resolution=20.0)
    assert pair.grid.crs.to_epsg() == 32631 and pair.grid.res == (20.0, 20.0)
    x1, x2, valid = _full(pair)
    assert 0.8 < valid.mean() <= 1.0  # lon/lat footprint inside a UTM box: corners are nodata


@pytest.mark.shared_data
@pytest.mark.parametrize("city", ["abudhabi", "hongkong", "saclay_e"])
def test_oscd_size_quirk_resampled_onto_t1_grid(shared_data, city):
    root = shared_data / "oscd" / "images" / city
    pair = align_pair(open_scene(root / "imgs_1"), open_scene(root / "imgs_2"))
    with rasterio.open(shared_data / "oscd" / "labels" / city / "cm" / f"{city}-cm.tif") as label:
        label_shape = label.shape
    # imgs_2 covers the same footprint with slightly larger pixels: the grid stays t1's full grid
    assert pair.grid.shape == label_shape == pair.reference.shape
    x1, x2, valid = _full(pair)
    assert valid.mean() > 0.99
    b04 = list(SENTINEL2_ORDER).index("B04")
    corner = 150
    top_left = _shift(x1[b04][:corner, :corner], x2[b04][:corner, :corner])
    bottom_right = _shift(x1[b04][-corner:, -corner:], x2[b04][-corner:, -corner:])
    # The data carry a constant ~1 px inter-date co-registration offset; what resampling must avoid
    # is a misalignment growing towards the bottom/right (2-9 px with edge padding): compare corners.
    assert abs(top_left[0] - bottom_right[0]) < 0.5 and abs(top_left[1] - bottom_right[1]) < 0.5


def test_pixel_grids_without_crs_align_at_the_corner(make_raster):
    a = make_raster("a.tif", np.ones((3, 40, 50), np.uint8), crs=None)
    b = make_raster("b.tif", np.ones((3, 38, 52), np.uint8), crs=None)
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        pair = align_pair(open_scene(a), open_scene(b))
    assert pair.grid.shape == (38, 50) and pair.grid.crs is None


def test_nodata_and_nan_become_invalid(make_raster):
    d1 = np.full((2, 30, 30), 5.0, np.float32)
    d1[0, 0, 0] = -1
    d2 = d1.copy()
    d2[1, 5, 5] = np.nan
    pair = align_pair(open_scene(make_raster("a.tif", d1, nodata=-1)), open_scene(make_raster("b.tif", d2)))
    _, _, valid = _full(pair)
    assert not valid[0, 0] and not valid[5, 5] and valid.sum() == 30 * 30 - 2


def test_block_means_in_strips_are_the_means_of_the_valid_fine_pixels(make_raster):
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 100, (2, 47, 53)).astype(np.float32)
    data[:, 5:9, 10:20] = np.nan  # invalid pixels: left out of their blocks' means
    data[:, 42:, 48:] = np.nan  # the whole last (partial) block of the last row: invalid
    pair = align_pair(open_scene(make_raster("a.tif", data)), open_scene(make_raster("b.tif", data)))
    x1, _, valid = _full(pair)
    factor = 6
    means, ok = read_scene_block_mean(pair.t1, pair, factor, strip_pixels=400)  # several strips of whole blocks
    coarse = pair.grid.coarsened(factor)
    assert means.shape == (2, coarse.height, coarse.width) == (2, 8, 9) and ok.shape == coarse.shape
    for r in range(coarse.height):
        for c in range(coarse.width):
            block = (slice(r * factor, (r + 1) * factor), slice(c * factor, (c + 1) * factor))
            inside = valid[block]
            assert ok[r, c] == inside.any()
            if inside.any():
                np.testing.assert_allclose(means[:, r, c], x1[:, block[0], block[1]][:, inside].mean(axis=1), rtol=1e-5)
    assert not ok[-1, -1] and ok[0, 0]
