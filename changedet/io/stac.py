"""STAC Items as one date's input: which assets are bands, what each band is called, where it lives.

An Item (a ``.json`` file, a ``file://`` or an http(s) URL) is read with pystac. Its raster assets
(GeoTIFF/COG or JPEG 2000; thumbnails, overviews, the ``visual`` true-colour image and metadata
excepted) become bands, of any mix of resolutions, named:

* for a Sentinel-2 item (``platform``/``constellation``/collection saying so), by the Sentinel-2
  band name found in the asset key or in ``eo:bands`` (``B4``, ``b04`` → ``B04``; ``B8A``), in
  B01…B12 order — so an Earth Search item (keys ``red``, ``nir``, …) and a Planetary Computer one
  (keys ``B04``, ``B08``, …) give the same scene; ``SCL`` for the L2A scene classification;
* otherwise by the ``eo:bands`` name, else the asset key, in the item's order.

The ``eo:common_name`` of a band becomes its description, so roles (:mod:`changedet.io.bands`) are
known. Where an item holds a band twice (a COG and a JPEG 2000 copy) the COG is used. Asset hrefs
may be relative (to the item), absolute paths, ``file://``, http(s) or ``s3://`` URLs; remote ones
are read with range requests (:mod:`changedet.io.remote`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pystac

from changedet.errors import InputError
from changedet.io.remote import fetch, gdal_path, is_url, local_path

SENTINEL2_NAMES = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
_S2_NAME = re.compile(r"^B0?(\d{1,2})(A?)$", re.IGNORECASE)
_RASTER_TYPES = ("tiff", "jp2")
_RASTER_SUFFIXES = (".tif", ".tiff", ".jp2")
_NOT_BANDS = {"thumbnail", "overview", "visual", "metadata"}


@dataclass(frozen=True)
class ItemBand:
    """One band of an item: its ``name``, the asset ``key``, the GDAL path of the file, the 1-based
    ``index`` in that file and the band's ``common_name`` (``""`` when the item gives none)."""

    name: str
    key: str
    path: str
    index: int
    common_name: str


def is_stac_item(spec: str | Path) -> bool:
    """A path or URL whose name ends in ``.json`` (a STAC Item; anything else is a raster)."""
    return urlsplit(local_path(str(spec))).path.lower().endswith(".json")


def load_item(spec: str | Path) -> pystac.Item:
    """The Item at ``spec`` (path, ``file://`` or http(s) URL), its self href set so relative asset
    hrefs resolve; :class:`InputError` when it cannot be read or is not a STAC Item."""
    spec = local_path(str(spec))
    if is_url(spec):
        text, href = fetch(spec)[0], spec
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"STAC item {spec} does not exist")
        text, href = path.read_bytes(), str(path.resolve())
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"STAC item {spec} is not JSON: {exc}") from None
    kind = document.get("type") if isinstance(document, dict) else None
    if kind != "Feature" or "stac_version" not in document:
        what = {"Collection": "a STAC Collection", "Catalog": "a STAC Catalog", "FeatureCollection": "a FeatureCollection"}
        raise InputError(f"{spec} is {what.get(kind, 'not a STAC Item')}, not an Item: give one item per date")
    try:
        return pystac.Item.from_dict(document, href=href, preserve_dict=False)
    except (KeyError, TypeError, ValueError, pystac.STACError) as exc:
        raise InputError(f"STAC item {spec} is malformed: {exc}") from None


def _is_sentinel2(item: pystac.Item) -> bool:
    fields = [item.properties.get("platform"), item.properties.get("constellation"), item.collection_id]
    return any("sentinel-2" in str(f).lower() or str(f).lower().startswith("s2") for f in fields if f)


def _sentinel2_name(text: str) -> str | None:
    match = _S2_NAME.match(text.strip())
    if not match:
        return "SCL" if text.strip().upper() == "SCL" else None
    name = f"B{int(match.group(1)):02d}{match.group(2).upper()}"
    return name if name in SENTINEL2_NAMES else None


def _asset_bands(asset: pystac.Asset) -> list[dict[str, Any]]:
    """The asset's band descriptions: ``eo:bands`` (STAC 1.0) or ``bands`` (STAC 1.1)."""
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    return [b for b in bands if isinstance(b, dict)]


def _is_raster(asset: pystac.Asset) -> bool:
    if _NOT_BANDS & set(asset.roles or []):
        return False
    media = (asset.media_type or "").lower()
    if media:
        return any(kind in media for kind in _RASTER_TYPES)
    return urlsplit(asset.href).path.lower().endswith(_RASTER_SUFFIXES)


