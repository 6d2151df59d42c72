"""Heterogeneous (multimodal / cross-sensor) change pairs: ``hetero_cd`` and ``sar_cd`` folders.

Both are pair folders (``<root>/<scene>/t1.png``, ``t2.png``, ``gt.png`` with 0/255 labels, no
georeference). ``hetero_cd/scenes.csv`` declares each date's modality (``optical`` or ``sar``)
and band count; t1 and t2 may have 1 or 3 bands. ``sar_cd`` pairs are SAR vs SAR.

:func:`prepare_scene` turns a pair into model-ready inputs for models that need a fixed band
count across scenes:

* each date is standardised per band with its own statistics (per-modality standardisation:
  optical and SAR intensities are never compared raw);
* single-band dates are repeated to ``channels`` bands (a grey optical image or a SAR image in
  every channel), so both dates have the same band count;
* with ``optical_first``, a SAR-vs-optical pair is swapped to optical-vs-SAR, so that a
  pseudo-Siamese model's first branch always sees the optical date of a cross-modal pair (the
  change label does not depend on the order).

The result is written as float32 ``t1.tif``/``t2.tif`` plus ``gt.tif`` (0/1, 255 unknown) and
read back with :func:`~changedet.data.discovery.pair_folder_scenes`.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from changedet.data.discovery import SceneRecord, pair_folder_scenes
from changedet.data.scenes import IGNORE, ChangeScene
from changedet.errors import InputError

MODALITIES: tuple[str, ...] = ("optical", "sar")


@dataclass(frozen=True)
class HeteroRecord:
    """A pair folder and the modality of each date (``optical`` or ``sar``)."""

    record: SceneRecord
    modalities: tuple[str, str]
    citation: str = ""

    @property
    def name(self) -> str:
        """The scene name."""
        return self.record.name


def hetero_cd_scenes(root: str | Path, names: Sequence[str] | None = None) -> list[HeteroRecord]:
    """The ``hetero_cd`` scenes with the modalities declared in ``scenes.csv`` (in the CSV's order)."""
    root = Path(root)
    table = root / "scenes.csv"
    if not table.is_file():
        raise InputError(f"{table} is missing (it declares each scene's modalities)")
    with table.open(newline="") as fh:
        rows = {r["scene"]: r for r in csv.DictReader(fh)}
    records = {r.name: r for r in pair_folder_scenes(root, names)}
    out = []
    for name in names or list(rows):
        if name not in rows or name not in records:
            raise InputError(f"scene {name!r} is not both in {table} and under {root}")
        row = rows[name]
        modalities = (row["t1_modality"].lower(), row["t2_modality"].lower())
        if not set(modalities) <= set(MODALITIES):
            raise InputError(f"scene {name}: unknown modality in {modalities}; expected {', '.join(MODALITIES)}")
        out.append(HeteroRecord(records[name], modalities, row.get("citation", "")))
    return out


def sar_cd_scenes(root: str | Path, names: Sequence[str] | None = None) -> list[HeteroRecord]:
    """The ``sar_cd`` pairs (SAR vs SAR)."""
    return [HeteroRecord(r, ("sar", "sar")) for r in pair_folder_scenes(root, names)]


def standardize(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` standardised per band over ``valid`` pixels (invalid pixels set to 0)."""
    values = x[:, valid].astype(np.float64)
    mean, std = values.mean(1), np.maximum(values.std(1), 1e-6)
    return np.where(valid[None], (x - mean[:, None, None]) / std[:, None, None], 0).astype(np.float32)


def _to_channels(x: np.ndarray, channels: int, name: str) -> np.ndarray:
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1:
        return np.repeat(x, channels, axis=0)
    raise InputError(f"scene {name}: {x.shape[0]} bands cannot be made into {channels}")


def _write(path: Path, data: np.ndarray, nodata: float | None = None) -> None:
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
               "dtype": data.dtype.name, "nodata": nodata}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)


def prepare_scene(rec: HeteroRecord, out_root: str | Path, channels: int = 3, optical_first: bool = True) -> HeteroRecord:
    """Write the standardised, ``channels``-band version of a labelled pair under ``out_root/<name>``.

    Returns the record of the written pair (modalities in the written order).
    """
    if not rec.record.labelled:
        raise InputError(f"scene {rec.name} has no label")
    scene = ChangeScene.open(rec.record, allow_different_bands=True)
    h, w = scene.shape
    x1, x2, valid = scene.read(Window(0, 0, w, h))
    label = scene.label
    scene.close()
    modalities = rec.modalities
    if optical_first and modalities == ("sar", "optical"):
        x1, x2, modalities = x2, x1, ("optical", "sar")
    folder = Path(out_root) / rec.name
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "t1.tif", _to_channels(standardize(x1, valid), channels, rec.name))
    _write(folder / "t2.tif", _to_channels(standardize(x2, valid), channels, rec.name))
    _write(folder / "gt.tif", np.where(valid, label, IGNORE).astype(np.uint8)[None], nodata=IGNORE)
    record = SceneRecord(rec.name, str(folder / "t1.tif"), str(folder / "t2.tif"), str(folder / "gt.tif"))
    return HeteroRecord(record, modalities, rec.citation)
