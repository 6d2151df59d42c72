"""A full disk and a file size limit, for real, through ``python -m changedet.cli detect``.

Every run starts from an ``--out`` that holds the outputs of an earlier successful run (on another
pair) and passes ``--overwrite``. Whatever the limit, it must end either with status 0 and a complete
output set, or with status 1 and exactly one stderr line ``error: <strerror>: <file>`` (no traceback,
no GDAL ``ERROR 1:``/libtiff lines), the earlier outputs byte-identical, no staging folder and no new
raster, GeoPackage, style or PNG (only the hidden tile store, kept for a resume, may remain).

* a size-limited tmpfs holds ``--out`` (needs root or ``CAP_SYS_ADMIN``; skipped otherwise), filled to
  leave a swept amount of free space: ``No space left on device``;
* ``ulimit -f`` (``RLIMIT_FSIZE``, set in the child) caps every file the run writes, tile store
  included: ``File too large``.

The sweeps must make runs fail in the tile store, in a scratch raster or COG, and in the GeoPackage
or ``run.json``. :func:`changedet.io.writers.writing` itself is unit-tested on injected errors.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pyogrio.errors import FeatureError
from rasterio._err import CPLE_AppDefinedError
from rasterio.errors import RasterioIOError

from changedet.pipeline.detect import TILE_STORE_DIR
from changedet.io.writers import write_text, writing
from tests.conftest import write_raster

REPO = Path(__file__).resolve().parents[1]
OUTPUT_SUFFIXES = (".tif", ".tiff", ".gpkg", ".qml", ".png")
TMPFS_BYTES = 4 << 20
PAGE = 4096
# free space left on the tmpfs, in units of the earlier outputs' size on disk (S ≈ 200 KiB here): the
# run needs ≈ 1.1 S for the tile store, then scratch rasters, COGs, styles, the GeoPackage, quicklook
# and run.json (≈ 2.5 S in all) before the tile store goes
FREE_SPACE_FRACTIONS = (0.05, 0.5, 1.25, 1.45, 1.7, 2.1, 2.35, 4.0)


def _pair(root: Path, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    t1 = rng.integers(100, 4000, (3, 96, 96)).astype(np.uint16)
    t2 = t1.copy()
    t2[:, 20:50, 30:70] = rng.integers(3000, 4000, (3, 30, 40))
    return write_raster(root / f"t1_{seed}.tif", t1), write_raster(root / f"t2_{seed}.tif", t2)


def _detect(pair: tuple[Path, Path], out: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "changedet.cli", "detect", "--t1", str(pair[0]), "--t2", str(pair[1]),
               "--out", str(out), "--model", "cva", "--tile", "32", "--overlap", "8", "--overwrite", "--quiet"]
    limit = None if file_size_limit is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit,) * 2))
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _stage(failed: Path) -> str:
    """Which step of the write chain a failing file belongs to."""
    if TILE_STORE_DIR in failed.parts:
        return "tile store"
    if failed.name.startswith("scratch_"):
        return "scratch raster"
    return {".tif": "COG", ".gpkg": "GeoPackage"}.get(failed.suffix, failed.name)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("pairs")
    return {"earlier": _pair(root, 7), "new": _pair(root, 3)}


@pytest.fixture(scope="module")
def earlier_outputs(tmp_path_factory, pairs) -> Path:
    """Outputs of a successful run on the other pair: what every failing run must leave untouched."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    result = _detect(pairs["earlier"], out)
    assert result.returncode == 0, result.stderr
    return out