def _href(item: pystac.Item, key: str, asset: pystac.Asset) -> str:
    href = asset.get_absolute_href() or asset.href
    if href is None:
        raise InputError(f"STAC item {item.id}: asset {key} has no href")
    return gdal_path(href)


def item_bands(item: pystac.Item) -> list[ItemBand]:
    """The bands of ``item`` named and ordered as the module docstring says; :class:`InputError` when
    it has no raster asset or two assets claim the same band name."""
    sentinel2 = _is_sentinel2(item)
    chosen: dict[str, tuple[ItemBand, bool]] = {}
    for key, asset in item.assets.items():
        if not _is_raster(asset):
            continue
        described = _asset_bands(asset) or [{}]
        is_cog = "jp2" not in (asset.media_type or "").lower() and not asset.href.lower().endswith(".jp2")
        for index, band in enumerate(described, start=1):
            common = str(band.get("common_name") or band.get("eo:common_name") or "")
            label = str(band.get("name") or "")
            name = None
            if sentinel2:
                name = next((n for n in (_sentinel2_name(key) if len(described) == 1 else None, _sentinel2_name(label)) if n), None)
            name = name or label or (key if len(described) == 1 else f"{key}_{index}")
            entry = ItemBand(name, key, _href(item, key, asset), index, common)
            if name in chosen and chosen[name][1] == is_cog:
                raise InputError(f"STAC item {item.id}: assets {chosen[name][0].key} and {key} are both band {name}")
            if name not in chosen or is_cog:
                chosen[name] = (entry, is_cog)
    if not chosen:
        raise InputError(f"STAC item {item.id} has no raster asset (GeoTIFF/COG or JPEG 2000)")
    bands = [entry for entry, _ in chosen.values()]
    if sentinel2:
        order = {n: i for i, n in enumerate(SENTINEL2_NAMES)}
        bands.sort(key=lambda b: order.get(b.name, len(order)))
    return bands


def sun_angles(item: pystac.Item) -> tuple[float, float] | None:
    """The sun's ``(azimuth, elevation)`` in degrees (``view:sun_azimuth``/``view:sun_elevation``, or
    Sentinel-2's ``s2:mean_solar_azimuth``/``s2:mean_solar_zenith``); None when the item has neither."""
    properties = item.properties
    azimuth = properties.get("view:sun_azimuth", properties.get("s2:mean_solar_azimuth"))
    elevation = properties.get("view:sun_elevation")
    if elevation is None and properties.get("s2:mean_solar_zenith") is not None:
        elevation = 90.0 - float(properties["s2:mean_solar_zenith"])
    return None if azimuth is None or elevation is None else (float(azimuth), float(elevation))


def search_items(api: str, collections: list[str], bbox: tuple[float, float, float, float] | None = None,
                 datetime: str | None = None, max_cloud: float | None = None, limit: int = 100) -> list[pystac.Item]:  # fmt: skip
    """Items of a STAC API (``/search``, through pystac-client) over ``bbox`` (WGS84 west, south, east,
    north) and ``datetime`` (``2020-01-01/2020-12-31``), oldest first, at most ``limit``; with ``max_cloud`` (a fraction), items whose
    ``eo:cloud_cover`` (percent) is above it or unknown are left out. Asset hrefs relative to an
    item's self link are made absolute, so a saved item is usable anywhere. :class:`InputError` when the API cannot be
    reached or refuses the search."""
    import pystac_client
    import requests

    try:
        client = pystac_client.Client.open(api)
        search = client.search(collections=collections, bbox=bbox, datetime=datetime, max_items=limit)
        items = list(search.items())
    except requests.ConnectionError as exc:
        raise InputError(f"cannot reach STAC API {api}: {exc.__class__.__name__}") from None
    except (pystac_client.exceptions.APIError, pystac.STACError, requests.RequestException, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if "Failed to establish a new connection" in reason or "Name or service not known" in reason:
            raise InputError(f"cannot reach STAC API {api}: no connection") from None
        raise InputError(f"STAC API {api} refused the search: {reason[:300]}") from None
    if max_cloud is not None:
        items = [i for i in items if i.properties.get("eo:cloud_cover") is not None
                 and float(i.properties["eo:cloud_cover"]) <= 100.0 * max_cloud]  # fmt: skip
    for item in items:
        if item.get_self_href():  # API items' hrefs are absolute already, as a rule
            item.make_asset_hrefs_absolute()
    return sorted(items, key=lambda i: (i.datetime or i.common_metadata.start_datetime, i.id))


def save_item(item: pystac.Item, folder: str | Path) -> Path:
    """Write ``item`` as ``folder/<id>.json`` (atomically: a temporary file renamed into place)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{item.id.replace('/', '_')}.json"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False), indent=1))
    partial.replace(path)
    return path
