"""Overlapping tiles over a grid: fixed-size windows, edge tiles shifted inwards (no lost borders)."""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window

from changedet.errors import ChangeDetError


@dataclass(frozen=True)
class Tile:
    """One tile: its position in the plan and its window (in pixels of the grid)."""

    index: int
    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def window(self) -> Window:
        """The rasterio window of this tile."""
        return Window(self.col_off, self.row_off, self.width, self.height)


def tile_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride ``tile - overlap``, the last tile flush with the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    offsets = list(range(0, size - tile, stride))
    offsets.append(size - tile)
    return offsets


def validate_tiling(tile: int, overlap: int) -> None:
    """Raise :class:`ChangeDetError` for a tile size/overlap that cannot work."""
    if tile < 16:
        raise ChangeDetError(f"--tile must be at least 16 px, got {tile}")
    if not 0 <= overlap < tile:
        raise ChangeDetError(f"--overlap must be in [0, tile) = [0, {tile}), got {overlap}")


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles of ``min(tile, height) × min(tile, width)`` covering every pixel.

    Tiles overlap by at least ``overlap`` pixels; the last row/column is shifted back so it ends at
    the scene edge, so every tile has the same size (what batched inference needs).
    """
    validate_tiling(tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    tiles = []
    for r in tile_offsets(height, tile, overlap):
        for c in tile_offsets(width, tile, overlap):
            tiles.append(Tile(len(tiles), r, c, th, tw))
    return tiles
