"""Parameters of ``changedet monitor``, declared once (:class:`MonitorParams`).

They extend :class:`~changedet.pipeline.params.DetectParams`: the model and test-time options apply to
every date's detection, ``--bbox``, ``--crs``, ``--resolution``, ``--bands``, ``--cloud-mask`` and
``--coregister`` to how each acquisition is put on the monitoring grid. Randomized smoothing is not a
monitoring option (:data:`NOT_MONITOR_OPTIONS`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from changedet.pipeline.clouds import CLOUD_MASKS
from changedet.pipeline.params import DetectParams

#: DetectParams fields ``changedet monitor`` does not offer
NOT_MONITOR_OPTIONS = ("smoothing_sigma", "smoothing_samples", "smoothing_alpha", "max_pixels")
#: fields that decide how each acquisition is read onto the grid (the rest go to each date's detection)
INGEST_FIELDS = ("bbox", "crs", "resolution", "bands", "nodata", "resampling", "cloud_mask", "max_cloud", "coregister")
#: fields that may change between incremental runs (the period and the catalog grow; output verbosity)
RUN_FIELDS = ("stac", "collection", "start", "end", "alert_ha", "threads", "batch_size")


def _date(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise ValueError(f"{option} must be a date YYYY-MM-DD, got {value!r}") from None


class MonitorParams(DetectParams):
    """Every ``changedet monitor`` option but ``--out`` and ``--quiet``."""

    stac: str = Field(..., description="a static STAC catalog or collection (JSON path or URL) or a STAC API root URL")
    collection: list[str] | None = Field(None, description="collection ids (comma-separated; needed for a STAC API)")
    start: str | None = Field(None, description="first acquisition date YYYY-MM-DD (default: the catalog's first)")
    end: str | None = Field(None, description="last acquisition date YYYY-MM-DD, inclusive (default: the catalog's last)")
    persistence: int = Field(2, ge=1, description="a change is confirmed when it is seen on this many consecutive clear "
                             "acquisitions of the pixel (cloudy or missing ones neither count nor interrupt)")
    baseline: str = Field("previous", description="what each date is compared with, per pixel: previous (the last clear "
                          "acquisition without change) or median:K (the median of the last K of them)")
    cloud_mask: Literal[CLOUD_MASKS] = Field("auto", description="clouds and their shadows made invalid on each "  # type: ignore[valid-type]
                                             "acquisition: s2cloudless, scl, auto (scl, else s2cloudless, else none), none")
    max_cloud: float | None = Field(None, ge=0.0, le=1.0, description="skip an acquisition whose cloud (and shadow) "
                                    "fraction over the area exceeds this (needs --cloud-mask)")
    alert_ha: float | None = Field(None, gt=0.0, description="with --zones: raise an alert (alerts.json, the flow's "
                                   "notification) when a zone's confirmed changed area first exceeds this many hectares")

    @field_validator("start", "end")
    @classmethod
    def _iso_date(cls, value: str | None, info) -> str | None:
        return _date(value, f"--{info.field_name}")

    @model_validator(mode="after")
    def _monitoring(self) -> "MonitorParams":
        if self.bbox is None:
            raise ValueError("--bbox is required: the area to monitor, west,south,east,north in WGS84 degrees")
        if self.start and self.end and self.start > self.end:
            raise ValueError(f"--start {self.start} is after --end {self.end}")
        self.baseline_k  # noqa: B018 - validates the form
        if self.alert_ha is not None and self.zones is None:
            raise ValueError("--alert-ha needs --zones: alerts are per zone")
        if self.smoothing_sigma is not None:
            raise ValueError("randomized smoothing is not a monitoring option: use changedet detect")
        return self

    @property
    def baseline_k(self) -> int:
        """How many clear acquisitions the baseline holds per pixel (1 for ``previous``)."""
        if self.baseline == "previous":
            return 1
        kind, _, count = self.baseline.partition(":")
        if kind != "median" or not count.isdigit() or not 1 <= int(count) <= 12:
            raise ValueError(f"--baseline must be previous or median:K with K in 1..12, got {self.baseline!r}")
        return int(count)

    def detect_params(self) -> DetectParams:
        """The parameters of each date's detection: the model and test-time options; the date folders
        are already on the grid, masked and co-registered."""
        keep = {k: v for k, v in self.model_dump().items() if k in DetectParams.model_fields and k not in INGEST_FIELDS}
        keep = {k: v for k, v in keep.items() if k != "zones"}
        return DetectParams(**keep)

    def fingerprint(self) -> str:
        """A digest of every option that changes the result of a date (not the period, catalog or zones):
        an incremental run is refused when it differs from the state's."""
        fixed = {k: v for k, v in self.model_dump().items() if k not in RUN_FIELDS}
        return hashlib.blake2b(json.dumps(fixed, sort_keys=True).encode(), digest_size=8).hexdigest()
