"""ONNX Runtime inference (float32 and int8 weights) matches the torch model through the pipeline."""

import numpy as np
import pytest
import rasterio
import torch

pytest.importorskip("onnxruntime")

from changedet.checkpoint import save_checkpoint  # noqa: E402
from changedet.pipeline.detect import PROBABILITY, DetectParams, detect_changes  # noqa: E402
from changedet.runtime.onnx import to_runtime  # noqa: E402
from changedet.errors import ModelError  # noqa: E402
from changedet.models import create_model  # noqa: E402
from changedet.testing.synthetic import write_synthetic_pair  # noqa: E402


def test_onnx_export_matches_torch_on_odd_tile_sizes(tmp_path):
    torch.manual_seed(0)
    model = create_model("fc-siam-diff", in_channels=4, base_channels=8).eval()
    t1, t2 = torch.randn(2, 4, 72, 100), torch.randn(2, 4, 72, 100)
    reference = model.predict(t1, t2)
    onnx = to_runtime(model, "onnx", tmp_path).predict(t1, t2)
    assert onnx.logits.shape == reference.logits.shape
    assert torch.allclose(onnx.logits, reference.logits, atol=1e-3)
    int8 = to_runtime(model, "onnx-int8", tmp_path).predict(t1, t2)
    assert (int8.probability - reference.probability).abs().max() < 0.05


def test_detect_with_onnx_runtime(tmp_path):
    pair = write_synthetic_pair(tmp_path / "pair", 96, 96, bands=3, n_changes=3)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.safetensors"
    model = create_model("fc-siam-diff", in_channels=3, base_channels=8)
    save_checkpoint(checkpoint, model, {"model": "fc-siam-diff", "config": {"base_channels": 8}})
    outputs = {}
    for runtime in ("torch", "onnx"):
        params = DetectParams(model=str(checkpoint), tile=64, overlap=16, runtime=runtime)
        result = detect_changes(pair.t1, pair.t2, tmp_path / runtime, params)
        with rasterio.open(result.path(PROBABILITY)) as ds:
            outputs[runtime] = ds.read(1)
    np.testing.assert_allclose(outputs["onnx"], outputs["torch"], atol=1e-4)


def test_cva_has_no_onnx_runtime():
    with pytest.raises(ModelError, match="trained neural"):
        to_runtime(create_model("cva", in_channels=3), "onnx")
