"""Labelled (or unlabelled) bi-temporal scenes on disk: layouts, lazy aligned reading, labels.

A :class:`SceneRecord` says where one scene's two dates and label are; :class:`ChangeScene`
opens it (metadata only: :func:`~changedet.io.scene.open_scene` + :func:`~changedet.align.align_pair`)
and reads aligned windows through a per-process :class:`~changedet.align.PairReader`. The label
is read once, resampled onto the common grid and kept in memory as ``uint8`` (0 no change,
1 change, :data:`IGNORE` unknown); optionally (:meth:`ChangeScene.cache`) the whole pair is kept
in memory too, an optimisation for small scenes.

Layouts found by :func:`discover_scenes`:

* ``oscd``: ``<root>/images/<city>/imgs_1|imgs_2/*.tif`` (13 single-band files per date) with
  labels ``<root>/labels/<city>/cm/<city>-cm.tif`` (1 no change / 2 change, on the imgs_1 B02
  grid); or a single city folder ``<root>/imgs_1``, ``imgs_2``, ``cm/<city>-cm.tif``; or a folder
  of such city folders. Unlabelled cities have ``label=None``.
* ``levir``: ``<root>/A/<name>.png``, ``B/<name>.png``, ``label/<name>.png`` (0/255); crops of one
  LEVIR tile (``test_2_0000_0000`` and ``test_2_0000_0512``) share the group ``test_2``.
* ``pairs``: ``<root>/<scene>/t1.*``, ``t2.*`` (a raster or a folder of band files) and an
  optional ``gt.*`` (0/255 or 0/1).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from changedet.align import AlignedPair, PairReader, align_pair
from changedet.errors import GridError, InputError
from changedet.evaluate import infer_label_coding
from changedet.grid import Grid
from changedet.io.scene import RASTER_SUFFIXES, Scene, open_raster, open_scene

#: Label value of pixels without a label (OSCD 0, outside the label raster, user ignore values).
IGNORE = 255
LAYOUTS: tuple[str, ...] = ("oscd", "levir", "pairs")


@dataclass(frozen=True)
class SceneRecord:
    """Where one scene lives on disk.

    Attributes:
        name: unique scene name (OSCD city, LEVIR crop name, pair folder name).
        t1, t2: anything :func:`~changedet.io.scene.open_scene` accepts (file, folder of bands, glob).
        label: change label raster, or None for an unlabelled scene.
        group: the unit of splitting: scenes of one group (a city, a LEVIR tile) always land in
            the same split, so overlapping or adjacent crops never leak across splits.
        change_value: label value meaning change (None: inferred from the label's values:
            ``{0,1}`` -> 1, ``{1,2}`` -> 2 with 0 ignored, ``{0,255}`` -> 255).
        ignore_values: label values without a label (None: inferred as above).
    """

    name: str
    t1: str
    t2: str
    label: str | None = None
    group: str = ""
    change_value: int | None = None
    ignore_values: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.name)

    @property
    def labelled(self) -> bool:
        """True when the scene has a label raster."""
        return self.label is not None


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def _oscd_city(folder: Path, name: str, label: Path | None) -> SceneRecord:
    return SceneRecord(name, str(folder / "imgs_1"), str(folder / "imgs_2"), str(label) if label else None, name)


def _single_city_name(folder: Path) -> str:
    for sub in ("cm", "."):
        labels = sorted((folder / sub).glob("*-cm.tif")) if (folder / sub).is_dir() else []
        if labels:
            return labels[0].name[: -len("-cm.tif")]
    geojson = sorted(folder.glob("*.geojson"))
    if geojson:
        return geojson[0].stem
    return folder.name


def _single_city_label(folder: Path, city: str) -> Path | None:
    for candidate in (folder / "cm" / f"{city}-cm.tif", folder / f"{city}-cm.tif"):
        if candidate.is_file():
            return candidate
    found = sorted((folder / "cm").glob("*-cm.tif")) if (folder / "cm").is_dir() else []
    return found[0] if found else None


def oscd_scenes(root: str | Path, cities: Sequence[str] | None = None, labelled_only: bool = False) -> list[SceneRecord]:
    """OSCD cities under ``root`` (the shared layout, one city folder, or a folder of city folders).

    Args:
        root: ``oscd/`` (with ``images/`` and ``labels/``), a city folder with ``imgs_1``/``imgs_2``
            (and ``cm/<city>-cm.tif``), or a folder of city folders.
        cities: keep only these cities (in this order); unknown names are an error.
        labelled_only: drop cities without a change map.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"OSCD root {root} is not a folder")
    records: list[SceneRecord] = []
    if (root / "images").is_dir():
        for city_dir in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
            city = city_dir.name
            label = root / "labels" / city / "cm" / f"{city}-cm.tif"
            if not label.is_file():
                label = _single_city_label(city_dir, city)
            records.append(_oscd_city(city_dir, city, label if label and label.is_file() else None))
    elif (root / "imgs_1").is_dir():
        city = _single_city_name(root)
        records.append(_oscd_city(root, city, _single_city_label(root, city)))
    else:
        for city_dir in sorted(p for p in root.iterdir() if (p / "imgs_1").is_dir()):
            city = _single_city_name(city_dir)
            records.append(_oscd_city(city_dir, city, _single_city_label(city_dir, city)))
    if not records:
        raise InputError(f"no OSCD city under {root} (expected images/<city>/imgs_1 or <city>/imgs_1)")
    return _select(records, cities, labelled_only, root)


