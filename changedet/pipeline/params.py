"""Parameters of one detect run, declared once: name, type, default, bounds and help.

:class:`DetectParams` is what the library takes (:func:`~changedet.pipeline.detect.detect_changes`,
:func:`~changedet.pipeline.planning.plan_run`); ``changedet detect`` and ``python flows/detect.py run``
derive their options from its fields (:func:`changedet.options.add_model_options`), and the Prefect
flow's parameters extend it with orchestration-only fields. A new field appears in all three.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from changedet.options import Parameters
from changedet.pipeline.align import RESAMPLING_CHOICES
from changedet.pipeline.clouds import CLOUD_MASKS
from changedet.pipeline.grid import wgs84_bbox
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, BLEND_MODES, DEFAULT_OVERLAP, DEFAULT_TILE, MIN_TILE, Tiling
from changedet.runtime.ort import RUNTIMES

DEFAULT_MODEL = "auto"
THRESHOLD_RULES = ("fixed", "otsu")
TTA_MODES = ("none", "dihedral")
HARMONIZATIONS = ("none", "histogram")
#: test-time fields whose None means "the model's recommendation" (checkpoint metadata ``test_time``), then these
TEST_TIME_DEFAULTS = {"threshold_rule": "fixed", "tta": "none", "harmonize": "none", "min_region": 0}


class DetectParams(Parameters):
    """User-facing parameters of one detect run (every ``changedet detect`` option but the paths)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(DEFAULT_MODEL, description="bundled model (oscd-s2, rgb), registry name or checkpoint path; auto: "
                       "oscd-s2 for scenes with its 13 Sentinel-2 bands, rgb for 3-band scenes, else cva")
    tile: int = Field(DEFAULT_TILE, ge=MIN_TILE, description="tile size in pixels")
    overlap: int = Field(DEFAULT_OVERLAP, ge=0, description="tile overlap in pixels (below --tile)")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="probability threshold (default: the model's, else 0.5)")
    threshold_rule: Literal[THRESHOLD_RULES] | None = Field(  # type: ignore[valid-type]
        None, description="fixed: --threshold (else the model's); otsu: per scene, Otsu's threshold of the change-probability "
        "histogram (label-free, never below 0.15); default: the model's recommended rule, else fixed")
    tta: Literal[TTA_MODES] | None = Field(  # type: ignore[valid-type]
        None, description="test-time augmentation: dihedral averages the 8 flips/rotations of every tile (8x the model "
        "time); default: the model's recommendation, else none")
    harmonize: Literal[HARMONIZATIONS] | None = Field(  # type: ignore[valid-type]
        None, description="radiometric harmonisation before the model: histogram maps t2's bands onto t1's distribution "
        "(quantiles fitted on the scene); default: the model's recommendation, else none")
    min_region: int | None = Field(None, ge=0, description="drop change regions (4-connected, like the polygons) of fewer pixels from the mask "
                                   "and polygons; default: the model's recommendation, else 0 (keep all)")
    bbox: list[float] | None = Field(None, description="area of interest west,south,east,north in WGS84 degrees: the common "
                                     "grid is clipped to it (t1's pixel lattice kept; remote inputs are read only there)")
    crs: str | None = Field(None, description="target CRS, e.g. EPSG:32631 (default: t1's)")
    resolution: float | None = Field(None, gt=0.0, description="target pixel size in CRS units (default: t1's finest)")
    bands: list[str] | None = Field(None, description="comma-separated band names, descriptions or 1-based indexes")
    nodata: float | None = Field(None, description="nodata value for inputs that declare none")
    coregister: bool = Field(False, description="correct the t2 -> t1 offset measured by phase correlation (always measured and "
                             "reported in run.json) by moving t2's georeference in the warp; refused when the measurement is not trusted")
    cloud_mask: Literal[CLOUD_MASKS] = Field("none", description="clouds and their shadows made invalid in every output: "  # type: ignore[valid-type]
                                             "s2cloudless (Sentinel-2 L1C bands), scl (an L2A SCL band), auto (scl, else "
                                             "s2cloudless, else none), none")
    max_cloud: float | None = Field(None, ge=0.0, le=1.0, description="refuse a pair where either date's cloud (and "
                                    "shadow) fraction of its valid pixels exceeds this (needs --cloud-mask)")
    zones: str | None = Field(None, description="polygons (GeoPackage, shapefile, GeoJSON…, any CRS) to measure change in: "
                              "changed ha, valid fraction and mean probability per zone in zones.csv and a zones layer of changes.gpkg")
    resampling: Literal[RESAMPLING_CHOICES] = Field("bilinear", description="resampling for bands not on the common grid")  # type: ignore[valid-type]
    blend: Literal[BLEND_MODES] = Field("cosine", description="blending of overlapping tiles: cosine ramps, mean, or owner (each "  # type: ignore[valid-type]
                                        "pixel from the tile whose centre is nearest; the default with --smoothing-sigma)")
    smoothing_sigma: float | None = Field(None, gt=0.0, description="randomized smoothing: Gaussian noise of this std (1/255 "
                                          "reflectance) on both dates; the mask abstains (2) where the majority is not certain "
                                          "and certified_radius.tif holds each pixel's certified L2 radius (1/255 reflectance)")
    smoothing_samples: int = Field(100, ge=2, description="noisy passes per tile with --smoothing-sigma (the model time grows as much)")
    smoothing_alpha: float = Field(0.001, gt=0.0, lt=1.0, description="with --smoothing-sigma: probability that any certificate "
                                   "of the map is wrong (Bonferroni over the grid's pixels)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="tiles per model call")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    runtime: Literal[RUNTIMES] = Field("auto", description="inference engine: auto (ONNX Runtime on the CPU for models "  # type: ignore[valid-type]
                                       "that export, else torch), torch, ONNX Runtime float32, or ONNX Runtime int8: the checkpoint's graph "
                                       "calibrated by changedet quantize (CPU)")
    threads: int | None = Field(None, ge=1, description="intra-op threads per worker, torch's and ONNX Runtime's (default: torch's)")
    sample_tiles: int = Field(16, ge=1, description="tiles sampled to estimate scene statistics")
    seed: int = Field(0, description="seed of the scene sampling")
    max_pixels: int = Field(1 << 32, ge=1, description="refuse common grids larger than this many pixels (a corrupt or absurd declared size)")

    @model_validator(mode="before")
    @classmethod
    def _smoothing_blends_by_owner(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("smoothing_sigma") is not None and values.get("blend") is None:
            return {**values, "blend": "owner"}
        return values

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> "DetectParams":
        if self.overlap >= self.tile:
            raise ValueError(f"--overlap must be in [0, tile) = [0, {self.tile}), got {self.overlap}")
        if self.bbox is not None:
            wgs84_bbox(self.bbox)
        if self.max_cloud is not None and self.cloud_mask == "none":
            raise ValueError("--max-cloud needs a cloud mask: add --cloud-mask auto (or s2cloudless, scl)")
        if self.threshold is not None and self.threshold_rule == "otsu":
            raise ValueError("--threshold fixes the threshold; --threshold-rule otsu chooses one per scene: give one of them")
        if self.smoothing_sigma is not None:
            if self.blend != "owner":
                raise ValueError("--smoothing-sigma certifies each pixel's votes from one tile: use --blend owner (its default)")
            if self.threshold_rule == "otsu":
                raise ValueError("--smoothing-sigma certifies a fixed threshold; --threshold-rule otsu chooses one from the scene")
            if (self.min_region or 0) > 1:
                raise ValueError("--min-region edits the mask after the vote, which voids its certificates: drop one of them")
        return self

    def with_test_time(self, recommended: dict[str, Any] | None) -> "DetectParams":
        """These parameters with every unset test-time field resolved: the model's ``recommended``
        setting (checkpoint metadata ``test_time``), else :data:`TEST_TIME_DEFAULTS`. A fixed
        ``--threshold`` keeps the fixed rule; ``--smoothing-sigma`` the fixed rule and no region removal."""
        recommended = recommended or {}
        update = {k: recommended.get(k, default) for k, default in TEST_TIME_DEFAULTS.items() if getattr(self, k) is None}
        if (self.threshold is not None or self.smoothing_sigma is not None) and "threshold_rule" in update:
            update["threshold_rule"] = "fixed"
        if self.smoothing_sigma is not None and "min_region" in update:
            update["min_region"] = 0
        return type(self)(**{**self.model_dump(), **update}) if update else self

    @property
    def tiling(self) -> Tiling:
        """Tile size, overlap and blend mode as one value."""
        return Tiling(self.tile, self.overlap, self.blend)

