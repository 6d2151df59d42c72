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


def test_default_runtime_is_onnx_on_the_cpu_and_torch_for_scene_fitted_models(tmp_path):
    pair = write_synthetic_pair(tmp_path / "pair", 96, 96, bands=3, n_changes=3)
    neural = detect_changes(pair.t1, pair.t2, tmp_path / "fc", DetectParams(model="fc-siam-diff", tile=64, overlap=16))
    assert neural.summary["parameters"]["runtime"] == "auto" and neural.summary["model"]["runtime"] == "onnx"
    classical = detect_changes(pair.t1, pair.t2, tmp_path / "cva", DetectParams(model="cva", tile=64, overlap=16))
    assert classical.summary["model"]["runtime"] == "torch"
    with pytest.raises(ModelError, match="scene-fitted"):
        detect_changes(pair.t1, pair.t2, tmp_path / "refused", DetectParams(model="cva", runtime="onnx"))


def test_bundled_model_default_runtime_agrees_with_torch_on_the_sample(sample_city, tmp_path):
    """The default runtime (ONNX Runtime) against eager torch on the bundled sample: the mask on
    at least 99.99 % of pixels, the probability to 1e-4, and the same F1 against the label."""
    from changedet.evaluate import evaluate_mask
    from changedet.pipeline.detect import MASK

    runs = {runtime: detect_changes(sample_city / "imgs_1", sample_city / "imgs_2", tmp_path / runtime,
                                    DetectParams(model="oscd-s2", runtime=runtime)) for runtime in ("auto", "torch")}  # fmt: skip
    assert runs["auto"].summary["model"]["runtime"] == "onnx"
    with rasterio.open(runs["auto"].path(MASK)) as a, rasterio.open(runs["torch"].path(MASK)) as b:
        assert (a.read(1) == b.read(1)).mean() >= 0.9999
        assert a.crs == b.crs and a.transform == b.transform and a.nodata == b.nodata
    with rasterio.open(runs["auto"].path(PROBABILITY)) as a, rasterio.open(runs["torch"].path(PROBABILITY)) as b:
        np.testing.assert_allclose(a.read(1), b.read(1), atol=1e-4)
    label = sample_city / "cm" / "bercy-cm.tif"
    f1 = {r: evaluate_mask(runs[r].path(MASK), label)["f1"] for r in runs}
    assert abs(f1["auto"] - f1["torch"]) < 1e-3


def test_export_cache_is_keyed_by_weights_and_safe_under_concurrent_exports(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from changedet.runtime.onnx import OnnxChangeModel

    torch.manual_seed(0)
    model = create_model("fc-siam-diff", in_channels=3, base_channels=4).eval()
    with ThreadPoolExecutor(4) as pool:
        exported = list(pool.map(lambda _: to_runtime(model, "onnx", tmp_path, size=64), range(4)))
    assert isinstance(exported[0], OnnxChangeModel) and len({m.onnx_path for m in exported}) == 1
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [exported[0].onnx_path.name]  # no partial files left
    t1, t2 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(exported[0](t1, t2).logits, model(t1, t2).logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert to_runtime(model, "onnx", tmp_path, size=64).onnx_path != exported[0].onnx_path
    assert to_runtime(model, "onnx", tmp_path, size=128).onnx_path != exported[0].onnx_path
