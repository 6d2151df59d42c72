"""Block-wise raster writers, Cloud-Optimized GeoTIFF conversion, atomic output staging, and
:func:`writing`, which turns any failure to write a file into one ``OSError`` naming it.

Rows stream into a tiled scratch GeoTIFF (buffered to whole block rows, so no block is compressed
twice), which GDAL's COG driver then turns into the final tiled, compressed COG with overviews.
Every file is produced inside a hidden staging folder and moved into place only when the whole run
succeeded, so a failed run never leaves a half-written raster under a final name.

Why :func:`writing` exists: a full disk or a file size limit reaches Python in many shapes — GDAL's
``CPLE_*`` errors ("Write failed. See previous exception"), pyogrio's ``DataSourceError``/
``FeatureError`` (SQLite's "database or disk is full"), ``OSError`` without a file name from buffered
writes — and GDAL sometimes reports it only through libtiff's process-wide error handler, which prints
``_tiffWriteProc: No space left on device.`` on stderr while the close that failed returns normally.
Inside :func:`writing` those libtiff messages are captured instead of printed, and count as failures.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from changedet.errors import OutputError
from changedet.pipeline.grid import Grid

BLOCK = 512
FULL_DISK_BYTES = 1 << 20  # a file system with less free space than this counts as full
MESSAGE_ERRNOS = (  # fragments of GDAL/libtiff/SQLite messages that name the cause, checked in order
    ("no space left on device", errno.ENOSPC),
    ("free disk space", errno.ENOSPC),  # GDAL's own check before it writes a GeoTIFF
    ("not enough space", errno.ENOSPC),
    ("file too large", errno.EFBIG),
    ("disk quota exceeded", errno.EDQUOT),
    ("permission denied", errno.EACCES),
    ("read-only file system", errno.EROFS),
)
SHORT_WRITE = "disk is full"  # SQLite's SQLITE_FULL: a short write, from a full disk or a file size limit

CE_FAILURE = 3  # GDAL's CPLErr for an error (CE_Fatal is 4)

log = logging.getLogger(__name__)
_captures = threading.local()  # .stack: the native error messages of each open writing() block


def _keep(message: str) -> None:
    """Hand a native error message to this thread's innermost :func:`writing` block, or log it (INFO,
    like rasterio's own GDAL errors) when it came from elsewhere."""
    stack = getattr(_captures, "stack", None)
    if stack:
        stack[-1].append(message)
    else:
        log.info("%s", message)


def _libtiff_message(module: bytes | None, fmt: bytes, args: int | None) -> None:
    """libtiff's process-wide error handler: ``<module>: <message>`` to :func:`_keep`, never to stderr."""
    buffer = ctypes.create_string_buffer(1024)
    _LIBC.vsnprintf(buffer, len(buffer), fmt, args)
    _keep(f"{(module or b'libtiff').decode(errors='replace')}: {buffer.value.decode(errors='replace')}")


def _gdal_message(err_class: int, err_no: int, message: bytes | None) -> None:
    """GDAL error handler pushed for a :func:`writing` block: failures to :func:`_keep`, not ``ERROR 1:`` lines."""
    if err_class >= CE_FAILURE:
        _keep((message or b"GDAL error").decode(errors="replace"))


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_LIBTIFF_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)(_libtiff_message)
_GDAL_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_char_p)(_gdal_message)
_install_lock = threading.Lock()
_installed = False
_rasterio_gdal: list[ctypes.CDLL] = []  # rasterio's libgdal (CPLPushErrorHandler/CPLPopErrorHandler)


def _mapped_libraries(fragment: str) -> list[str]:
    """Paths of the shared libraries mapped into this process whose path contains ``fragment`` (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if fragment in line})
    except OSError:
        return []


def _install_native_handlers() -> None:
    """Once per process (Linux): route libtiff's process-wide error handler — GDAL's GeoTIFF driver
    reports a failed write through it, and its default prints to stderr — to :func:`_libtiff_message`
    (the previous handlers come back at exit, before the interpreter running ours goes away), and find
    rasterio's libgdal for :func:`writing` to push :func:`_gdal_message` on."""
    global _installed
    with _install_lock:
        if _installed or _LIBC is None:
            return
        _installed = True
        _LIBC.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        setters: dict[int, ctypes._CFuncPtr] = {}
        for library in _mapped_libraries("/libtiff") + _mapped_libraries("/libgdal"):
            for name in ("TIFFSetErrorHandler", "gdal_TIFFSetErrorHandler"):  # gdal_*: GDAL's internal libtiff
                setter = getattr(ctypes.CDLL(library), name, None)
                if setter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_void_p], ctypes.c_void_p
                    setters.setdefault(ctypes.cast(setter, ctypes.c_void_p).value, setter)
        for setter in setters.values():
            atexit.register(setter, setter(ctypes.cast(_LIBTIFF_HANDLER, ctypes.c_void_p)))
        for library in _mapped_libraries("/libgdal"):
            gdal = ctypes.CDLL(library)
            gdal.GDALVersionInfo.argtypes, gdal.GDALVersionInfo.restype = [ctypes.c_char_p], ctypes.c_char_p
            if gdal.GDALVersionInfo(b"RELEASE_NAME").decode() == rasterio.__gdal_version__:
                gdal.CPLPushErrorHandler.argtypes, gdal.CPLPushErrorHandler.restype = [ctypes.c_void_p], None
                gdal.CPLPopErrorHandler.argtypes, gdal.CPLPopErrorHandler.restype = [], None
                _rasterio_gdal.append(gdal)


