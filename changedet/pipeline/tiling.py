"""Overlapping tiles over a grid: fixed-size windows, edge tiles shifted inwards (no lost borders).

:class:`Tiling` holds how a scene is cut and blended back (tile size, overlap, blend mode) with the
defaults and bounds every path shares: detect, training validation and the evaluation stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window

from changedet.errors import ChangeDetError

DEFAULT_TILE = 256
DEFAULT_OVERLAP = 32
MIN_TILE = 16  # smaller tiles give most models more padding than scene
BLEND_MODES = ("cosine", "mean", "owner")
DEFAULT_BATCH_SIZE = 8  # tiles read and predicted together


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
    if tile < MIN_TILE:
        raise ChangeDetError(f"--tile must be at least {MIN_TILE} px, got {tile}")
    if not 0 <= overlap < tile:
        raise ChangeDetError(f"--overlap must be in [0, tile) = [0, {tile}), got {overlap}")


@dataclass(frozen=True)
class Tiling:
    """How a scene is cut into tiles and blended back: ``tile`` px squares overlapping by at least
    ``overlap`` px, overlaps blended with ``blend`` (:data:`BLEND_MODES`)."""

    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    blend: str = "cosine"

    def __post_init__(self) -> None:
        validate_tiling(self.tile, self.overlap)
        if self.blend not in BLEND_MODES:
            raise ChangeDetError(f"--blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")

    def plan(self, height: int, width: int) -> list[Tile]:
        """:func:`plan_tiles` of a ``height`` × ``width`` grid."""
        return plan_tiles(height, width, self.tile, self.overlap)


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
