"""ONNX Runtime without torch: the session of an exported change model on numpy arrays, and the
export cache that holds one graph per checkpoint.

A CPU detect with a checkpoint whose export is cached runs entirely here: it never imports torch,
timm or segmentation-models-pytorch (about 650 MB of resident memory and 3 s of start-up). The
first run of a checkpoint builds the model in torch and exports it (:mod:`changedet.runtime.onnx`).

Cache layout under :func:`cache_dir`::

    onnx/<key>.onnx      the float32 graph
    onnx/<key>.json      what the pipeline needs to know about the model without building it
    models/<digest>.json the registry facts of a checkpoint (its model's name, whether its dates may differ)

``<key>`` hashes the checkpoint's bytes, the bands per date, the traced tile side, the opset and
the torch and changedet versions (:func:`export_key_of_checkpoint`); a change of any of them gives
a new file. Every file is written under a name unique to its writer and renamed into place, so
concurrent runs (Dask workers starting together) never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from changedet import __version__
from changedet.runtime.threads import num_threads

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
PAD_MULTIPLE = 32  # every registered encoder's output stride divides 32
OPSET = 17
EXAMPLE_SIDE = 256  # default side of the example input traced at export (height and width stay dynamic)
CACHE_ENV = "CHANGEDET_CACHE_DIR"


def cache_dir() -> Path:
    """Where exports are kept: ``$CHANGEDET_CACHE_DIR``, else ``$XDG_CACHE_HOME/changedet`` (``~/.cache/changedet``),
    else the system temp folder when that is not writable."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "changedet"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "changedet"


def publish(path: Path, write: Callable[[Path], Any], replace: bool = False) -> Path:
    """``write(tmp)`` to a name unique to this writer, then rename it to ``path`` (atomic; the last
    writer wins). Nothing is written when ``path`` exists, unless ``replace``."""
    if path.exists() and not replace:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def publish_json(path: Path, value: dict[str, Any]) -> Path:
    """:func:`publish` of a JSON object."""
    return publish(path, lambda tmp: tmp.write_text(json.dumps(value, sort_keys=True)))


def read_json(path: Path) -> dict[str, Any] | None:
    """A cached JSON object, or None when absent or unreadable (a cache miss, never an error)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex blake2b digest of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def export_key_of_checkpoint(digest: str, in_channels: tuple[int, int], size: int) -> str:
    """Cache key of the export of the checkpoint with bytes ``digest`` for bands ``in_channels``, traced at ``size``²."""
    text = f"{digest}|{in_channels[0]}x{in_channels[1]}|{size}|{OPSET}|{_torch_version()}|{__version__}"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def traced_side(size: int) -> int:
    """The example side an export is traced at: ``size`` rounded up to a multiple of :data:`PAD_MULTIPLE`."""
    return max(PAD_MULTIPLE, -(-int(size) // PAD_MULTIPLE) * PAD_MULTIPLE)


def graph_path(key: str, cache: str | Path | None = None) -> Path:
    """Where the float32 graph of ``key`` lives (int8 graphs live beside their checkpoint: :mod:`changedet.runtime.quantize`)."""
    return Path(cache or cache_dir()) / "onnx" / f"{key}.onnx"


def facts_path(key: str, cache: str | Path | None = None) -> Path:
    """Where what the pipeline needs about the exported model of ``key`` is kept."""
    return Path(cache or cache_dir()) / "onnx" / f"{key}.json"


def model_feed(z1: np.ndarray, z2: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs of normalised ``(B, C, h, w)`` tiles: float32, padded to multiples of
    :data:`PAD_MULTIPLE` by edge replication (outputs are cropped back by the caller)."""
    h, w = z1.shape[-2:]
    pad = ((0, 0), (0, 0), (0, -h % PAD_MULTIPLE), (0, -w % PAD_MULTIPLE))
    a, b = (np.pad(x, pad, mode="edge") if h % PAD_MULTIPLE or w % PAD_MULTIPLE else x for x in (z1, z2))
    return {"t1": np.ascontiguousarray(a, np.float32), "t2": np.ascontiguousarray(b, np.float32)}


