"""CPU inference through ONNX Runtime: the export of a change model, cached per weights, and the
model that runs it.

``runtime="auto"`` (the default) runs ONNX Runtime on the CPU for every model that exports, and eager
torch on a GPU or for scene-fitted models (CVA, hetero). ``onnx`` is the exported float32 graph,
``onnx-int8`` the same graph with dynamically quantised int8 weights (ConvInteger/MatMulInteger).

Exports are cached in :func:`cache_dir` under a key of the weights, the model class, the example tile
side, the opset and the torch and changedet versions: a change of any of them gives a new file. Each
file is written under a name unique to its writer and renamed into place, so concurrent runs (Dask
workers starting together) never read a half-written graph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from changedet import __version__
from changedet.errors import ModelError
from changedet.models.base import ChangeModel
from changedet.models.output import ChangeOutput

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
PAD_MULTIPLE = 32  # every registered encoder's output stride divides 32
OPSET = 17
EXAMPLE_SIDE = 256  # default side of the example input traced at export (height and width stay dynamic)
CACHE_ENV = "CHANGEDET_CACHE_DIR"
_EXPORT_LOCK = threading.Lock()  # the TorchScript tracer is not thread-safe; processes are kept apart by unique temp names


class _Outputs(nn.Module):
    """Plain-tensor outputs for tracing."""

    def __init__(self, model: ChangeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(t1, t2)
        return out.logits, out.difference


def export_onnx(model: ChangeModel, path: str | Path, size: int = EXAMPLE_SIDE) -> Path:
    """Export ``model`` (eval mode) to ONNX with dynamic batch/height/width (multiples of 32), traced at ``size``²."""
    c1, c2 = model.in_channels
    wrapper = _Outputs(model).eval()
    example = (torch.zeros(1, c1, size, size), torch.zeros(1, c2, size, size))
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, example, str(path), input_names=["t1", "t2"], output_names=["logits", "difference"],
            dynamic_axes={"t1": axes, "t2": axes, "logits": axes, "difference": axes}, opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    return Path(path)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 weight quantisation of an ONNX graph (activations stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


class OnnxChangeModel(ChangeModel):
    """A :class:`ChangeModel` backed by an ONNX Runtime session (CPU); tiles padded to multiples of 32.

    The session is opened at the first call with as many intra-op threads as torch has then
    (``--threads``, or one in a Dask worker), and reopened when that number changes."""

    def __init__(self, onnx_path: str | Path, in_channels: tuple[int, int]) -> None:
        super().__init__()
        self.onnx_path = Path(onnx_path)
        self.in_channels = in_channels
        self._session = None
        self._threads = 0

    def session(self):  # noqa: ANN201 - onnxruntime.InferenceSession
        """The ONNX Runtime session, sized to torch's current thread count."""
        import onnxruntime as ort

        threads = torch.get_num_threads()
        if self._session is None or self._threads != threads:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            self._session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
            self._threads = threads
        return self._session

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        h, w = t1.shape[-2:]
        pad = (0, -w % PAD_MULTIPLE, 0, -h % PAD_MULTIPLE)
        a, b = (F.pad(x, pad, mode="replicate") if any(pad) else x for x in (t1, t2))
        logits, difference = self.session().run(None, {"t1": a.cpu().numpy(), "t2": b.cpu().numpy()})
        crop = (..., slice(0, h), slice(0, w))
        return ChangeOutput(torch.from_numpy(logits[crop]), torch.from_numpy(difference[crop]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None, "_threads": 0}


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


def export_key(model: ChangeModel, size: int) -> str:
    """Hex key of what an export depends on: weights and buffers, class, traced side, opset, versions."""
    digest = hashlib.blake2b(digest_size=12)
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{type(model).__name__}|{size}|{OPSET}|{torch.__version__}|{__version__}".encode())
    return digest.hexdigest()


def _publish(path: Path, write) -> Path:  # noqa: ANN001 - write(tmp_path) -> Path
    """``write`` to a name unique to this writer, then rename it to ``path`` (atomic; the last writer wins
    with identical content)."""
    if path.exists():
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.onnx")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def exportable(model: ChangeModel, device: torch.device | str = "cpu") -> bool:
    """True when ``runtime="auto"`` runs ``model`` through ONNX Runtime: a CPU run of a model without a scene fit."""
    return torch.device(device).type == "cpu" and not model.needs_scene_fit


def to_runtime(model: ChangeModel, runtime: str, cache: str | Path | None = None, size: int = EXAMPLE_SIDE,
               device: torch.device | str = "cpu") -> ChangeModel:  # fmt: skip
    """``model`` itself for ``torch`` (and for ``auto`` where :func:`exportable` is false, or where the
    export fails); otherwise an :class:`OnnxChangeModel` of its (quantised) export, cached in ``cache``
    (default :func:`cache_dir`), traced at ``size``² (padded to a multiple of 32)."""
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" or (runtime == "auto" and not exportable(model, device)):
        return model
    if importlib.util.find_spec("onnxruntime") is None:
        if runtime == "auto":
            return model
        raise ModelError(f"--runtime {runtime} needs onnxruntime: pip install onnxruntime")
    if model.needs_scene_fit:
        raise ModelError(f"runtime {runtime} is for trained neural models, not scene-fitted ones like cva")
    size = max(PAD_MULTIPLE, -(-int(size) // PAD_MULTIPLE) * PAD_MULTIPLE)
    folder = Path(cache or cache_dir()) / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / f"{export_key(model, size)}.onnx"
    try:
        with _EXPORT_LOCK:
            _publish(fp32, lambda tmp: export_onnx(model.eval(), tmp, size))
    except Exception as exc:  # noqa: BLE001 - any exporter failure: auto keeps torch, an explicit choice says why
        if runtime == "auto":
            return model
        raise ModelError(f"--runtime {runtime}: {type(model).__name__} does not export to ONNX: {str(exc).splitlines()[0]}") from None
    path = fp32
    if runtime == "onnx-int8":
        with _EXPORT_LOCK:
            path = _publish(fp32.with_name(f"{fp32.stem}-int8.onnx"), lambda tmp: quantize_int8(fp32, tmp))
    return OnnxChangeModel(path, tuple(model.in_channels))
