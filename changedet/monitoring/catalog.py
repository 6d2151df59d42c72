"""Acquisitions over an area from a STAC source: a static catalog, a collection, an item collection or a
STAC API, grouped per acquisition date.

A static catalog (``catalog.json``/``collection.json``, a path or an http(s)/``file://`` URL) is walked
through its ``child`` and ``item`` links; a FeatureCollection's features are its items; a document with a
``search`` link (a STAC API landing page) is searched with ``--collection``, ``--bbox`` and the period.
Items are kept when their date (UTC) is in the period and their footprint meets the area; per date,
the item whose footprint covers the whole area with the least ``eo:cloud_cover`` is the acquisition
(items of one date are not mosaicked: a date no single item covers is skipped, and said so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urljoin

import pystac
from shapely.geometry import box, shape

from changedet.errors import InputError
from changedet.io.remote import fetch, is_url, local_path
from changedet.io.stac import save_item, search_items

MAX_DOCUMENTS = 10_000


@dataclass(frozen=True)
class Acquisition:
    """One date to monitor: ``date`` (YYYY-MM-DD), the chosen item's ``item_id``, its ``href`` (the
    item file saved with absolute asset hrefs), ``cloud_cover`` (the item's ``eo:cloud_cover``, %) and,
    for a date that cannot be used, ``skipped`` (why; ``item_id`` then names the date's items)."""

    date: str
    item_id: str
    href: str
    cloud_cover: float | None
    skipped: str | None = None

    @property
    def stamp(self) -> int:
        """The date as YYYYMMDD (the value of ``first_change_date.tif``)."""
        return int(self.date.replace("-", ""))


def _read_json(href: str) -> dict[str, Any]:
    href = local_path(href)
    try:
        text = fetch(href)[0] if is_url(href) else Path(href).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read STAC document {href}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"STAC document {href} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InputError(f"STAC document {href} is not a JSON object")
    return document


def _resolve(base: str, href: str) -> str:
    if is_url(href) or href.startswith("/") or href.startswith("file://"):
        return local_path(href)
    if is_url(base):
        return urljoin(base, href)
    return str((Path(base).parent / href).resolve())


def _item(document: dict[str, Any], href: str) -> pystac.Item:
    try:
        item = pystac.Item.from_dict(document, href=href, preserve_dict=False)
    except (KeyError, TypeError, ValueError, pystac.STACError) as exc:
        raise InputError(f"STAC item {href} is malformed: {exc}") from None
    item.make_asset_hrefs_absolute()
    return item


def _walk(root: str) -> Iterator[pystac.Item]:
    """Items of a static catalog/collection/item collection at ``root``, depth first."""
    pending, seen = [root], set()
    while pending:
        href = pending.pop()
        if href in seen:
            continue
        seen.add(href)
        if len(seen) > MAX_DOCUMENTS:
            raise InputError(f"STAC catalog {root} links more than {MAX_DOCUMENTS} documents: use a STAC API")
        document = _read_json(href)
        kind = document.get("type")
        if kind == "Feature":
            yield _item(document, href)
        elif kind == "FeatureCollection":
            for feature in document.get("features", []):
                yield _item(feature, href)
        elif kind in ("Catalog", "Collection"):
            links = [link for link in document.get("links", []) if isinstance(link, dict) and link.get("href")]
            pending.extend(_resolve(href, link["href"]) for link in reversed(links) if link.get("rel") in ("child", "item"))
        else:
            raise InputError(f"{href} is not a STAC Catalog, Collection, Item or FeatureCollection (type {kind!r})")


def _is_api(document: dict[str, Any]) -> bool:
    return any(isinstance(link, dict) and link.get("rel") == "search" for link in document.get("links", []))


def _date(item: pystac.Item) -> str:
    moment = item.datetime or item.common_metadata.start_datetime
    if moment is None:
        raise InputError(f"STAC item {item.id} has no datetime")
    return moment.date().isoformat()


def _footprint(item: pystac.Item):
    if item.geometry:
        return shape(item.geometry)
    if item.bbox:
        return box(*item.bbox[:2], *item.bbox[-2:]) if len(item.bbox) == 6 else box(*item.bbox)
    raise InputError(f"STAC item {item.id} has neither geometry nor bbox: its footprint is unknown")


def catalog_items(source: str, bbox: tuple[float, float, float, float], collections: list[str] | None,
                  start: str | None, end: str | None) -> list[pystac.Item]:  # fmt: skip
    """Every item of ``source`` (see the module docstring) over ``bbox`` within [start, end], oldest first."""
    source = local_path(str(source))
    if not is_url(source) and not Path(source).exists():
        raise InputError(f"--stac {source} does not exist")
    root = _read_json(source)
    if _is_api(root):
        if not collections:
            raise InputError(f"--stac {source} is a STAC API: name the collections with --collection")
        period = f"{start or '..'}/{end or '..'}"
        items = search_items(source, collections, bbox, period, None, limit=10_000)
    else:
        items = list(_walk(str(Path(source).resolve()) if not is_url(source) else source))
        if collections:
            items = [i for i in items if i.collection_id in collections]
    area = box(*bbox)
    kept = [i for i in items if (start is None or _date(i) >= start) and (end is None or _date(i) <= end)
            and _footprint(i).intersects(area)]  # fmt: skip
    return sorted(kept, key=lambda i: (_date(i), i.id))


def acquisitions(items: list[pystac.Item], bbox: tuple[float, float, float, float], folder: str | Path) -> list[Acquisition]:
    """One :class:`Acquisition` per date, oldest first (its item saved under ``folder``)."""
    area, chosen = box(*bbox), []
    by_date: dict[str, list[pystac.Item]] = {}
    for item in items:
        by_date.setdefault(_date(item), []).append(item)
    for date, group in sorted(by_date.items()):
        covering = [i for i in group if _footprint(i).covers(area)]
        if not covering:
            reason = "no single item covers the area (items of one date are not mosaicked)"
            chosen.append(Acquisition(date, ",".join(i.id for i in group), "", None, reason))
            continue
        cloud = lambda i: float(i.properties.get("eo:cloud_cover", 0.0) or 0.0)  # noqa: E731
        best = min(covering, key=lambda i: (cloud(i), i.id))
        cover = best.properties.get("eo:cloud_cover")
        chosen.append(Acquisition(date, best.id, str(save_item(best, folder)), None if cover is None else float(cover)))
    return chosen