@dataclass(frozen=True)
class OnnxArrays:
    """An exported change model run by ONNX Runtime on numpy arrays (no torch): ``run(z1, z2)`` returns
    logits and difference ``(B, 1, h, w)``; tiles are padded to multiples of 32 by edge replication.

    The session opens at the first call with :func:`~changedet.runtime.threads.num_threads` intra-op
    threads and reopens when that count changes. ``min_input_size`` and ``in_channels`` are the
    exported model's (see :meth:`ChangeModel.min_input_size`)."""

    onnx_path: Path
    in_channels: tuple[int, int]
    min_input_size: int = 1
    needs_scene_fit = False

    def session(self):  # noqa: ANN201 - onnxruntime.InferenceSession
        """The ONNX Runtime session, sized to the current thread count (one per process and count)."""
        return _session(str(self.onnx_path), num_threads())

    def run(self, z1: np.ndarray, z2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and difference ``(B, 1, h, w)`` float32 of normalised inputs ``(B, C, h, w)``."""
        h, w = z1.shape[-2:]
        logits, difference = self.session().run(None, model_feed(z1, z2))
        return logits[..., :h, :w], difference[..., :h, :w]

    def probabilities(self, z1: np.ndarray, z2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Change probability and difference ``(B, h, w)`` float32."""
        from scipy.special import expit  # here: scipy is imported in the background while the run plans

        logits, difference = self.run(z1, z2)
        return expit(logits[:, 0]).astype(np.float32, copy=False), difference[:, 0].astype(np.float32, copy=False)

    def fit_view(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An exported model samples the raw tile itself (scene-fitted models are never exported)."""
        return x1, x2


_SESSIONS: dict[tuple[str, int], Any] = {}


def _session(path: str, threads: int):  # noqa: ANN202 - onnxruntime.InferenceSession
    key = (path, threads)
    if key not in _SESSIONS:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # glibc keeps freed blocks (runtime.memory): ~75 MB less peak RSS, same speed
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for old in [k for k in _SESSIONS if k[0] == path]:
            del _SESSIONS[old]
        _SESSIONS[key] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def cached_export(digest: str, in_channels: tuple[int, int], size: int, cache: str | Path | None = None) -> OnnxArrays | None:
    """The cached float32 export of a checkpoint (bytes ``digest``) for ``in_channels`` at ``size``, or
    None when it has not been exported yet (or its files are unreadable)."""
    key = export_key_of_checkpoint(digest, in_channels, traced_side(size))
    facts = read_json(facts_path(key, cache))
    path = graph_path(key, cache)
    if facts is None or not path.is_file() or list(facts.get("in_channels", [])) != list(in_channels):
        return None
    return OnnxArrays(path, in_channels, int(facts.get("min_input_size", 1)))


def record_export(digest: str, arrays: OnnxArrays, size: int, cache: str | Path | None = None) -> None:
    """Keep what :func:`cached_export` needs to find ``arrays`` (exported from the checkpoint ``digest``) again."""
    key = export_key_of_checkpoint(digest, arrays.in_channels, traced_side(size))
    publish_json(facts_path(key, cache), {"in_channels": list(arrays.in_channels), "min_input_size": arrays.min_input_size})


def checkpoint_facts(digest: str, cache: str | Path | None = None) -> dict[str, Any] | None:
    """The registry facts recorded for a checkpoint by :func:`record_checkpoint_facts` (None when not yet)."""
    return read_json(Path(cache or cache_dir()) / "models" / f"{digest}-{__version__}.json")


def record_checkpoint_facts(digest: str, facts: dict[str, Any], cache: str | Path | None = None) -> None:
    """Keep a checkpoint's registry facts (its model's name, whether its dates may differ) for runs without torch."""
    publish_json(Path(cache or cache_dir()) / "models" / f"{digest}-{__version__}.json", facts)
