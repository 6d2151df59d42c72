"""ONNX Runtime float32 inference matches the torch model through the pipeline (int8: tests/test_quantize.py)."""

import numpy as np
import pytest
import rasterio
import torch

pytest.importorskip("onnxruntime")

from changedet.checkpoint import load_state_dict, save_checkpoint  # noqa: E402
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


def test_a_cached_export_runs_without_torch_and_writes_the_same_bytes(sample_city, tmp_path):
    """The first CPU detect of a checkpoint builds it in torch and exports it; the next loads the
    cached export and never imports torch, timm or smp, and writes the same bytes."""
    import json
    import os
    import subprocess
    import sys

    from changedet.pipeline.detect import DIFFERENCE, MASK, RUN_JSON

    script = ("import json, sys; from changedet.cli import main; rc = main(sys.argv[1:]); print(json.dumps({'rc': rc, "
              "'loaded': sorted(m for m in ('torch', 'timm', 'segmentation_models_pytorch') if m in sys.modules)}))")  # fmt: skip
    env = {**os.environ, "CHANGEDET_CACHE_DIR": str(tmp_path / "cache")}
    runs = {}
    for name in ("cold", "warm"):
        args = ["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(tmp_path / name), "--quiet"]
        done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["cold"]["rc"] == 0 and "torch" in runs["cold"]["loaded"]
    assert runs["warm"] == {"rc": 0, "loaded": []}
    for name in (MASK, PROBABILITY, DIFFERENCE):
        assert (tmp_path / "cold" / name).read_bytes() == (tmp_path / "warm" / name).read_bytes(), name
    for name in runs:
        assert json.loads((tmp_path / name / RUN_JSON).read_text())["model"]["runtime"] == "onnx"


def test_the_export_of_a_checkpoint_is_found_by_its_bytes(tmp_path, monkeypatch):
    """A checkpoint's export is found again by the checkpoint's bytes and bands (no torch build); other
    weights, another tile side or unreadable cache files give a new export, never an error; bands the
    checkpoint does not take are refused as before."""
    from changedet.pipeline.predictor import TilePredictor, resolve_model
    from changedet.runtime.ort import OnnxArrays

    monkeypatch.setenv("CHANGEDET_CACHE_DIR", str(tmp_path / "cache"))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"model{seed}.safetensors")
        save_checkpoint(paths[-1], create_model("fc-siam-diff", in_channels=3, base_channels=4), {"model": "fc-siam-diff", "config": {"base_channels": 4}})
    first = TilePredictor(resolve_model(str(paths[0])), (3, 3), runtime="auto", tile=64)
    assert isinstance(first.model, OnnxArrays) and first.runtime == "onnx"

    def no_build(*_args, **_kwargs):
        raise AssertionError("the cached export should have been used")

    with monkeypatch.context() as m:
        m.setattr(TilePredictor, "_build", no_build)
        again = TilePredictor(resolve_model(str(paths[0])), (3, 3), runtime="auto", tile=64)
    assert again.model == first.model and again.min_input_size == first.min_input_size
    other = TilePredictor(resolve_model(str(paths[1])), (3, 3), runtime="auto", tile=64)
    larger = TilePredictor(resolve_model(str(paths[0])), (3, 3), runtime="auto", tile=128)
    assert len({first.model.onnx_path, other.model.onnx_path, larger.model.onnx_path}) == 3
    for facts in (tmp_path / "cache").rglob("*.json"):
        facts.write_text("{not json")
    rebuilt = TilePredictor(resolve_model(str(paths[0])), (3, 3), runtime="auto", tile=64)
    assert rebuilt.model == first.model
    with pytest.raises(ModelError, match="does not fit"):
        TilePredictor(resolve_model(str(paths[0])), (4, 4), runtime="auto", tile=64)
    z = np.random.default_rng(0).normal(size=(2, 3, 50, 70)).astype(np.float32)
    prob, _ = first.model.probabilities(z, z[::-1].copy())
    eager = create_model("fc-siam-diff", in_channels=3, base_channels=4)
    eager.load_state_dict(load_state_dict(paths[0]))
    reference = eager.predict(torch.from_numpy(z), torch.from_numpy(z[::-1].copy())).probability[:, 0].numpy()
    np.testing.assert_allclose(prob, reference, atol=1e-5)


def test_thread_count_without_torch():
    """Dask workers' OMP_NUM_THREADS=1 and --threads size ONNX Runtime without torch being imported."""
    import subprocess
    import sys

    script = ("import os, sys; os.environ['OMP_NUM_THREADS'] = '1'; from changedet.runtime.threads import num_threads, set_threads; "
              "assert num_threads() == 1; set_threads(3); assert num_threads() == 3; assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_the_detect_path_leaves_end_of_run_libraries_to_the_background():
    """Importing the CLI and the detect path loads none of the libraries a run needs only after planning
    (scipy.special) or at its end (geopandas, scipy.ndimage, matplotlib): detect imports them in a
    background thread while it plans and predicts, and they are all importable there."""
    import subprocess
    import sys

    script = ("import sys, changedet.cli, changedet.pipeline.detect as d; heavy = ('geopandas', 'matplotlib', 'scipy.ndimage', "
              "'scipy.special', 'pyproj'); assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]; "
              "assert set(heavy) - {'matplotlib'} <= set(d.DEFERRED_MODULES); d.import_in_background(d.DEFERRED_MODULES).join(); "
              "assert all(m in sys.modules for m in d.DEFERRED_MODULES + ('matplotlib',))")  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
