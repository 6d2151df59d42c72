"""Band identity: what a band *is* (red, nir, …), from its name, description or colour interpretation.

A model that takes bands by role (the bundled ``rgb`` model: ``channel_names`` red, green, blue) is
given the scene's bands in its own order: bands whose roles are known are reordered to the model's
order, or refused when they are other bands; bands with no known role are taken by position, and
a warning says so (never silently).

Roles are STAC ``eo:common_name`` values. Sources, first match wins:

1. a Sentinel-2 band name (``B01`` … ``B12``, ``B8A``: folder inputs are named by file suffix);
2. a common name as the band name or the GDAL band description (``red``, ``nir08``, …, case-insensitive),
   or a Sentinel-2 band name as the description;
3. the GDAL colour interpretation ``red``/``green``/``blue`` (e.g. a PNG or an RGB GeoTIFF).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Sequence

from changedet.errors import InputError, ModelError
from changedet.io.scene import BandSource, Scene

SENTINEL2_ROLES = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B10": "cirrus", "B11": "swir16", "B12": "swir22",
}
COMMON_NAMES = frozenset(SENTINEL2_ROLES.values()) | {"pan", "rededge", "yellow", "swir", "lwir", "lwir11", "lwir12"}
COLOUR_ROLES = ("red", "green", "blue")


def band_role(band: BandSource) -> str | None:
    """The band's role (STAC common name), or None when nothing declares it. A name that is only the
    band's position in a multi-band file (``B10`` for band 10) declares nothing."""
    positional = band.name.upper() == f"B{band.index}"
    if band.name.upper() in SENTINEL2_ROLES and not positional:
        return SENTINEL2_ROLES[band.name.upper()]
    for text in (band.description, "" if positional else band.name):
        key = (text or "").strip()
        if key.lower() in COMMON_NAMES:
            return key.lower()
        if key.upper() in SENTINEL2_ROLES:
            return SENTINEL2_ROLES[key.upper()]
    colour = getattr(band, "colorinterp", "")
    return colour if colour in COLOUR_ROLES else None


def scene_roles(scene: Scene) -> list[str | None]:
    """:func:`band_role` of every band of ``scene``, in order."""
    return [band_role(b) for b in scene.bands]


def describe_bands(scene: Scene) -> str:
    """``B1 (red), B2 (unknown), …``: each band's name and declared role."""
    return _describe(scene.bands, scene_roles(scene))


def _describe(bands: Sequence[BandSource], roles: Sequence[str | None]) -> str:
    return ", ".join(f"{b.name} ({r or 'unknown'})" for b, r in zip(bands, roles))


def order_for_model(scene: Scene, wanted: Sequence[str], model: str, date: str) -> Scene:
    """``scene`` with its bands in the model's role order ``wanted``.

    Known roles that are a permutation of ``wanted`` are reordered (with a warning naming the new
    order); known roles that are not the model's are refused (:class:`ModelError`); when no role
    is known the bands are taken by position, with a warning. Band counts are checked elsewhere.
    """
    wanted = [w.lower() for w in wanted]
    roles = scene_roles(scene)
    if len(roles) != len(wanted):
        return scene
    known = [r for r in roles if r is not None]
    if len(set(known)) != len(known) or not set(known) <= set(wanted):
        raise ModelError(
            f"model {model} takes {', '.join(wanted)}; {date} {scene.source} has {_describe(scene.bands, roles)}: "
            "choose matching bands with --bands")
    if all(r is None or r == w for r, w in zip(roles, wanted)):
        if len(known) < len(roles):
            warnings.warn(
                f"{date} bands {_describe(scene.bands, roles)}: model {model} takes the bands without a declared "
                f"role (name, description or colour interpretation) by position, as {', '.join(wanted)}", stacklevel=2)
        return scene
    if len(known) < len(roles):  # some known, out of order, others unknown: no safe placement
        raise ModelError(
            f"model {model} takes {', '.join(wanted)}; {date} {scene.source} has {_describe(scene.bands, roles)}, "
            "not in that order: choose the bands in the model's order with --bands")
    bands = tuple(scene.bands[roles.index(w)] for w in wanted)
    warnings.warn(
        f"{date} bands {_describe(scene.bands, roles)} reordered to {', '.join(b.name for b in bands)} "
        f"({', '.join(wanted)}) for model {model}", stacklevel=2)
    return replace(scene, bands=bands)


def model_roles(channel_names: Sequence[str] | None) -> list[str] | None:
    """The roles a checkpoint's ``channel_names`` declare (common or Sentinel-2 names), or None when
    they are not all band roles (then nothing is checked by role)."""
    if not channel_names:
        return None
    roles = [SENTINEL2_ROLES.get(n.upper(), n.lower()) for n in channel_names]
    return roles if all(r in COMMON_NAMES for r in roles) and len(set(roles)) == len(roles) else None


def same_roles(t1: Scene, t2: Scene) -> bool:
    """True when every band of both dates has a declared role and they are equal position by position."""
    r1, r2 = scene_roles(t1), scene_roles(t2)
    return None not in r1 and r1 == r2


def order_like(t1: Scene, t2: Scene) -> Scene:
    """``t2`` with its bands in t1's order by declared role (for models that compare band by band).

    Both dates' roles known and a permutation of each other: t2 is reordered (with a warning). Roles
    that differ as sets, or that conflict where both are known, are refused (:class:`InputError`).
    Otherwise (count mismatch, unknown roles without conflict) ``t2`` is returned unchanged.
    """
    r1, r2 = scene_roles(t1), scene_roles(t2)
    if len(r1) != len(r2) or r1 == r2:
        return t2
    if None in r1 or None in r2:
        clash = [i for i, (a, b) in enumerate(zip(r1, r2)) if a is not None and b is not None and a != b]
        if clash:
            raise InputError(
                f"band roles differ between dates: t1 {_describe(t1.bands, r1)}; t2 {_describe(t2.bands, r2)}: "
                "give both dates the same bands in the same order (--bands)")
        if any(r is not None for r in r1 + r2):
            warnings.warn(
                f"band roles are declared on one date only (t1 {_describe(t1.bands, r1)}; t2 "
                f"{_describe(t2.bands, r2)}): the bands are compared by position", stacklevel=2)
        return t2
    if sorted(r1) != sorted(r2) or len(set(r1)) != len(r1):
        raise InputError(
            f"band roles differ between dates: t1 {_describe(t1.bands, r1)}; t2 {_describe(t2.bands, r2)}: "
            "select common bands with --bands")
    bands = tuple(t2.bands[r2.index(r)] for r in r1)
    warnings.warn(f"t2 bands {_describe(t2.bands, r2)} reordered to {', '.join(b.name for b in bands)} "
                  f"to match t1's {', '.join(r1)}", stacklevel=2)
    return replace(t2, bands=bands)
