"""A static STAC catalog of derived acquisitions of one real date, for monitoring tests, the notebook
and benchmarks: planted changes appearing at known dates, clouds over some dates.

Each acquisition is a copy of a per-band folder (a real Sentinel-2 date) where every planted change
present on that date has its rectangle replaced by the content of another place of the same scene
(different cover: a building block where there was a road, water, ...), and a thick cloud
(:func:`~changedet.testing.clouds.write_clouded_date`'s values) where the date has one.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio

from changedet.io.scene import band_name_from_filename, open_scene
from changedet.testing.clouds import CLOUD_BRIGHT_DN, CLOUD_DN
from changedet.testing.stac import write_item


@dataclass(frozen=True)
class Planted:
    """A change: the rectangle ``(row, col, height, width)`` takes the content found at ``source``
    (row, col) of the same scene."""

    box: tuple[int, int, int, int]
    source: tuple[int, int]

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Its pixels on a grid of ``shape``."""
        out = np.zeros(shape, bool)
        r, c, h, w = self.box
        out[r : r + h, c : c + w] = True
        return out


@dataclass(frozen=True)
class SyntheticDate:
    """One acquisition: its ``date`` (YYYY-MM-DD), the changes present on it, an optional cloud disk
    ``(row, col, radius)`` and a radiometric ``gain`` (another day's illumination)."""

    date: str
    changes: tuple[Planted, ...] = ()
    cloud: tuple[float, float, float] | None = None
    gain: float = 1.0
    properties: dict = field(default_factory=dict)


def _write_date(src: Path, dst: Path, spec: SyntheticDate) -> None:
    """Boxes, sources and clouds are in pixels of the finest band; coarser bands get them scaled."""
    shutil.copytree(src, dst)
    finest = open_scene(dst).finest_band().grid
    for path in sorted(p for p in dst.iterdir() if p.suffix.lower() in (".tif", ".tiff")):
        with rasterio.open(path, "r+") as ds:
            scale = ds.height / finest.height
            original = ds.read(1)
            data = original.astype(np.float64) * spec.gain
            for change in spec.changes:
                r, c, h, w = (int(round(v * scale)) for v in change.box)
                sr, sc = (int(round(v * scale)) for v in change.source)
                data[r : r + h, c : c + w] = original[sr : sr + h, sc : sc + w] * spec.gain
            if spec.cloud is not None:
                rows, cols = np.mgrid[0 : ds.height, 0 : ds.width]
                disk = np.hypot((rows + 0.5) / scale - spec.cloud[0], (cols + 0.5) / scale - spec.cloud[1]) < spec.cloud[2]
                data[disk] = CLOUD_DN.get(band_name_from_filename(str(path)), CLOUD_BRIGHT_DN)
            ds.write(np.clip(np.rint(data), 0, np.iinfo(original.dtype).max).astype(original.dtype), 1)


def write_time_series(src: str | Path, dst: str | Path, dates: list[SyntheticDate]) -> Path:
    """``dst/catalog.json``: a static catalog linking one item per date (``dst/<date>/item.json``, band
    files beside it, relative hrefs); returns the catalog's path."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    links = []
    for spec in dates:
        folder = dst / spec.date
        _write_date(Path(src), folder / "bands", spec)
        when = dt.datetime.fromisoformat(f"{spec.date}T10:30:00+00:00").isoformat()
        item = write_item(folder / "bands", folder / f"S2_{spec.date.replace('-', '')}.json",
                          properties={"datetime": when, "eo:cloud_cover": 0.0 if spec.cloud is None else 10.0, **spec.properties})
        links.append({"rel": "item", "href": f"./{spec.date}/{item.name}", "type": "application/geo+json"})
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "changedet-monitoring-test",
               "description": "derived acquisitions of one real Sentinel-2 date with planted changes and clouds",
               "links": [{"rel": "root", "href": "./catalog.json"}, *links]}  # fmt: skip
    (dst / "catalog.json").write_text(json.dumps(catalog, indent=1))
    return dst / "catalog.json"
