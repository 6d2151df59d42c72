"""The export of a change model to ONNX, and the torch :class:`ChangeModel` that runs an export.

``runtime="auto"`` (the default) runs ONNX Runtime on the CPU for every model that exports, and eager
torch on a GPU or for scene-fitted models (CVA, hetero). ``onnx`` is the exported float32 graph
(``onnx-int8``, its static int8 quantisation calibrated on training tiles, is made once per checkpoint
by :mod:`changedet.pipeline.quantization` and run from :mod:`changedet.runtime.quantize`). Exports are cached (:mod:`changedet.runtime.ort`, which also runs them without torch) under a key of
the checkpoint (or, for models built without one, of the weights), the traced tile side, the opset
and the versions.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from changedet import __version__
from changedet.errors import ModelError
from changedet.models.base import ChangeModel
from changedet.models.output import ChangeOutput
from changedet.runtime.ort import EXAMPLE_SIDE, OPSET, RUNTIMES, OnnxArrays, graph_path, publish, traced_side
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


class OnnxChangeModel(ChangeModel):
    """A :class:`ChangeModel` backed by an :class:`~changedet.runtime.ort.OnnxArrays` session (CPU), for
    code that composes torch models (test-time augmentation, ensembles, evaluation stages)."""

    def __init__(self, arrays: OnnxArrays) -> None:
        super().__init__()
        self.arrays = arrays
        self.in_channels = arrays.in_channels

    @property
    def onnx_path(self) -> Path:
        """The graph this model runs."""
        return self.arrays.onnx_path

    @property
    def min_input_size(self) -> int:
        return self.arrays.min_input_size

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        logits, difference = self.arrays.run(t1.detach().cpu().numpy(), t2.detach().cpu().numpy())
        return ChangeOutput(torch.from_numpy(np.ascontiguousarray(logits)), torch.from_numpy(np.ascontiguousarray(difference)))


def export_key(model: ChangeModel, size: int) -> str:
    """Hex key of what the export of a model built without a checkpoint depends on: weights and
    buffers, class, traced side, opset, versions (checkpoints: :func:`~changedet.runtime.ort.export_key_of_checkpoint`)."""
    digest = hashlib.blake2b(digest_size=12)
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{type(model).__name__}|{size}|{OPSET}|{torch.__version__}|{__version__}".encode())
    return digest.hexdigest()


def exportable(model: ChangeModel, device: str = "cpu") -> bool:
    """True when ``runtime="auto"`` runs ``model`` through ONNX Runtime: a CPU run of a model without a scene fit."""
    return str(device).partition(":")[0] == "cpu" and not model.needs_scene_fit


def to_runtime(model: ChangeModel, runtime: str, cache: str | Path | None = None, size: int = EXAMPLE_SIDE,
               device: str = "cpu", key: str | None = None) -> ChangeModel:  # fmt: skip
    """``model`` itself for ``torch`` (and for ``auto`` where :func:`exportable` is false, or where the
    export fails); otherwise an :class:`OnnxChangeModel` of its float32 export, cached in ``cache``
    (default :func:`~changedet.runtime.ort.cache_dir`) under ``key`` (default :func:`export_key`),
    traced at ``size``² (rounded up to a multiple of 32)."""
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" or (runtime == "auto" and not exportable(model, device)):
        return model
    if runtime == "onnx-int8":  # TilePredictor runs a checkpoint's calibrated graph; a bare model has none
        raise ModelError("--runtime onnx-int8 runs the int8 graph calibrated for a checkpoint (changedet quantize); "
                         f"{type(model).__name__} without a checkpoint has none")
    if model.needs_scene_fit:
        raise ModelError(f"runtime {runtime} is for trained neural models, not scene-fitted ones like cva")
    size = traced_side(size)
    fp32 = graph_path(key or export_key(model, size), cache)
    try:
        with _EXPORT_LOCK:
            publish(fp32, lambda tmp: export_onnx(model.eval(), tmp, size))
    except Exception as exc:  # noqa: BLE001 - any exporter failure: auto keeps torch, an explicit choice says why
        if runtime == "auto":
            return model
        raise ModelError(f"--runtime {runtime}: {type(model).__name__} does not export to ONNX: {str(exc).splitlines()[0]}") from None
    return OnnxChangeModel(OnnxArrays(fp32, tuple(model.in_channels), model.min_input_size))
