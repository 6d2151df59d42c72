"""Tiling covers every pixel; tile -> mosaic with an identity model reproduces the input exactly."""

import numpy as np
import pytest

from changedet.pipeline.mosaic import StreamingMosaic, blend_weights
from changedet.pipeline.tiling import plan_tiles

SHAPES = [(395, 360, 128, 32), (100, 77, 64, 17), (50, 50, 64, 8), (300, 301, 64, 0), (257, 513, 256, 31)]


@pytest.mark.parametrize("height,width,tile,overlap", SHAPES)
def test_tiles_cover_every_pixel_with_equal_sizes(height, width, tile, overlap):
    tiles = plan_tiles(height, width, tile, overlap)
    cover = np.zeros((height, width), int)
    for t in tiles:
        assert (t.height, t.width) == (min(tile, height), min(tile, width))
        assert t.row_off + t.height <= height and t.col_off + t.width <= width
        cover[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width] += 1
    assert cover.min() >= 1


def _mosaic(image, valid, tile, overlap, blend, order=None, emitted=None):
    bands, height, width = image.shape
    out = np.full(image.shape, -1.0, np.float32)
    emitted = [] if emitted is None else emitted

    def sink(row, values, ok):
        emitted.append((row, values.shape[1]))
        out[:, row : row + values.shape[1]] = values

    tiles = plan_tiles(height, width, tile, overlap)
    mosaic = StreamingMosaic((height, width), tiles, bands, sink, overlap, blend)
    for t in order(tiles) if order else tiles:
        sl = (slice(t.row_off, t.row_off + t.height), slice(t.col_off, t.col_off + t.width))
        if valid[sl].any():
            mosaic.add(t, image[(slice(None), *sl)], valid[sl])
        else:
            mosaic.skip(t)
    assert mosaic.complete
    rows = [r for r, _ in emitted]
    assert rows == list(np.cumsum([0] + [n for _, n in emitted[:-1]])) and sum(n for _, n in emitted) == height  # no gap, no overlap
    return out


@pytest.mark.parametrize("height,width,tile,overlap", SHAPES)
@pytest.mark.parametrize("blend", ["cosine", "mean"])
def test_identity_round_trip_is_exact(height, width, tile, overlap, blend):
    image = np.random.default_rng(height * width).random((2, height, width)).astype(np.float32)
    valid = np.ones((height, width), bool)
    out = _mosaic(image, valid, tile, overlap, blend)
    np.testing.assert_array_equal(out, image)


def test_out_of_order_tiles_and_invalid_pixels():
    rng = np.random.default_rng(1)
    image = rng.random((1, 200, 170)).astype(np.float32)
    valid = rng.random((200, 170)) > 0.2
    valid[:80, :] = False  # whole tiles without data are skipped
    out = _mosaic(image, valid, 64, 16, "cosine", order=lambda t: t[::-1])
    np.testing.assert_array_equal(out[0][valid], image[0][valid])
    assert np.isnan(out[0][~valid]).all()


def test_weights_taper_only_towards_neighbours():
    tiles = plan_tiles(100, 100, 64, 16)
    first = blend_weights(tiles[0], (100, 100), 16)
    assert first[0, 0] == 1.0  # scene corner: no taper
    assert first[-1, -1] < 0.1 and first.min() > 0  # interior corner tapers but stays positive


@pytest.mark.parametrize("tile,overlap", [(8, 0), (64, 64), (64, 80), (64, -1)])
def test_bad_tiling_is_refused(tile, overlap):
    from changedet.errors import ChangeDetError

    with pytest.raises(ChangeDetError):
        plan_tiles(100, 100, tile, overlap)


def test_rows_reach_the_sink_in_small_pieces_with_the_same_values(monkeypatch):
    """A finished strip goes to the sink ``EMIT_PIXELS`` at a time, with the values of whole strips."""
    import changedet.pipeline.mosaic as mosaic_module

    rng = np.random.default_rng(5)
    image = rng.random((2, 230, 170)).astype(np.float32)
    valid = rng.random((230, 170)) > 0.1
    whole = _mosaic(image, valid, 64, 16, "cosine")
    monkeypatch.setattr(mosaic_module, "EMIT_PIXELS", 7 * 170 + 3)  # 7 rows of this width per piece
    pieces = []
    np.testing.assert_array_equal(_mosaic(image, valid, 64, 16, "cosine", emitted=pieces), whole)
    assert max(n for _, n in pieces) == 7 and len(pieces) >= 230 // 7
