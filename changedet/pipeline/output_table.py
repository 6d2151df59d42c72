"""The output table: every file a detect run writes, declared once.

Each :class:`Output` says its file name, kind, data type and nodata (rasters), the QGIS style written
beside it, the step of :func:`changedet.pipeline.outputs.write_outputs` that writes it, and whether
every run produces it. ``changedet detect``, the Prefect flows, the inbox (``run.json``) and
``changedet evaluate`` (the mask it scores, ``run.json``'s reference grid) take names from here, and
the CLI and the flow write exactly :data:`OUTPUT_NAMES`. This module imports nothing heavy, so light
consumers (``evaluate``, ``inbox``) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_NODATA = -9999.0
MASK_NODATA = 255


@dataclass(frozen=True)
class Output:
    """One output file.

    Attributes:
        name: file name in the output folder.
        kind: ``raster`` (COG on the common grid), ``vector`` (GeoPackage), ``style`` (QGIS ``.qml``),
            ``image`` (PNG), ``metadata`` (JSON), ``report`` (self-contained HTML) or ``table`` (CSV).
        description: what it holds (README's output table).
        writer: the step of :func:`~changedet.pipeline.outputs.write_outputs` that writes it.
        dtype: raster data type.
        nodata: raster nodata value.
        style: the QGIS style written beside it (QGIS applies ``<name>.qml`` to ``<name>.tif``).
        default: written by every run (False: only when an option asks for it).
    """

    name: str
    kind: str
    description: str
    writer: str
    dtype: str | None = None
    nodata: float | None = None
    style: str | None = None
    default: bool = True


PROBABILITY = "change_probability.tif"
MASK = "change_mask.tif"
DIFFERENCE = "difference.tif"
POLYGONS = "changes.gpkg"
PROBABILITY_STYLE = "change_probability.qml"
MASK_STYLE = "change_mask.qml"
QUICKLOOK = "quicklook.png"
REPORT_HTML = "report.html"
ZONES_CSV = "zones.csv"
CERTIFIED_RADIUS = "certified_radius.tif"
RUN_JSON = "run.json"

OUTPUTS: dict[str, Output] = {o.name: o for o in (
    Output(PROBABILITY, "raster", "blended change probability in [0, 1]", "mosaic", "float32", FLOAT_NODATA, PROBABILITY_STYLE),
    Output(MASK, "raster", "1 change, 0 no change (probability >= threshold)", "mosaic", "uint8", MASK_NODATA, MASK_STYLE),
    Output(DIFFERENCE, "raster", "the model's per-pixel difference map (>= 0)", "mosaic", "float32", FLOAT_NODATA),
    Output(POLYGONS, "vector", "changed regions as polygons with area and mean probability", "polygons"),
    Output(PROBABILITY_STYLE, "style", "QGIS style: probability ramp, threshold marked", "styles"),
    Output(MASK_STYLE, "style", "QGIS style: change in red, no change transparent", "styles"),
    Output(QUICKLOOK, "image", "t1, t2 and t2 with the change overlaid (same stretch, legend, scale bar)", "report"),
    Output(RUN_JSON, "metadata", "inputs, grid, model, parameters, counts, timings, versions", "summary"),
    Output(REPORT_HTML, "report", "self-contained page: imagery before/after, change overlay, histogram, regions, "
           "facts and trust warnings", "report"),
    Output(CERTIFIED_RADIUS, "raster", "with --smoothing-sigma: certified L2 radius per pixel (1/255 reflectance; 0 where the "
           "mask abstains)", "mosaic", "float32", FLOAT_NODATA, default=False),
    Output(ZONES_CSV, "table", "with --zones: per zone its area, valid fraction, changed pixels and ha, changed fraction, mean "
           "probability (also the zones layer of changes.gpkg)", "zones", default=False),
)}  # fmt: skip

#: every file a run writes, in the order they are listed in ``run.json``
OUTPUT_NAMES = [o.name for o in OUTPUTS.values() if o.default]
#: the rasters of every run
RASTERS = [o for o in OUTPUTS.values() if o.kind == "raster" and o.default]


def output_names(smoothing: bool = False, zones: bool = False) -> list[str]:
    """The files a run writes: :data:`OUTPUT_NAMES`, plus ``certified_radius.tif`` with randomized
    smoothing and ``zones.csv`` with zones."""
    return OUTPUT_NAMES + ([CERTIFIED_RADIUS] if smoothing else []) + ([ZONES_CSV] if zones else [])


def run_rasters(smoothing: bool = False) -> list[Output]:
    """The rasters a run writes."""
    return RASTERS + ([OUTPUTS[CERTIFIED_RADIUS]] if smoothing else [])
