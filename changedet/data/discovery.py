"""Scene discovery: where the two dates and the label of each bi-temporal scene are on disk.

A :class:`SceneRecord` says where one scene's two dates and label are (opened by
:class:`~changedet.data.scenes.ChangeScene`). Layouts found by :func:`discover_scenes`:

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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from changedet.errors import InputError
from changedet.io.scene import RASTER_SUFFIXES

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


__all__ = ["LAYOUTS", "SceneRecord", "discover_scenes", "levir_scenes", "oscd_scenes", "pair_folder_scenes"]
