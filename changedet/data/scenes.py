"""Opened bi-temporal scenes: lazy aligned reading, labels on the common grid, in-memory caching.

:class:`ChangeScene` opens a :class:`~changedet.data.discovery.SceneRecord` (metadata only:
:func:`~changedet.io.scene.open_scene` + :func:`~changedet.pipeline.align.align_pair`) and reads
aligned windows through a per-process :class:`~changedet.pipeline.align.PairReader`. The label
is read once (:func:`read_label`), resampled onto the common grid and kept in memory as ``uint8``
(0 no change, 1 change, :data:`IGNORE` unknown); optionally (:meth:`ChangeScene.cache`) the whole
pair is kept in memory too, an optimisation for small scenes. :func:`open_scenes` opens many
records within a cache budget. Finding the records on disk is :mod:`changedet.data.discovery`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from changedet.data.discovery import SceneRecord
from changedet.pipeline.align import AlignedPair, PairReader, align_pair
from changedet.errors import GridError, InputError
from changedet.evaluate import infer_label_coding
from changedet.pipeline.grid import Grid
from changedet.io.scene import Scene, open_raster, open_scene
from changedet.metrics import IGNORE  # label value of pixels without a label (OSCD 0, outside the label, ignore values)


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def read_label(record: SceneRecord, pair: AlignedPair) -> np.ndarray:
    """The label on ``pair.grid`` as ``uint8``: 0 no change, 1 change, :data:`IGNORE` unknown.

    A georeferenced label is windowed (same pixel lattice) or resampled with nearest neighbour;
    a label without CRS must have the shape of t1's grid (``pair.reference``, the OSCD case) or
    of the common grid.
    """
    assert record.label is not None
    grid = pair.grid
    with open_raster(record.label) as ds:
        label_grid = Grid.from_dataset(ds)
        if label_grid.crs is not None and grid.crs is not None:
            if label_grid.same_lattice(grid):
                try:
                    w = label_grid.window_of(grid)
                    raw = ds.read(1, window=w, boundless=True, fill_value=ds.nodata if ds.nodata is not None else 0)
                    outside = _outside_mask(w, label_grid)
                except GridError:
                    raw, outside = _warp_label(ds, grid)
            else:
                raw, outside = _warp_label(ds, grid)
        elif label_grid.crs is None:
            if label_grid.shape == pair.reference.shape:
                try:
                    w = pair.reference.window_of(grid)
                except GridError:
                    raise GridError(
                        f"label {record.label} has no CRS and t1 was reprojected: cannot place it on the common grid"
                    ) from None
            elif label_grid.shape == grid.shape:
                w = Window(0, 0, grid.width, grid.height)
            else:
                raise GridError(
                    f"label {record.label} ({label_grid.height}x{label_grid.width}, no CRS) matches neither t1's grid "
                    f"{pair.reference.height}x{pair.reference.width} nor the common grid {grid.height}x{grid.width}"
                )
            raw = ds.read(1, window=w, boundless=True, fill_value=0)
            outside = _outside_mask(w, label_grid)
        else:
            raise GridError(f"label {record.label} is georeferenced but the scene {record.name} is not")
        nodata = int(ds.nodata) if ds.nodata is not None and np.isfinite(ds.nodata) else None
    values = set(np.unique(raw[~outside]).tolist())
    if record.change_value is None:
        change, ignore = infer_label_coding(values - {nodata} if nodata is not None else values)
    else:
        change, ignore = record.change_value, set()
    if record.ignore_values is not None:
        ignore = set(record.ignore_values)
    # a declared nodata that is one of the classes (e.g. nodata=0 on a 0/255 mask) is a
    # mis-declaration, not "unlabelled": honour it only when it is no class value
    classes = {change, 1 if change == 2 else 0}
    if nodata is not None and nodata not in classes:
        ignore = ignore | {nodata}
    label = (raw == change).astype(np.uint8)
    unknown = outside | np.isin(raw, list(ignore))
    label[unknown] = IGNORE
    return label


def _outside_mask(w: Window, grid: Grid) -> np.ndarray:
    rows = np.arange(int(w.row_off), int(w.row_off) + int(w.height))
    cols = np.arange(int(w.col_off), int(w.col_off) + int(w.width))
    rows_out = (rows < 0) | (rows >= grid.height)
    cols_out = (cols < 0) | (cols >= grid.width)
    return rows_out[:, None] | cols_out[None, :]


def _warp_label(ds, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    with WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                   resampling=Resampling.nearest, add_alpha=True) as vrt:  # fmt: skip
        data = vrt.read([1, vrt.count])
    return data[0], data[1] == 0


# --------------------------------------------------------------------------------------------
# an opened scene
# --------------------------------------------------------------------------------------------


@dataclass
class _Cached:
    x1: np.ndarray
    x2: np.ndarray
    valid: np.ndarray


class _CacheReader:
    def __init__(self, cached: _Cached) -> None:
        self.cached = cached

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        return self.cached.x1[:, r : r + h, c : c + w], self.cached.x2[:, r : r + h, c : c + w], self.cached.valid[r : r + h, c : c + w]


@dataclass
class ChangeScene:
    """An opened :class:`SceneRecord`: aligned grid, bands, label, lazy windowed reads.

    Build with :meth:`open`. ``read(window)`` returns ``x1 (C1, h, w)``, ``x2 (C2, h, w)`` float32
    raw values and the valid mask of both dates; ``label_window(window)`` the label window.
    Readers are opened lazily once per process (safe with forked DataLoader workers) and dropped
    when pickled.
    """

    record: SceneRecord
    pair: AlignedPair
    _label: np.ndarray | None = field(default=None, repr=False)
    _cache: _Cached | None = field(default=None, repr=False)
    _reader: PairReader | None = field(default=None, repr=False)
    _reader_pid: int | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        record: SceneRecord,
        bands: Sequence[str | int] | None = None,
        bands_t2: Sequence[str | int] | None = None,
        nodata: float | None = None,
        resampling: str = "bilinear",
        allow_different_bands: bool = False,
    ) -> "ChangeScene":
        """Open both dates (metadata only) and decide the common grid.

        ``bands`` selects bands of both dates (``bands_t2`` overrides it for date 2, for
        heterogeneous pairs, which also needs ``allow_different_bands``).
        """
        t1: Scene = open_scene(record.t1, bands, nodata)
        t2: Scene = open_scene(record.t2, bands_t2 if bands_t2 is not None else bands, nodata)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            pair = align_pair(t1, t2, resampling=resampling, allow_different_bands=allow_different_bands)
        return cls(record, pair)

    # -- description -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The scene name."""
        return self.record.name

    @property
    def group(self) -> str:
        """The split unit (city / tile)."""
        return self.record.group

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of the common grid."""
        return self.pair.grid.shape

    @property
    def bands(self) -> tuple[list[str], list[str]]:
        """Band names of date 1 and date 2."""
        return list(self.pair.t1.band_names), list(self.pair.t2.band_names)

    @property
    def channels(self) -> tuple[int, int]:
        """Band counts of date 1 and date 2."""
        return self.pair.t1.count, self.pair.t2.count

    @property
    def labelled(self) -> bool:
        """True when the scene has a label."""
        return self.record.labelled

    # -- label --------------------------------------------------------------------------------
    @property
    def label(self) -> np.ndarray:
        """The whole label on the common grid (loaded once): 0, 1 or :data:`IGNORE`."""
        if self._label is None:
            if not self.labelled:
                raise InputError(f"scene {self.name} has no label")
            self._label = read_label(self.record, self.pair)
        return self._label

    def label_window(self, window: Window) -> np.ndarray:
        """Label pixels of ``window`` (a view; :data:`IGNORE` for unlabelled scenes)."""
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        if not self.labelled:
            return np.full((h, w), IGNORE, np.uint8)
        return self.label[r : r + h, c : c + w]

    def change_fraction(self) -> float:
        """Fraction of labelled pixels that changed."""
        known = self.label != IGNORE
        return float((self.label == 1).sum() / max(int(known.sum()), 1))

    # -- pixels -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Memory the in-memory cache of this scene takes (float32 both dates + mask)."""
        h, w = self.shape
        return h * w * (4 * sum(self.channels) + 1)

    @property
    def cached(self) -> bool:
        """True when the pixels are held in memory."""
        return self._cache is not None

    def cache(self) -> "ChangeScene":
        """Read the whole pair once and keep it in memory (for small scenes); returns self."""
        if self._cache is None:
            h, w = self.shape
            with PairReader(self.pair) as reader:
                x1, x2, valid = reader.read(Window(0, 0, w, h))
            self._cache = _Cached(x1, x2, valid)
        return self

    def pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole ``x1, x2, valid`` (cached in memory first)."""
        cached = self.cache()._cache
        return cached.x1, cached.x2, cached.valid

    def with_pixels(self, x1: np.ndarray, x2: np.ndarray) -> ChangeScene:
        """An in-memory copy of this scene with other pixel values (same grid, valid mask and label)."""
        valid = self.pixels()[2]
        if x1.shape[1:] != valid.shape or x2.shape[1:] != valid.shape:
            raise InputError(f"pixels of shape {x1.shape}/{x2.shape} do not fit scene {self.name} {valid.shape}")
        label = self.label if self.labelled else None
        return ChangeScene(self.record, self.pair, label, _Cached(x1.astype(np.float32), x2.astype(np.float32), valid))

    def reader(self) -> PairReader | _CacheReader:
        """A reader with ``read(window)``: the cache, or this process's open :class:`PairReader`."""
        if self._cache is not None:
            return _CacheReader(self._cache)
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = PairReader(self.pair).__enter__()
            self._reader_pid = os.getpid()
        return self._reader

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Aligned ``x1``, ``x2`` (float32 raw values) and the joint valid mask of ``window``."""
        return self.reader().read(window)

    def read_padded(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``x1, x2, valid, label`` of a window that may extend past the grid (padding: 0, invalid, IGNORE)."""
        gh, gw = self.shape
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, gh), min(col + width, gw)
        window = Window(c0, r0, c1 - c0, r1 - r0)
        x1, x2, valid = self.read(window)
        label = self.label_window(window)
        if (r0, c0, r1, c1) == (row, col, row + height, col + width):
            return x1, x2, valid, label
        c1_, c2_ = self.channels
        out1 = np.zeros((c1_, height, width), np.float32)
        out2 = np.zeros((c2_, height, width), np.float32)
        out_valid = np.zeros((height, width), bool)
        out_label = np.full((height, width), IGNORE, np.uint8)
        rs, cs = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        out1[:, rs, cs], out2[:, rs, cs], out_valid[rs, cs], out_label[rs, cs] = x1, x2, valid, label
        return out1, out2, out_valid, out_label

    def close(self) -> None:
        """Close this process's open reader (the cache is kept)."""
        if self._reader is not None and self._reader_pid == os.getpid():
            self._reader.close()
        self._reader = None
        self._reader_pid = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_reader_pid"] = None
        return state


def open_scenes(
    records: Sequence[SceneRecord],
    bands: Sequence[str | int] | None = None,
    bands_t2: Sequence[str | int] | None = None,
    nodata: float | None = None,
    resampling: str = "bilinear",
    allow_different_bands: bool = False,
    cache_bytes: int = 0,
) -> list[ChangeScene]:
    """Open every record; cache the smallest scenes in memory up to ``cache_bytes`` in total."""
    scenes = [ChangeScene.open(r, bands, bands_t2, nodata, resampling, allow_different_bands) for r in records]
    budget = cache_bytes
    for scene in sorted(scenes, key=lambda s: s.nbytes):
        if scene.nbytes > budget:
            break
        scene.cache()
        budget -= scene.nbytes
    return scenes


__all__ = ["IGNORE", "ChangeScene", "open_scenes", "read_label"]
