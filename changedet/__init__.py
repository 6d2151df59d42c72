"""changedet: remote-sensing change detection with Siamese networks.

Library code only (no orchestration): geo I/O and grids (:mod:`changedet.grid`, :mod:`changedet.io`),
tiling and streaming mosaics (:mod:`changedet.tiling`, :mod:`changedet.mosaic`), models
(:mod:`changedet.models`) and the end-to-end :func:`changedet.detect.detect_changes`.
"""

import os

# GDAL's block cache defaults to 5% of RAM; windowed reads need far less. Bounded so memory stays
# flat with scene size (override by setting GDAL_CACHEMAX before importing changedet).
os.environ.setdefault("GDAL_CACHEMAX", "128")

__version__ = "0.1.0"
