"""Streaming mosaic: blend overlapping tile predictions and emit finished rows block by block.

Memory is bounded by a strip of about two tile heights × the scene width, whatever the scene height:
rows are emitted as soon as no pending tile touches them, to the sink a few MB at a time.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from changedet.pipeline.tiling import BLEND_MODES, Tile, Tiling, tile_offsets


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D weights: a raised-cosine (Hann) ramp over ``overlap`` px on interior sides, 1 elsewhere."""
    weights = np.ones(length, np.float64)
    n = min(overlap, length // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
        if ramp_start:
            weights[:n] = np.minimum(weights[:n], ramp)
        if ramp_end:
            weights[-n:] = np.minimum(weights[-n:], ramp[::-1])
    return weights


def _owned(size: int, offset: int, length: int, overlap: int) -> np.ndarray:
    """1-D: 1 where the tile at ``offset`` has the nearest centre among the plan's tiles of this axis."""
    offsets = tile_offsets(size, length, overlap)
    k = offsets.index(offset)
    start = 0 if k == 0 else (offsets[k - 1] + offset + length) // 2
    end = size if k == len(offsets) - 1 else (offset + offsets[k + 1] + length) // 2
    owned = np.zeros(length, bool)
    owned[start - offset : end - offset] = True
    return owned


def blend_weights(tile: Tile, grid_shape: tuple[int, int], overlap: int, mode: str = "cosine") -> np.ndarray:
    """Per-pixel weights ``(h, w)`` of a tile of :func:`~changedet.pipeline.tiling.plan_tiles`.

    ``cosine`` ramps the weight down towards tile sides that border another tile (not the scene
    border), so seams vanish; ``mean`` weights all pixels 1 (plain average of overlaps); both are
    strictly positive. ``owner`` is 1 on the pixels whose nearest tile centre is this tile's and 0
    elsewhere: every pixel comes from exactly one tile (what randomized smoothing's votes need).
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}; choose one of {BLEND_MODES}")
    if mode == "mean":
        return np.ones((tile.height, tile.width), np.float64)
    if mode == "owner":
        rows = _owned(grid_shape[0], tile.row_off, tile.height, overlap)
        cols = _owned(grid_shape[1], tile.col_off, tile.width, overlap)
        return np.outer(rows, cols).astype(np.float64)
    height, width = grid_shape
    wy = _ramp(tile.height, overlap, tile.row_off > 0, tile.row_off + tile.height < height)
    wx = _ramp(tile.width, overlap, tile.col_off > 0, tile.col_off + tile.width < width)
    return np.outer(wy, wx)


RowSink = Callable[[int, np.ndarray, np.ndarray], None]
EMIT_PIXELS = 1 << 21  # pixels per call of the sink (rows of the scene width)


class StreamingMosaic:
    """Accumulates ``(bands, h, w)`` tile values with blend weights and emits finished rows.

    ``sink(row_off, values, valid)`` receives ``values (bands, n_rows, width)`` float32 (NaN where
    invalid) and ``valid (n_rows, width)`` bool, top to bottom, each row exactly once. Tiles may
    arrive in any order; memory stays bounded when they arrive roughly row-major.
    """

    def __init__(
        self,
        grid_shape: tuple[int, int],
        tiles: Iterable[Tile],
        bands: int,
        sink: RowSink,
        overlap: int,
        blend: str = "cosine",
    ) -> None:
        self.height, self.width = grid_shape
        self.bands = bands
        self.sink = sink
        self.overlap = overlap
        self.blend = blend
        blend_weights(Tile(0, 0, 0, 1, 1), grid_shape, 0, blend)  # validate the mode early
        self._pending: dict[int, int] = {}
        tallest = 1
        for t in tiles:
            self._pending[t.row_off] = self._pending.get(t.row_off, 0) + 1
            tallest = max(tallest, t.height)
        self._row0 = 0
        self._rows = 0  # rows of the buffer in use, starting at grid row self._row0
        capacity = tallest  # enough when tiles arrive row-major; grows otherwise
        self._sum = np.zeros((bands, capacity, self.width), np.float64)
        self._weight = np.zeros((capacity, self.width), np.float64)

    def _grow(self, bottom: int) -> None:
        """Make the buffer cover grid rows up to ``bottom`` (reallocating only for out-of-order tiles)."""
        needed = bottom - self._row0
        if needed > self._weight.shape[0]:
            extra = needed - self._weight.shape[0]
            self._sum = np.concatenate([self._sum, np.zeros((self.bands, extra, self.width))], axis=1)
            self._weight = np.concatenate([self._weight, np.zeros((extra, self.width))], axis=0)
        self._rows = max(self._rows, needed)

    def add(self, tile: Tile, values: np.ndarray, valid: np.ndarray) -> None:
        """Blend a tile's ``values (bands, h, w)``; pixels where ``valid`` is False do not contribute."""
        if tile.row_off < self._row0:
            raise ValueError(f"tile {tile.index} starts at row {tile.row_off}, already emitted")
        self._grow(tile.row_off + tile.height)
        weight = blend_weights(tile, (self.height, self.width), self.overlap, self.blend) * valid
        r = tile.row_off - self._row0
        rows, cols = slice(r, r + tile.height), slice(tile.col_off, tile.col_off + tile.width)
        self._sum[:, rows, cols] += np.where(valid, values, 0.0) * weight
        self._weight[rows, cols] += weight
        self._done(tile)

    def skip(self, tile: Tile) -> None:
        """Mark a tile with no valid pixel as done."""
        self._done(tile)

    def _done(self, tile: Tile) -> None:
        self._pending[tile.row_off] -= 1
        if self._pending[tile.row_off] == 0:
            del self._pending[tile.row_off]
        final = min(self._pending, default=self.height)
        if final > self._row0:
            self._emit(final)

    def _emit(self, until: int) -> None:
        self._grow(until)
        n = until - self._row0
        step = max(1, EMIT_PIXELS // self.width)
        for top in range(0, n, step):  # the sink's arrays (and its own temporaries) stay a few MB
            rows = slice(top, min(top + step, n))
            weight = self._weight[rows]
            valid = weight > 0
            values = np.full((self.bands, weight.shape[0], self.width), np.nan, np.float32)
            np.divide(self._sum[:, rows], weight, out=values, where=valid, casting="same_kind")
            self.sink(self._row0 + top, values, valid)
        rest = self._rows - n  # shift the unfinished rows to the top, clear the rest
        self._sum[:, :rest] = self._sum[:, n : self._rows]
        self._weight[:rest] = self._weight[n : self._rows]
        self._sum[:, rest : self._rows] = 0
        self._weight[rest : self._rows] = 0
        self._rows = rest
        self._row0 = until

    @classmethod
    def of(cls, tiling: Tiling, grid_shape: tuple[int, int], tiles: Iterable[Tile], bands: int, sink: RowSink) -> "StreamingMosaic":
        """A mosaic blending ``tiles`` of ``tiling`` (its overlap and blend mode)."""
        return cls(grid_shape, tiles, bands, sink, tiling.overlap, tiling.blend)

    @property
    def complete(self) -> bool:
        """True once every row of the grid has been emitted."""
        return self._row0 >= self.height