def _check_outcome(result: subprocess.CompletedProcess, out: Path, before: dict[str, bytes], strerror: str) -> Path | None:
    """Assert a clean success (returns None) or a clean failure (returns the file the error names)."""
    stderr = result.stderr.splitlines()
    assert not [line for line in stderr if "Traceback" in line or "ERROR" in line], result.stderr
    lines = [line for line in stderr if line.strip() and not line.startswith("warning: ")]
    after = _snapshot(out)
    if result.returncode == 0:
        assert lines == [], result.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(before), "incomplete output set"
        return None
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    reason, _, failed = lines[0].removeprefix("error: ").partition(": ")
    assert reason == strerror and Path(failed).is_relative_to(out), lines[0]
    assert {name: after.get(name) for name in before} == before, "earlier outputs changed"
    new = [name for name in after if name not in before]
    assert all(name.startswith(TILE_STORE_DIR + "/") for name in new), new
    assert not [name for name in new if name.endswith(OUTPUT_SUFFIXES)], new
    assert not list(out.glob(".changedet-staging-*"))
    return Path(failed)


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Path]:
    """A freshly mounted tmpfs of :data:`TMPFS_BYTES`, or skip where this machine cannot mount one."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a size-limited file system")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_sweep_fails_cleanly(tmpfs, pairs, earlier_outputs):
    before = _snapshot(earlier_outputs)
    size = sum(-(-len(data) // PAGE) * PAGE for data in before.values())
    stages, succeeded = [], []
    for fraction in FREE_SPACE_FRACTIONS:
        out = tmpfs / "out"
        shutil.copytree(earlier_outputs, out)
        stat = os.statvfs(tmpfs)
        (tmpfs / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - int(fraction * size)))
        failed = _check_outcome(_detect(pairs["new"], out), out, before, os.strerror(errno.ENOSPC))
        if failed:
            stages.append(_stage(failed))
        else:
            succeeded.append(fraction)
        shutil.rmtree(out)
        (tmpfs / "filler").unlink()
    # with enough space the run succeeds, and so it does with more; every run short of space failed cleanly
    assert succeeded and succeeded == list(FREE_SPACE_FRACTIONS[len(FREE_SPACE_FRACTIONS) - len(succeeded):]), (stages, succeeded)
    seen = set(stages)  # the whole write chain
    assert "tile store" in seen and seen & {"scratch raster", "COG"} and seen & {"GeoPackage", "run.json"}, stages


def test_full_disk_through_the_prefect_flow_fails_cleanly(tmpfs, pairs, earlier_outputs):
    """The same fault through ``python flows/detect.py run``: the write task runs on a Dask worker,
    its OSError comes back to the flow, is not retried (a full disk stays full), and is one line."""
    before = _snapshot(earlier_outputs)
    size = sum(-(-len(data) // PAGE) * PAGE for data in before.values())
    out = tmpfs / "out"
    shutil.copytree(earlier_outputs, out)
    stat = os.statvfs(tmpfs)
    (tmpfs / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - int(1.7 * size)))
    command = [sys.executable, "flows/detect.py", "run", "--t1", str(pairs["new"][0]), "--t2", str(pairs["new"][1]),
               "--out", str(out), "--model", "cva", "--tile", "32", "--overlap", "8", "--overwrite"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert "Traceback" not in result.stderr and "Retry" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: {os.strerror(errno.ENOSPC)}: {out}"), errors[0]
    after = _snapshot(out)
    assert {name: after.get(name) for name in before} == before, "earlier outputs changed"
    assert not [name for name in after if name not in before and not name.startswith(TILE_STORE_DIR + "/")]
    assert not list(out.glob(".changedet-staging-*"))


def test_file_size_limit_sweep_fails_cleanly(tmp_path, pairs, earlier_outputs):
    before = _snapshot(earlier_outputs)
    cog, gpkg = len(before["change_probability.tif"]), len(before["changes.gpkg"])
    # a tile's prediction chunk is 2 x 32 x 32 float32 = 8 KiB of noise: 4 KiB stops the tile store
    limits = [PAGE, int(0.35 * cog), int(0.7 * cog), int(0.35 * gpkg), int(0.6 * gpkg), 4 * gpkg]
    expected = ["tile store", "scratch raster", "scratch raster", "GeoPackage", "GeoPackage"]  # the file that hit it
    stages, succeeded = [], []
    for limit in limits:
        out = tmp_path / f"out_{limit}"
        shutil.copytree(earlier_outputs, out)
        failed = _check_outcome(_detect(pairs["new"], out, limit), out, before, os.strerror(errno.EFBIG))
        if failed:
            stages.append(_stage(failed))
        else:
            succeeded.append(limit)
    assert (stages, succeeded) == (expected, [limits[-1]])


def test_failed_geotiff_close_raises_without_printing(tmp_path):
    """GDAL writes a small GeoTIFF only when it is closed, and a failed close returns normally while
    libtiff prints to stderr: writing the last rows (which closes the file) must raise, and print nothing."""
    script = (
        "import resource, sys, numpy as np\n"
        "from affine import Affine\n"
        "from changedet.pipeline.grid import Grid\n"
        "from changedet.io.writers import BlockRasterWriter\n"
        "writer = BlockRasterWriter(sys.argv[1], Grid(None, Affine.identity(), 96, 96), 'float32', -9999.0)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000))\n"
        "try:\n"
        "    writer.write_rows(0, np.random.default_rng(0).random((96, 96)))\n"
        "except OSError as exc:\n"
        "    print(exc.errno, exc.filename)\n"
    )
    path = tmp_path / "scratch.tif"
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == [str(errno.EFBIG), str(path)], result.stdout + result.stderr
    assert result.stderr == ""


def _raised(path: Path, exc: BaseException) -> OSError:
    with pytest.raises(OSError) as info, writing(path):
        raise exc
    return info.value


@pytest.fixture
def no_file_size_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _gdal_write_failure(message: str) -> RasterioIOError:
    try:
        raise CPLE_AppDefinedError(3, 1, message)
    except CPLE_AppDefinedError as cause:
        try:
            raise RasterioIOError("Write failed. See previous exception for details.") from cause
        except RasterioIOError as exc:
            return exc


def test_writing_maps_gdal_errors_by_message(tmp_path, no_file_size_limit):
    path = tmp_path / "a.tif"
    error = _raised(path, _gdal_write_failure("_tiffWriteProc: No space left on device"))
    assert (error.errno, error.strerror, error.filename) == (errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    error = _raised(path, _gdal_write_failure("Free disk space available is 10 bytes, whereas 4096 are at least necessary"))
    assert error.errno == errno.ENOSPC
    error = _raised(path, _gdal_write_failure("TIFFAppendToStrip:Write error at scanline 0"))
    assert (error.errno, error.strerror) == (errno.EIO, "write failed (TIFFAppendToStrip:Write error at scanline 0)")


def test_writing_maps_sqlite_disk_full(tmp_path, no_file_size_limit, monkeypatch):
    path = tmp_path / "changes.gpkg"
    full = FeatureError("Could not add feature to layer at index 0: sqlite3_exec(...) failed: database or disk is full")
    assert (_raised(path, full).errno, _raised(path, full).filename) == (errno.ENOSPC, str(path))
    limit = 40_000  # SQLite says "disk is full" for any short write: with space left, it is the size limit
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, limit))
    assert _raised(path, full).errno == errno.EFBIG


def test_writing_sees_a_full_file_system(tmp_path, no_file_size_limit, monkeypatch):
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((*real(p)[:3], 0, 0, *real(p)[5:])))
    error = _raised(tmp_path / "x.gpkg", FeatureError("no such table: gpkg_contents"))
    assert error.errno == errno.ENOSPC


def test_writing_keeps_os_errors(tmp_path):
    path = tmp_path / "run.json"
    error = _raised(path, OSError(errno.EFBIG, os.strerror(errno.EFBIG)))  # a buffered write's flush
    assert (error.errno, error.strerror, error.filename) == (errno.EFBIG, "File too large", str(path))
    named = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere")
    assert _raised(path, named) is named


def test_writing_lets_interrupts_and_memory_errors_through(tmp_path):
    for exc in (KeyboardInterrupt(), SystemExit(3), MemoryError()):
        with pytest.raises(type(exc)), writing(tmp_path / "x"):
            raise exc


def test_writing_reports_other_failures_as_write_failed(tmp_path, no_file_size_limit):
    error = _raised(tmp_path / "x.png", ValueError("unknown mode\nsecond line"))
    assert (error.errno, error.strerror, error.filename) == (errno.EIO, "write failed (unknown mode)", str(tmp_path / "x.png"))


def test_write_text(tmp_path):
    assert write_text(tmp_path / "a.json", "{}\n").read_text() == "{}\n"
    with pytest.raises(FileNotFoundError) as info:
        write_text(tmp_path / "missing" / "a.json", "{}")
    assert info.value.filename == str(tmp_path / "missing" / "a.json")
