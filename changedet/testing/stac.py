"""Test inputs for remote and catalog reading: COGs of a folder of band files, and a STAC Item
(built with pystac) that lists them with relative, absolute, ``file://`` or http hrefs."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pystac
import rasterio
from rasterio.warp import transform_bounds

from changedet.io.bands import SENTINEL2_ROLES
from changedet.io.scene import band_name_from_filename

#: Earth Search's asset keys for Sentinel-2 bands (``keys="common"``)
EARTH_SEARCH_KEYS = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16", "B12": "swir22",
}


def write_cogs(src: str | Path, dst: str | Path, blocksize: int = 256) -> list[Path]:
    """Each raster of folder ``src`` as a Cloud-Optimized GeoTIFF (deflate, tiled) of the same name in ``dst``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(src).glob("*.tif")):
        with rasterio.open(path) as ds:
            profile = {**ds.profile, "driver": "COG", "compress": "deflate", "blocksize": blocksize}
            for key in ("blockxsize", "blockysize", "tiled", "interleave"):
                profile.pop(key, None)
            with rasterio.open(dst / path.name, "w", **profile) as out:
                out.write(ds.read())
        written.append(dst / path.name)
    return written


def write_item(folder: str | Path, item_path: str | Path, hrefs: str = "relative", keys: str = "sentinel2",
               base_url: str = "", drop: tuple[str, ...] = (), properties: dict | None = None) -> Path:  # fmt: skip
    """A Sentinel-2 STAC Item at ``item_path`` for the band files of ``folder`` (``…_B02.tif``).

    ``hrefs``: ``relative`` (to the item), ``absolute`` paths, ``file`` URLs, or ``url`` (``base_url``
    + the path relative to the item). ``keys``: ``sentinel2`` (``B02``, as Planetary Computer) or
    ``common`` (``blue``, as Earth Search; the band name is then only in ``eo:bands``). ``drop``:
    band names left out (an item missing a band). ``properties`` are added to the item's (an ISO
    ``datetime`` among them is the item's date; 2020-01-01 otherwise).
    """
    item_path = Path(item_path)
    files = [p for p in sorted(Path(folder).glob("*.tif")) if band_name_from_filename(str(p)) not in drop]
    with rasterio.open(files[0]) as ds:
        bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    geometry = {"type": "Polygon", "coordinates": [[[bounds[0], bounds[1]], [bounds[2], bounds[1]], [bounds[2], bounds[3]],
                                                    [bounds[0], bounds[3]], [bounds[0], bounds[1]]]]}  # fmt: skip
    properties = dict(properties or {})
    when = dt.datetime.fromisoformat(properties.pop("datetime", "2020-01-01T00:00:00+00:00"))
    item = pystac.Item(item_path.stem, geometry, list(bounds), when,
                       {"platform": "sentinel-2a", "constellation": "sentinel-2", **properties})  # fmt: skip
    for path in files:
        name = band_name_from_filename(str(path))
        relative = Path(os.path.relpath(Path(path).resolve(), item_path.parent.resolve())).as_posix()
        href = {"relative": relative, "absolute": str(Path(path).resolve()), "file": Path(path).resolve().as_uri(),
                "url": base_url.rstrip("/") + "/" + relative}[hrefs]  # fmt: skip
        key = EARTH_SEARCH_KEYS.get(name, name) if keys == "common" else name
        band = {"name": name, **({"common_name": SENTINEL2_ROLES[name]} if name in SENTINEL2_ROLES else {})}
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"], extra_fields={"eo:bands": [band]}))
    item.add_asset("thumbnail", pystac.Asset("thumb.png", media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
    item_path.parent.mkdir(parents=True, exist_ok=True)
    item_path.write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False), indent=1))
    return item_path
