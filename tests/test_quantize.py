"""Static int8 graphs (``changedet quantize``, ``--runtime onnx-int8``): calibrated beside the checkpoint,
close to float32 through the pipeline, refused when missing or made for other weights."""

import json

import numpy as np
import pytest
import rasterio
import torch

pytest.importorskip("onnxruntime")

from changedet.checkpoint import save_checkpoint  # noqa: E402
from changedet.cli import main  # noqa: E402
from changedet.errors import ModelError  # noqa: E402
from changedet.models import create_model  # noqa: E402
from changedet.pipeline.detect import MASK, PROBABILITY, DetectParams, detect_changes  # noqa: E402
from changedet.pipeline.quantization import quantize_checkpoint  # noqa: E402
from changedet.runtime.ort import file_digest  # noqa: E402
from changedet.runtime.quantize import int8_graph_path, read_int8_graph  # noqa: E402
from changedet.testing.synthetic import write_synthetic_pair  # noqa: E402
from changedet.weights import bundled_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small fc-siam-diff checkpoint (random weights) and two synthetic pairs: one to calibrate, one to detect."""
    root = tmp_path_factory.mktemp("int8")
    calib = write_synthetic_pair(root / "calib", 128, 128, bands=3, n_changes=4, seed=1)
    scene = write_synthetic_pair(root / "scene", 128, 128, bands=3, n_changes=4, seed=2)
    torch.manual_seed(0)
    checkpoint = root / "model.safetensors"
    save_checkpoint(checkpoint, create_model("fc-siam-diff", in_channels=3, base_channels=8), {"model": "fc-siam-diff", "config": {"base_channels": 8}})
    return checkpoint, calib, scene


def test_quantize_writes_a_graph_beside_the_checkpoint_that_detect_runs_close_to_float32(trained, tmp_path):
    checkpoint, calib, scene = trained
    graph = quantize_checkpoint(str(checkpoint), [(str(calib.t1), str(calib.t2))], tiles_per_pair=4, tile=64)
    assert graph.path == int8_graph_path(checkpoint) == checkpoint.with_name("model.int8.onnx")
    assert graph.checkpoint_digest == file_digest(checkpoint) and graph.in_channels == (3, 3)
    assert graph.calibration["tiles"] == 4 and graph.calibration["pairs"] == [[str(calib.t1), str(calib.t2)]]
    ops = {n.op_type for n in __import__("onnx").load(str(graph.path)).graph.node}
    assert "QLinearConv" in ops and "ConvInteger" not in ops  # static quantisation, not dynamic
    runs = {r: detect_changes(scene.t1, scene.t2, tmp_path / r, DetectParams(model=str(checkpoint), runtime=r, tile=64, overlap=16))
            for r in ("onnx", "onnx-int8")}  # fmt: skip
    assert runs["onnx-int8"].summary["model"]["runtime"] == "onnx-int8"
    with rasterio.open(runs["onnx"].path(PROBABILITY)) as a, rasterio.open(runs["onnx-int8"].path(PROBABILITY)) as b:
        assert a.crs == b.crs and a.transform == b.transform and a.nodata == b.nodata
        fp32, int8 = a.read(1), b.read(1)
    assert np.abs(fp32 - int8).mean() < 0.02 and not np.allclose(fp32, int8, atol=1e-6)  # close, and really another graph
    with rasterio.open(runs["onnx"].path(MASK)) as a, rasterio.open(runs["onnx-int8"].path(MASK)) as b:
        assert (a.read(1) == b.read(1)).mean() >= 0.98


def test_int8_is_refused_without_a_graph_or_with_a_graph_of_other_weights(trained, tmp_path, capsys):
    checkpoint, calib, scene = trained
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_checkpoint(other, create_model("fc-siam-diff", in_channels=3, base_channels=8), {"model": "fc-siam-diff", "config": {"base_channels": 8}})
    args = ["detect", "--t1", str(scene.t1), "--t2", str(scene.t2), "--model", str(other), "--runtime", "onnx-int8", "--tile", "64",
            "--overlap", "16", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --runtime onnx-int8: no int8 graph") and "changedet quantize" in err[0]
    if not int8_graph_path(checkpoint).exists():
        quantize_checkpoint(str(checkpoint), [(str(calib.t1), str(calib.t2))], tiles_per_pair=2, tile=64)
    int8_graph_path(other).write_bytes(int8_graph_path(checkpoint).read_bytes())  # a graph of the first model's weights
    with pytest.raises(ModelError, match="calibrated for other weights"):
        detect_changes(scene.t1, scene.t2, tmp_path / "out", DetectParams(model=str(other), runtime="onnx-int8", tile=64, overlap=16))
    assert not (tmp_path / "out").exists()
    int8_graph_path(other).write_bytes(b"not an onnx graph" * 8)
    with pytest.raises(ModelError, match="is not an int8 graph written by changedet quantize"):
        detect_changes(scene.t1, scene.t2, tmp_path / "out", DetectParams(model=str(other), runtime="onnx-int8", tile=64, overlap=16))
    with pytest.raises(ModelError, match="no checkpoint"):
        detect_changes(scene.t1, scene.t2, tmp_path / "out", DetectParams(model="fc-siam-diff", runtime="onnx-int8", tile=64, overlap=16))


def test_quantize_cli(trained, tmp_path, capsys):
    checkpoint, calib, _ = trained
    out = tmp_path / "graph.int8.onnx"
    assert main(["quantize", "--model", str(checkpoint), "--calibrate", str(calib.t1), str(calib.t2), "--tiles", "2", "--tile", "64", "--out", str(out)]) == 0
    assert "calibrated on 2 tiles of 1 pair" in capsys.readouterr().out
    assert read_int8_graph(out).checkpoint_digest == file_digest(checkpoint)
    assert main(["quantize", "--model", "cva", "--calibrate", str(calib.t1), str(calib.t2), "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "x.onnx").exists()


def test_the_bundled_int8_graph_belongs_to_the_bundled_checkpoint():
    checkpoint = bundled_checkpoint("oscd-s2")
    graph = read_int8_graph(int8_graph_path(checkpoint))
    assert graph.checkpoint_digest == file_digest(checkpoint) and graph.in_channels == (13, 13)
    assert len(graph.calibration["pairs"]) == 10, json.dumps(graph.calibration)  # its 10 training cities
