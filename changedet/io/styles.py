"""QGIS layer styles (``.qml``) written next to the rasters: QGIS applies ``<name>.qml`` to
``<name>.tif`` automatically when the raster is added to a project.

* probability: single-band pseudocolour ramp over [0, 1], fading in from transparent at 0 to orange
  at the decision threshold (a labelled stop) and dark red at 1; nodata transparent;
* mask: paletted renderer, 0 transparent "no change", 1 red "change"; nodata (255) transparent.

The XML is built with :mod:`xml.etree.ElementTree` and written byte-for-byte deterministically.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from changedet.io.writers import write_text

QGIS_VERSION = "3.28.0"
CHANGE_COLOR = "#e31a1c"


def _layer(renderer_type: str, band: int, transparent: list[float]) -> tuple[ET.Element, ET.Element]:
    """The ``<qgis>`` root and its ``<rasterrenderer>`` (pixels equal to ``transparent`` values hidden)."""
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories")
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(
        pipe, "rasterrenderer", type=renderer_type, band=str(band), opacity="1", alphaBand="-1", nodataColor=""
    )
    transparency = ET.SubElement(renderer, "rasterTransparency")
    pixels = ET.SubElement(transparency, "singleValuePixelList")
    for value in transparent:
        ET.SubElement(pixels, "pixelListEntry", min=repr(value), max=repr(value), percentTransparent="100")
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"
    return root, renderer


def _write(root: ET.Element, path: str | Path) -> Path:
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return write_text(path, f"<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n{body}\n")


def write_probability_style(path: str | Path, threshold: float, nodata: float) -> Path:
    """QGIS style for ``change_probability.tif``: colour ramp over [0, 1] marking ``threshold``."""
    root, renderer = _layer("singlebandpseudocolor", 1, [nodata])
    renderer.set("classificationMin", "0")
    renderer.set("classificationMax", "1")
    shader = ET.SubElement(ET.SubElement(renderer, "rastershader"), "colorrampshader",
                           colorRampType="INTERPOLATED", classificationMode="1", clip="0",
                           minimumValue="0", maximumValue="1")
    stops = [(0.0, "#ffffb2", 0, "0")]
    if 0.0 < threshold < 1.0:
        stops.append((float(threshold), "#fd8d3c", 200, f"threshold {threshold:g}"))
    stops.append((1.0, "#bd0026", 255, "1"))
    for value, color, alpha, label in stops:
        ET.SubElement(shader, "item", value=f"{value:g}", color=color, alpha=str(alpha), label=label)
    return _write(root, path)


def write_mask_style(path: str | Path, nodata: int, abstain: int | None = None) -> Path:
    """QGIS style for ``change_mask.tif``: 1 red "change", 0 transparent "no change", nodata hidden;
    with ``abstain`` (randomized smoothing), that value grey "abstain (not certified)"."""
    root, renderer = _layer("paletted", 1, [float(nodata)])
    palette = ET.SubElement(renderer, "colorPalette")
    ET.SubElement(palette, "paletteEntry", value="0", color="#000000", alpha="0", label="no change")
    ET.SubElement(palette, "paletteEntry", value="1", color=CHANGE_COLOR, alpha="255", label="change")
    if abstain is not None:
        ET.SubElement(palette, "paletteEntry", value=str(abstain), color="#9e9e9e", alpha="200", label="abstain (not certified)")
    return _write(root, path)
