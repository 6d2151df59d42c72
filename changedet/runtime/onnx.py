"""CPU/edge inference: export a change model to ONNX, optionally int8-quantise it, run it with ONNX Runtime.

``runtime="onnx"`` runs the exported float32 graph, ``runtime="onnx-int8"`` the same graph with
dynamically quantised int8 weights (ConvInteger/MatMulInteger). Needs the ``edge`` extra
(``pip install changedet[edge]``: onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from changedet.errors import ModelError
from changedet.models.base import ChangeModel
from changedet.models.output import ChangeOutput

RUNTIMES = ("torch", "onnx", "onnx-int8")
PAD_MULTIPLE = 32  # every registered encoder's output stride divides 32


EXAMPLE_SIDE = 256  # side of the example input traced at export (height and width stay dynamic)


class _Outputs(nn.Module):
    """Plain-tensor outputs for tracing."""

    def __init__(self, model: ChangeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(t1, t2)
        return out.logits, out.difference


def export_onnx(model: ChangeModel, path: str | Path, size: int = EXAMPLE_SIDE) -> Path:
    """Export ``model`` (eval mode) to ONNX with dynamic batch/height/width (multiples of 32)."""
    c1, c2 = model.in_channels
    wrapper = _Outputs(model).eval()
    example = (torch.zeros(1, c1, size, size), torch.zeros(1, c2, size, size))
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, example, str(path), input_names=["t1", "t2"], output_names=["logits", "difference"],
            dynamic_axes={"t1": axes, "t2": axes, "logits": axes, "difference": axes}, opset_version=17, dynamo=False,
        )  # fmt: skip
    return Path(path)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 weight quantisation of an ONNX graph (activations stay float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


class OnnxChangeModel(ChangeModel):
    """A :class:`ChangeModel` backed by an ONNX Runtime session (CPU); tiles padded to multiples of 32."""

    def __init__(self, onnx_path: str | Path, in_channels: tuple[int, int]) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("--runtime onnx needs onnxruntime: pip install 'changedet[edge]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.in_channels = in_channels

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        h, w = t1.shape[-2:]
        pad = (0, -w % PAD_MULTIPLE, 0, -h % PAD_MULTIPLE)
        a, b = (F.pad(x, pad, mode="replicate") if any(pad) else x for x in (t1, t2))
        logits, difference = self.session.run(None, {"t1": a.cpu().numpy(), "t2": b.cpu().numpy()})
        crop = (..., slice(0, h), slice(0, w))
        return ChangeOutput(torch.from_numpy(logits[crop]), torch.from_numpy(difference[crop]))


def to_runtime(model: ChangeModel, runtime: str, cache_dir: str | Path | None = None) -> ChangeModel:
    """``model`` itself for ``torch``; otherwise an :class:`OnnxChangeModel` of its (quantised) export.

    Exports are cached by a hash of the weights in ``cache_dir`` (default: the system temp folder).
    """
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return model
    if model.needs_scene_fit:
        raise ModelError(f"runtime {runtime} is for trained neural models, not scene-fitted ones like cva")
    digest = hashlib.blake2b(digest_size=12)
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    digest.update(type(model).__name__.encode())
    folder = Path(cache_dir or tempfile.gettempdir()) / "changedet-onnx"
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / f"{digest.hexdigest()}.onnx"
    if not fp32.exists():
        export_onnx(model.eval(), fp32.with_suffix(".tmp")).replace(fp32)
    path = fp32
    if runtime == "onnx-int8":
        path = fp32.with_name(f"{fp32.stem}-int8.onnx")
        if not path.exists():
            quantize_int8(fp32, path.with_suffix(".tmp.onnx")).replace(path)
    return OnnxChangeModel(path, tuple(model.in_channels))
