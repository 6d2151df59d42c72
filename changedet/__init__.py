"""changedet: remote-sensing change detection with Siamese networks.

Library code only (no orchestration): geo I/O and grids (:mod:`changedet.grid`, :mod:`changedet.io`),
tiling and streaming mosaics (:mod:`changedet.tiling`, :mod:`changedet.mosaic`), models
(:mod:`changedet.models`) and the end-to-end :func:`changedet.detect.detect_changes`.
"""

__version__ = "0.1.0"
