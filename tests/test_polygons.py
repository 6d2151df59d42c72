"""Strip-wise polygonisation: regions crossing strip borders become one feature, whatever the strip height."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest

from changedet.io import polygons


@pytest.mark.parametrize("strip_rows", [1, 3, 7, 64])
def test_strip_height_does_not_change_the_polygons(make_raster, tmp_path, monkeypatch, strip_rows):
    mask = np.zeros((40, 32), np.uint8)
    mask[2:30, 3:6] = mask[2:30, 12:15] = 1  # a U: two legs joined at the bottom, in different strips
    mask[27:30, 3:15] = 1
    mask[33:38, 20:30] = 1  # a separate block
    mask[0, 31] = 1  # a single pixel in the corner
    prob = np.where(mask == 1, 0.9, 0.1).astype(np.float32)
    mask_path, prob_path = make_raster("mask.tif", mask), make_raster("prob.tif", prob)
    monkeypatch.setattr(polygons, "STRIP_PIXELS", strip_rows * mask.shape[1])
    n, area = polygons.polygonize_mask(mask_path, prob_path, tmp_path / f"changes_{strip_rows}.gpkg")

    frame = gpd.read_file(tmp_path / f"changes_{strip_rows}.gpkg")
    assert n == len(frame) == 3
    assert sorted(frame["pixels"]) == sorted([int(mask[2:30, 3:6].sum() * 2 + 3 * 6), 50, 1])
    assert area == pytest.approx(mask.sum() * 100.0)  # 10 m pixels
    assert np.allclose(frame["mean_prob"], 0.9)
    assert (frame.geometry.area.to_numpy() == frame["pixels"].to_numpy() * 100.0).all()