_LEVIR_TILE = re.compile(r"^((?:train|val|test)_\d+)_\d+_\d+$")


def levir_scenes(root: str | Path, names: Sequence[str] | None = None) -> list[SceneRecord]:
    """LEVIR-CD style ``A/``, ``B/``, ``label/`` folders of same-named images (labels 0/255)."""
    root = Path(root)
    a_dir, b_dir, l_dir = root / "A", root / "B", root / "label"
    if not a_dir.is_dir() or not b_dir.is_dir():
        raise InputError(f"LEVIR-CD root {root} needs A/ and B/ folders")
    records = []
    for a in sorted(p for p in a_dir.iterdir() if p.suffix.lower() in RASTER_SUFFIXES):
        b = b_dir / a.name
        if not b.is_file():
            raise InputError(f"{a.name} is in {a_dir} but not in {b_dir}")
        label = l_dir / a.name
        match = _LEVIR_TILE.match(a.stem)
        records.append(
            SceneRecord(a.stem, str(a), str(b), str(label) if label.is_file() else None, match.group(1) if match else a.stem)
        )
    if not records:
        raise InputError(f"no image in {a_dir}")
    return _select(records, names, False, root)


def _find_member(folder: Path, stem: str) -> Path | None:
    if (folder / stem).is_dir():
        return folder / stem
    for p in sorted(folder.iterdir()):
        if p.stem == stem and p.suffix.lower() in RASTER_SUFFIXES and p.is_file():
            return p
    return None


def pair_folder_scenes(root: str | Path, names: Sequence[str] | None = None) -> list[SceneRecord]:
    """Generic ``<root>/<scene>/t1``, ``t2`` and optional ``gt`` (file with any raster suffix, or band folder).

    ``root`` may itself be one scene folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"pair root {root} is not a folder")
    folders = [root] if _find_member(root, "t1") else sorted(p for p in root.iterdir() if p.is_dir())
    records = []
    for folder in folders:
        t1, t2 = _find_member(folder, "t1"), _find_member(folder, "t2")
        if t1 is None or t2 is None:
            continue
        gt = _find_member(folder, "gt")
        records.append(SceneRecord(folder.name, str(t1), str(t2), str(gt) if gt else None, folder.name))
    if not records:
        raise InputError(f"no <scene>/t1 + t2 pair under {root}")
    return _select(records, names, False, root)


def _select(records: list[SceneRecord], names: Sequence[str] | None, labelled_only: bool, root: Path) -> list[SceneRecord]:
    if labelled_only:
        records = [r for r in records if r.labelled]
    if names is None:
        return records
    by_name = {r.name: r for r in records}
    by_group: dict[str, list[SceneRecord]] = {}
    for r in records:
        by_group.setdefault(r.group, []).append(r)
    chosen: list[SceneRecord] = []
    for n in names:
        if n in by_name:
            chosen.append(by_name[n])
        elif n in by_group:
            chosen.extend(by_group[n])
        else:
            raise InputError(f"scene {n!r} not found under {root}; available: {', '.join(sorted(by_name))}")
    return chosen


def discover_scenes(root: str | Path, layout: str = "auto", labelled_only: bool = False) -> list[SceneRecord]:
    """Scenes under ``root`` in one of :data:`LAYOUTS` (``auto``: guessed from the folder structure)."""
    root = Path(root)
    if layout == "auto":
        if (root / "images").is_dir() or (root / "imgs_1").is_dir() or any(root.glob("*/imgs_1")):
            layout = "oscd"
        elif (root / "A").is_dir() and (root / "B").is_dir():
            layout = "levir"
        else:
            layout = "pairs"
    if layout == "oscd":
        records = oscd_scenes(root)
    elif layout == "levir":
        records = levir_scenes(root)
    elif layout == "pairs":
        records = pair_folder_scenes(root)
    else:
        raise InputError(f"unknown dataset layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    return [r for r in records if r.labelled] if labelled_only else records


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


def with_group(record: SceneRecord, group: str) -> SceneRecord:
    """A copy of ``record`` in another split group."""
    return replace(record, group=group)
