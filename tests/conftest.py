"""Shared fixtures: the bundled OSCD sample, ../shared/data (optional) and tiny generated rasters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

# As `make test` does: no analytics from the Prefect servers the tests start (their heartbeat can hit a
# locked database and log a traceback into a command's stderr)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "oscd_bercy"
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def onnx_export_cache(tmp_path_factory) -> Path:
    """The default runtime's ONNX exports go to a folder of this session (every process it starts
    inherits it), not to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("changedet-cache")
    os.environ["CHANGEDET_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def sample_city() -> Path:
    """The bundled OSCD city (always present in the repo)."""
    assert SAMPLE.is_dir(), "data/sample/oscd_bercy is part of the repo"
    return SAMPLE


@pytest.fixture(scope="session")
def bundled():
    """The bundled Sentinel-2 model (``oscd-s2``), loaded as the evaluation stages load it."""
    from changedet.evaluation.loading import load_model

    return load_model("oscd-s2")


@pytest.fixture(scope="session")
def bercy(bundled, sample_city):
    """The sample city with the bundled model's bands, held in memory (labelled)."""
    from changedet.evaluation.loading import open_labelled_scenes

    return open_labelled_scenes(sample_city, ["bercy"], bundled.bands)[0]


@pytest.fixture(scope="session")
def prefect_api():
    """One ephemeral Prefect server for the whole session (the official test harness); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with the reason (a fresh clone does not have it)."""
    if not (SHARED / "oscd").is_dir():
        pytest.skip(f"needs the shared real data at {SHARED} (not part of a fresh clone)")
    return SHARED


def write_raster(
    path: Path,
    data: np.ndarray,
    crs: str | None = "EPSG:32631",
    transform: Affine | None = None,
    nodata: float | None = None,
) -> Path:
    """Write ``data`` ``(bands, h, w)`` (or ``(h, w)``) as a GeoTIFF; returns the path."""
    data = data[None] if data.ndim == 2 else data
    transform = transform or Affine(10.0, 0, 500000.0, 0, -10.0, 5400000.0)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, crs=crs, transform=transform if crs else Affine.identity(), nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def make_raster(tmp_path: Path):
    """Factory writing small GeoTIFFs into the test's temp folder."""

    def make(name: str, data: np.ndarray, **kwargs) -> Path:
        return write_raster(tmp_path / name, data, **kwargs)

    return make


@pytest.fixture
def good_pair(tmp_path):
    """Two 3-band uint16 64 x 64 dates that differ."""
    data = np.random.default_rng(0).integers(100, 4000, (3, 64, 64)).astype(np.uint16)
    return write_raster(tmp_path / "t1.tif", data), write_raster(tmp_path / "t2.tif", data[::-1].copy())


@pytest.fixture(scope="module")
def earlier_outputs(tmp_path_factory) -> Path:
    """Outputs of a successful run on another pair: what every failing run must leave untouched."""
    root = tmp_path_factory.mktemp("earlier")
    data = np.random.default_rng(7).integers(100, 4000, (3, 48, 48)).astype(np.uint16)
    t1, t2 = write_raster(root / "a.tif", data), write_raster(root / "b.tif", data[:, ::-1].copy())
    from changedet.pipeline import detect

    detect.detect_changes(t1, t2, root / "out", detect.DetectParams(tile=32, overlap=8))
    return root / "out"


@pytest.fixture
def ctx(tmp_path, good_pair, sample_city, earlier_outputs, monkeypatch):
    """Reliability cases' context (``tests/reliability.py``): a fresh output folder holding the earlier
    outputs, the good pair and the bundled city."""
    from tests.reliability import Ctx

    out = tmp_path / "out"
    shutil.copytree(earlier_outputs, out)
    context = Ctx(tmp_path, *good_pair, sample_city, out, monkeypatch)
    yield context
    for finalize in context.finalizers:
        finalize()
