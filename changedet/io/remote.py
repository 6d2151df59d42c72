"""Remote rasters: http(s), S3 and GCS URLs, read through GDAL's ``/vsicurl/``, ``/vsis3/`` and
``/vsigs/`` virtual file systems with windowed range reads (a COG is never downloaded whole).

GDAL's HTTP behaviour is set here, through environment variables (GDAL reads them as config options,
and worker processes inherit them); a value already in the environment wins, so each can be changed
without code:

======================================  =======  ===============================================
``GDAL_HTTP_MAX_RETRY``                 ``4``    retries of a failed request
``GDAL_HTTP_RETRY_DELAY``               ``1``    seconds before the first retry (GDAL backs off further)
``GDAL_HTTP_RETRY_CODES``               ...      ``429,500,502,503,504``: what is worth retrying
``GDAL_HTTP_CONNECTTIMEOUT``            ``15``   seconds to connect
``GDAL_HTTP_TIMEOUT``                   ``60``   seconds for a request
``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES``  ``YES``  one request for adjacent blocks
======================================  =======  ===============================================

Remote files are opened with :data:`REMOTE_OPEN_OPTIONS` (``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``:
no listing of the folder, an extra request or a refused S3 ``LIST``, for each file); local files keep
GDAL's default, which finds sidecars such as an ENVI ``.hdr``.

Credentials for ``/vsis3/`` and ``/vsigs/`` are GDAL's usual ones (``AWS_*``, ``GS_*``, or
``AWS_NO_SIGN_REQUEST=YES`` for public buckets).
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit

from changedet.errors import InputError

GDAL_HTTP_DEFAULTS = {
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    "GDAL_HTTP_CONNECTTIMEOUT": "15",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
}
REMOTE_OPEN_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
_VSI_PREFIX = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/"}
_RETRY_CODES_DEFAULT = (429, 500, 502, 503, 504)


def configure_gdal_http() -> None:
    """Put :data:`GDAL_HTTP_DEFAULTS` into the environment where nothing is set yet."""
    for key, value in GDAL_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_url(spec: str) -> bool:
    """An ``http(s)://``, ``s3://`` or ``gs://`` URL."""
    return urlsplit(str(spec)).scheme.lower() in _VSI_PREFIX


def is_remote(path: str) -> bool:
    """A URL or a GDAL network path (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``)."""
    return is_url(path) or str(path).startswith(tuple(set(_VSI_PREFIX.values())))


def local_path(href: str) -> str:
    """``file:///a/b.tif`` -> ``/a/b.tif``; anything else unchanged."""
    parts = urlsplit(href)
    return unquote(parts.path) if parts.scheme.lower() == "file" else href


def gdal_path(spec: str) -> str:
    """The path GDAL opens for ``spec``: ``/vsicurl/https://…``, ``/vsis3/bucket/key``, ``/vsigs/…``;
    a ``file://`` URL becomes its path; anything else is returned unchanged."""
    spec = local_path(str(spec))
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return "/vsicurl/" + spec
    if scheme in ("s3", "gs"):
        return f"{_VSI_PREFIX[scheme]}{parts.netloc}{parts.path}"
    return spec


def display_url(path: str) -> str:
    """The URL a user gave for a GDAL network path (``/vsicurl/https://…`` -> ``https://…``)."""
    path = str(path)
    if path.startswith("/vsicurl/"):
        return path[len("/vsicurl/"):]
    for scheme in ("s3", "gs"):
        if path.startswith(_VSI_PREFIX[scheme]):
            return f"{scheme}://{path[len(_VSI_PREFIX[scheme]):]}"
    return path


def retries() -> tuple[int, float, tuple[int, ...]]:
    """``(max retries, first delay in seconds, retried HTTP codes)`` as GDAL is configured."""
    configure_gdal_http()
    codes = os.environ["GDAL_HTTP_RETRY_CODES"]
    retried = _RETRY_CODES_DEFAULT if codes.upper() == "ALL" else tuple(int(c) for c in codes.split(",") if c.strip().isdigit())
    return int(os.environ["GDAL_HTTP_MAX_RETRY"]), float(os.environ["GDAL_HTTP_RETRY_DELAY"]), retried


def fetch(url: str, method: str = "GET") -> tuple[bytes, dict[str, str]]:
    """Body and headers of an http(s) ``url`` with GDAL's retry settings (:func:`retries`) and timeout;
    :class:`InputError` naming the status or the network failure when it cannot be had."""
    attempts, delay, retried = retries()
    timeout = float(os.environ.get("GDAL_HTTP_TIMEOUT", GDAL_HTTP_DEFAULTS["GDAL_HTTP_TIMEOUT"]))
    for attempt in range(attempts + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as response:
                return response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            if exc.code not in retried or attempt == attempts:
                raise InputError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if attempt == attempts:
                raise InputError(f"cannot reach {url}: {reason}") from None
        time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


def remote_identity(path: str) -> bytes:
    """What identifies the content of a remote file without reading it, for the run fingerprint: the
    URL with the server's ``ETag``, ``Content-Length`` and ``Last-Modified`` (http/https, one HEAD
    request). S3/GCS objects are identified by their URL alone (GDAL keeps their headers to itself)."""
    url = display_url(path)
    digest = hashlib.blake2b(url.encode(), digest_size=16)
    if urlsplit(url).scheme.lower() in ("http", "https"):
        _, headers = fetch(url, "HEAD")
        for key in ("ETag", "Content-Length", "Last-Modified"):
            digest.update(f"{key}={headers.get(key, '')}".encode())
    return digest.digest()


def read_failure(path: str, exc: Exception) -> str:
    """The reason for an ``error:`` line when reading ``path`` failed mid-run; for a remote file it
    says that GDAL's retries were spent (GDAL's own message for a failed range read names only the
    TIFF decoder)."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not is_remote(path):
        return f"cannot read {path}: {reason}"
    cause = exc.__cause__ or exc.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    detail = str(cause).splitlines()[0] if cause is not None else reason
    attempts = retries()[0]
    return (f"reading {display_url(path)} failed after {attempts} retries (GDAL: {detail}): the server or the network "
            "did not deliver the data; rerun when it does (finished tiles are kept)")


configure_gdal_http()
