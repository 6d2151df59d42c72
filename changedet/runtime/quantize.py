"""Static int8 quantisation of an exported change model, calibrated on training tiles (no torch).

``--runtime onnx-int8`` runs the graph that ``changedet quantize`` writes beside a checkpoint
(``model.safetensors`` → ``model.int8.onnx``): ONNX Runtime's static quantisation in operator form
(QLinearConv), weights int8 per output channel, activations uint8 with ranges set at the 0.01 % tails
(percentile 99.99) of their values on normalised tiles of the scenes given for calibration, the
checkpoint's training scenes: min/max ranges let a few extreme activations widen every step (over the
15 leave-cities-out fold models, masks agreed with float32 on 98.93 % of held-out pixels, worst city
96.95 %; with percentiles 99.81 %, worst 99.42 %, ``benchmarks/edge.py cv``). Integer
convolutions run on AVX-512 VNNI / AVX-VNNI (x86) and dot-product (Arm) instructions; on this
project's measuring machine (AVX-512 VNNI, 2 threads) the bundled model's int8 graph takes 0.88× the
float32 graph's time on 256² tiles (``benchmarks/edge.py table``).

The graph records the bytes digest of the checkpoint it was calibrated for, the bands per date, the
model's smallest input side and the calibration (scenes, tiles): a detect refuses a graph of other
weights instead of running it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from changedet.errors import ModelError
from changedet.runtime.ort import model_feed, publish

INT8_SUFFIX = ".int8.onnx"
_META = "changedet_int8"  # the ONNX metadata_props key of the JSON record
CALIB_PERCENTILE = 99.99  # activation ranges cover all but the 0.01 % most extreme values


def int8_graph_path(checkpoint: str | Path) -> Path:
    """Where the calibrated int8 graph of ``checkpoint`` lives: beside it, ``<stem>.int8.onnx``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + INT8_SUFFIX)


@dataclass(frozen=True)
class Int8Graph:
    """A calibrated int8 graph and what it records about itself."""

    path: Path
    checkpoint_digest: str
    in_channels: tuple[int, int]
    min_input_size: int
    calibration: dict[str, Any]


def read_int8_graph(path: str | Path) -> Int8Graph:
    """The record of the int8 graph at ``path``; :class:`ModelError` when it is not one ``changedet quantize`` wrote."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
        record = json.loads(next(p.value for p in model.metadata_props if p.key == _META))
        return Int8Graph(Path(path), str(record["checkpoint_digest"]), tuple(record["in_channels"]),
                         int(record["min_input_size"]), dict(record["calibration"]))  # fmt: skip
    except (OSError, StopIteration, ValueError, KeyError, TypeError, DecodeError) as exc:
        raise ModelError(f"{path} is not an int8 graph written by changedet quantize ({type(exc).__name__})") from None


def calibrated_int8(checkpoint: str | Path, digest: str, in_channels: tuple[int, int], model: str) -> Int8Graph:
    """The int8 graph beside ``checkpoint`` (bytes ``digest``) for bands ``in_channels``, or
    :class:`ModelError` saying how to make one (``model``: what to pass as ``--model`` in that command)."""
    path = int8_graph_path(checkpoint)
    make = f"make one with: changedet quantize --model {model} --calibrate T1 T2 (training scenes of the model)"
    if not path.is_file():
        raise ModelError(f"--runtime onnx-int8: no int8 graph calibrated for {checkpoint} (looked for {path}); {make}")
    graph = read_int8_graph(path)
    if graph.checkpoint_digest != digest:
        raise ModelError(f"--runtime onnx-int8: {path} was calibrated for other weights than {checkpoint}; {make}")
    if tuple(graph.in_channels) != tuple(in_channels):
        raise ModelError(f"--runtime onnx-int8: {path} takes {graph.in_channels[0]}+{graph.in_channels[1]} bands, "
                         f"the scene gives {in_channels[0]}+{in_channels[1]}")  # fmt: skip
    return graph


class _Feeds:
    """ONNX Runtime's calibration reader over ``(z1, z2)`` normalised tile batches."""

    def __init__(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = (model_feed(z1, z2) for z1, z2 in batches)
        self.tiles = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self.tiles += feed["t1"].shape[0]
        return feed


def quantize_static_int8(
    fp32: str | Path, dst: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, checkpoint_digest: str,
    in_channels: tuple[int, int], min_input_size: int, calibration: dict[str, Any],
) -> Int8Graph:  # fmt: skip
    """Write the static int8 quantisation of the float32 graph ``fp32`` to ``dst`` (atomically),
    calibrated on ``batches`` of normalised model inputs; the record (checkpoint digest, bands,
    smallest input side, ``calibration`` plus the tile count) is kept in the graph's metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    reader = _Feeds(batches)
    with tempfile.TemporaryDirectory(prefix="changedet-int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # the quantiser warns on the root logger for every int64 shape tensor it skips
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints every tensor's range
                quantize_static(
                    str(prepared), str(quantized), reader, quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": CALIB_PERCENTILE},
                )  # fmt: skip
        except ValueError:
            if reader.tiles == 0:
                raise ModelError("no calibration tile: give at least one --calibrate pair") from None
            raise
        finally:
            root.setLevel(level)
        record = {"checkpoint_digest": checkpoint_digest, "in_channels": list(in_channels), "min_input_size": min_input_size,
                  "calibration": {**calibration, "tiles": reader.tiles}}  # fmt: skip
        model = onnx.load(str(quantized))
        entry = model.metadata_props.add()
        entry.key, entry.value = _META, json.dumps(record, sort_keys=True)
        publish(dst, lambda part: onnx.save(model, str(part)), replace=True)
    return read_int8_graph(dst)
