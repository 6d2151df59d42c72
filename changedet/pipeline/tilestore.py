"""Persistent per-tile predictions (Zarr), so an interrupted run only recomputes missing tiles.

Layout: one Zarr group per run fingerprint with ``pred`` ``(n_tiles, 2, h, w)`` float32 (probability,
difference; NaN where invalid), one chunk per tile, and ``done`` ``(n_tiles,)`` uint8, one chunk per
tile, set after the tile's prediction chunk. Zarr's local store writes every chunk atomically
(temp file + rename), so a run killed at any point leaves only complete tiles marked done.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from changedet.io.writers import writing

FINGERPRINT_ATTR = "changedet_fingerprint"


class TileStore:
    """Tile results of one run (identified by ``fingerprint``) under ``path``."""

    def __init__(self, path: str | Path, fingerprint: str, n_tiles: int, tile_shape: tuple[int, int]) -> None:
        self.path = Path(path)
        group = zarr.open_group(self.path, mode="a") if self.path.exists() else None
        if group is not None and group.attrs.get(FINGERPRINT_ATTR) != fingerprint:
            shutil.rmtree(self.path)  # results of other inputs/model/parameters: never mix them in
            group = None
        if group is None:
            with writing(self.path):
                group = zarr.open_group(self.path, mode="w")
                group.create_array(
                    "pred", shape=(n_tiles, 2, *tile_shape), chunks=(1, 2, *tile_shape), dtype="float32",
                    fill_value=np.nan, config={"write_empty_chunks": True},
                )
                group.create_array("done", shape=(n_tiles,), chunks=(1,), dtype="uint8", fill_value=0)
                group.attrs[FINGERPRINT_ATTR] = fingerprint
        self.group = group
        self.fingerprint = fingerprint

    def done(self) -> set[int]:
        """Indices of tiles whose results are stored."""
        return set(np.flatnonzero(self.group["done"][:]).tolist())

    def write(self, index: int, prob: np.ndarray, diff: np.ndarray, valid: np.ndarray) -> None:
        """Store one tile (values outside ``valid`` become NaN) and mark it done."""
        pred = np.stack([np.where(valid, prob, np.nan), np.where(valid, diff, np.nan)]).astype(np.float32)
        with writing(self.path):  # zarr's OSErrors name no file: the store's path stands in
            self.group["pred"][index] = pred
            self.group["done"][index] = 1

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(values (2, h, w), valid (h, w))`` of a stored tile."""
        pred = self.group["pred"][index]
        return pred, ~np.isnan(pred[0])
