"""changedet: remote-sensing change detection with Siamese networks.

Library code only (no orchestration). The data path of ``changedet detect`` is :mod:`changedet.pipeline`
(parameters → grid → tiles → the one scene runner → mosaic → outputs, ending in
:func:`changedet.pipeline.detect.detect_changes`); below it :mod:`changedet.io`, :mod:`changedet.models`,
:mod:`changedet.normalization` and :mod:`changedet.runtime`; above it training data (:mod:`changedet.data`),
the one trainer (:mod:`changedet.train`) and the evaluation stages (:mod:`changedet.evaluation`).
"""

import os

# GDAL's block cache defaults to 5% of RAM; windowed reads and block-row writes need far less (64 MB:
# 16384² peak RSS 1462 MB vs 1506 MB with 128, same speed). Bounded so memory stays
# flat with scene size (override by setting GDAL_CACHEMAX before importing changedet).
os.environ.setdefault("GDAL_CACHEMAX", "64")

__version__ = "0.2.0"


def __getattr__(name: str):
    """``changedet.detect_xarray``, imported on first use (``import changedet`` stays light: no torch, no xarray)."""
    if name == "detect_xarray":
        from changedet.xarray_api import detect_xarray

        return detect_xarray
    raise AttributeError(f"module 'changedet' has no attribute {name!r}")