def _free_bytes(path: Path) -> float:
    """Free space on the file system of ``path`` (its nearest existing folder); root may use the reserve."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return float("inf")
    return (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _failure_errno(messages: list[str], path: Path) -> int:
    """The errno a write of ``path`` most likely failed with, from its error ``messages`` and the file system."""
    text = " ".join(messages).lower()
    for fragment, code in MESSAGE_ERRNOS:
        if fragment in text:
            return code
    if _free_bytes(path) < FULL_DISK_BYTES:
        return errno.ENOSPC
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG  # a failed write with space left, under a file size limit (ulimit -f)
    return errno.ENOSPC if SHORT_WRITE in text else errno.EIO


def _as_os_error(exc: BaseException | None, path: str | Path, captured: Sequence[str] = ()) -> OSError:
    """``OSError(errno, strerror, filename)`` for a failed write of ``path`` (see :func:`writing`)."""
    chain = _chain(exc)
    system = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
    if system is not None:
        if system is exc and exc.filename:
            return exc
        return OSError(system.errno, system.strerror or os.strerror(system.errno), system.filename or str(path))
    messages = [*captured, *(str(e) for e in chain)]
    code = _failure_errno(messages, Path(path))
    detail = next((line for line in map(_first_line, [*captured, *(str(e) for e in reversed(chain))]) if line), "")
    reason = f"write failed ({detail or type(exc).__name__})" if code == errno.EIO else os.strerror(code)
    return OSError(code, reason, str(path))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run the block that writes ``path``; any failure leaves it as ``OSError(errno, strerror, str(path))``.

    * an ``OSError`` with an errno (``ENOSPC``, ``EFBIG``, ``EDQUOT``, ``EACCES``, ``EROFS``, ``EIO``…),
      raised or found in the exception chain, keeps it; the file name becomes ``path`` where it has none;
    * GDAL ``CPLE_*``, rasterio, pyogrio, SQLite and any other errors get the errno their messages (or
      libtiff's captured ones) name: "No space left on device"/"Free disk space"/"not enough space" →
      ``ENOSPC``, "File too large" → ``EFBIG``, "Disk quota exceeded" → ``EDQUOT``, "Permission denied" →
      ``EACCES``, "Read-only file system" → ``EROFS``; otherwise a file system with less than
      :data:`FULL_DISK_BYTES` free → ``ENOSPC``, a file size limit (``ulimit -f``) in force → ``EFBIG``,
      SQLite's "disk is full" → ``ENOSPC``, else ``EIO`` with strerror ``write failed (<first line>)``;
    * native errors reported during the block — libtiff's, and GDAL's outside rasterio's own error
      wrapping (closing a GeoTIFF whose last blocks cannot be written returns normally) — are kept off
      stderr and raise the same way once the block ends;
    * ``KeyboardInterrupt``, ``SystemExit`` and ``MemoryError`` pass through unchanged.
    """
    _install_native_handlers()
    captured: list[str] = []
    stack = _captures.__dict__.setdefault("stack", [])
    stack.append(captured)
    for gdal in _rasterio_gdal:  # thread-local in GDAL; rasterio pushes its own over it around wrapped calls
        gdal.CPLPushErrorHandler(_GDAL_HANDLER)
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:
        error = _as_os_error(exc, path, captured)
        if error is exc:
            raise
        raise error from exc
    finally:
        for gdal in _rasterio_gdal:
            gdal.CPLPopErrorHandler()
        stack.pop()
    if captured:
        raise _as_os_error(None, path, captured)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` inside :func:`writing`; returns the path.

    Flushed and closed inside the guard, so a full disk or a size limit surfaces here (on some file
    systems only at close); not fsynced: outputs become final by the staging folder's rename, and a
    crash of the machine itself is out of scope.
    """
    with writing(path), open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


class BlockRasterWriter:
    """Single-band scratch GeoTIFF on ``grid``, written top to bottom by :meth:`write_rows`."""

    def __init__(self, path: str | Path, grid: Grid, dtype: str, nodata: float) -> None:
        self.path = Path(path)
        self.grid = grid
        self.dtype = np.dtype(dtype)
        self.nodata = nodata
        profile = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "count": 1,
            "dtype": self.dtype.name,
            "nodata": nodata,
            "crs": grid.crs,
            "transform": grid.transform,
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "compress": "zstd",
            "zstd_level": 1,
            "bigtiff": "if_safer",
        }
        with warnings.catch_warnings(), writing(self.path):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.dataset = rasterio.open(self.path, "w", **profile)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._next_row = 0
        self._written = 0

    def write_rows(self, row_off: int, rows: np.ndarray) -> None:
        """Append ``rows (n, width)`` starting at ``row_off`` (must follow the previous rows); the last
        rows also close the file, so a disk that cannot take its final blocks fails here."""
        if row_off != self._next_row:
            raise ValueError(f"rows must be written in order: expected row {self._next_row}, got {row_off}")
        self._buffer.append(rows.astype(self.dtype, copy=False))
        self._buffered += rows.shape[0]
        self._next_row += rows.shape[0]
        if self._buffered >= BLOCK or self._next_row >= self.grid.height:
            self._flush(final=self._next_row >= self.grid.height)

    def _flush(self, final: bool) -> None:
        data = np.concatenate(self._buffer, axis=0)
        n = data.shape[0] if final else (data.shape[0] // BLOCK) * BLOCK
        with writing(self.path):
            self.dataset.write(data[:n], 1, window=Window(0, self._written, self.grid.width, n))
        self._written += n
        rest = data[n:]
        self._buffer = [rest] if rest.shape[0] else []
        self._buffered = rest.shape[0]
        if final:
            self._close_file()

    def _close_file(self) -> None:
        """Close the GDAL dataset (GDAL writes its last blocks here; a no-op once closed)."""
        with writing(self.path):
            self.dataset.close()

    def discard(self) -> None:
        """Close the file after a failure elsewhere, without raising: it is not kept (the staging
        folder goes), and GDAL's errors about its last blocks stay off stderr."""
        with contextlib.suppress(OSError):
            self._close_file()

    def close(self) -> None:
        """Close the scratch file; ``OSError`` if it could not be written, ``ValueError`` if rows are missing."""
        self._close_file()
        if self._written != self.grid.height:
            raise ValueError(f"raster incomplete: {self._written} of {self.grid.height} rows written")


def write_cog(src: str | Path, dst: str | Path, resampling: str = "average") -> None:
    """Convert a GeoTIFF into a Cloud-Optimized GeoTIFF (512 px tiles, DEFLATE, overviews).

    DEFLATE level 1: a 4096² float32 probability COG takes 0.60 s instead of 0.90 s at the default
    level 6, for a 2 % larger file.
    """
    with warnings.catch_warnings(), writing(dst):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        rasterio.shutil.copy(
            str(src),
            str(dst),
            driver="COG",
            COMPRESS="DEFLATE",
            LEVEL="1",
            PREDICTOR="YES",
            BLOCKSIZE=str(BLOCK),
            OVERVIEWS="AUTO",
            OVERVIEW_RESAMPLING=resampling.upper(),
            BIGTIFF="IF_SAFER",
            NUM_THREADS="ALL_CPUS",
        )


class OutputStaging:
    """Stage files in a hidden folder inside ``out_dir`` and move them into place on :meth:`commit`.

    Used as a context manager: leaving the block with an exception deletes the staging folder and
    leaves any earlier outputs in ``out_dir`` untouched.
    """

    def __init__(self, out_dir: str | Path, names: list[str], overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.names = names
        self.check(out_dir, names, overwrite)
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=".changedet-staging-", dir=self.out_dir))

    @staticmethod
    def check(out_dir: str | Path, names: list[str], overwrite: bool) -> None:
        """Fail early (:class:`OutputError`) if ``out_dir`` is a file or holds outputs without ``overwrite``."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"output path {out_dir} exists and is not a folder")
        existing = [n for n in names if (out_dir / n).exists()]
        if existing and not overwrite:
            raise OutputError(f"{out_dir} already holds {', '.join(existing)}; pass --overwrite to replace")

    def path(self, name: str) -> Path:
        """Path of ``name`` inside the staging folder."""
        return self.dir / name

    def commit(self) -> None:
        """Move every staged output into ``out_dir`` (each an atomic rename) and drop the staging folder."""
        missing = [n for n in self.names if not self.path(n).exists()]
        if missing:
            raise OutputError(f"internal error: outputs not produced: {', '.join(missing)}")
        for name in self.names:
            with writing(self.out_dir / name):
                os.replace(self.path(name), self.out_dir / name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "OutputStaging":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
