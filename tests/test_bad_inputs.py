"""Bad inputs: each gives exit status 2, a one-line reason, and leaves no output (earlier ones untouched)."""

import pickle
import shutil

import numpy as np
import pytest
from affine import Affine

from changedet.cli import main
from tests.conftest import write_raster


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture
def good_pair(tmp_path):
    data = np.random.default_rng(0).integers(100, 4000, (3, 64, 64)).astype(np.uint16)
    return write_raster(tmp_path / "t1.tif", data), write_raster(tmp_path / "t2.tif", data[::-1].copy())


def _case(name, tmp_path, good_pair, sample_city):
    t1, t2 = good_pair
    args = ["--t1", str(t1), "--t2", str(t2)]
    if name == "missing file":
        args = ["--t1", str(tmp_path / "nope.tif"), "--t2", str(t2)]
    elif name == "corrupt tif":
        bad = tmp_path / "corrupt.tif"
        bad.write_bytes(b"II*\x00" + b"\x13" * 200)
        args = ["--t1", str(bad), "--t2", str(t2)]
    elif name == "truncated tif":
        bad = tmp_path / "truncated.tif"
        bad.write_bytes(t1.read_bytes()[:300])
        args = ["--t1", str(bad), "--t2", str(t2)]
    elif name == "empty folder":
        (tmp_path / "empty").mkdir()
        args = ["--t1", str(tmp_path / "empty"), "--t2", str(t2)]
    elif name == "band count mismatch":
        four = write_raster(tmp_path / "four.tif", np.ones((4, 64, 64), np.uint16))
        args = ["--t1", str(t1), "--t2", str(four)]
    elif name == "band names mismatch":
        folder = tmp_path / "renamed"
        shutil.copytree(sample_city / "imgs_2", folder)
        next(folder.glob("*_B12.tif")).rename(folder / "x_B13.tif")
        args = ["--t1", str(sample_city / "imgs_1"), "--t2", str(folder)]
    elif name == "crs on one side only":
        plain = write_raster(tmp_path / "plain.tif", np.ones((3, 64, 64), np.uint16), crs=None)
        args = ["--t1", str(t1), "--t2", str(plain)]
    elif name == "no overlap":
        far = write_raster(tmp_path / "far.tif", np.ones((3, 64, 64), np.uint16),
                           transform=Affine(10.0, 0, 900000.0, 0, -10.0, 5400000.0))
        args = ["--t1", str(t1), "--t2", str(far)]
    elif name == "all nodata":
        blank = write_raster(tmp_path / "blank.tif", np.zeros((3, 64, 64), np.uint16), nodata=0)
        args = ["--t1", str(t1), "--t2", str(blank)]
    elif name == "all NaN":
        nan = write_raster(tmp_path / "nan.tif", np.full((3, 64, 64), np.nan, np.float32))
        args = ["--t1", str(t1), "--t2", str(nan)]
    elif name == "unknown band":
        args += ["--bands", "B02,B99"]
    elif name == "unknown model":
        args += ["--model", "resnet-nonexistent"]
    elif name == "malicious checkpoint":
        evil = tmp_path / "evil.pt"
        evil.write_bytes(pickle.dumps(Payload()))
        evil.with_suffix(".json").write_text('{"model": "cva", "config": {}}')
        args += ["--model", str(evil)]
    elif name == "not a safetensors checkpoint":
        fake = tmp_path / "fake.safetensors"
        fake.write_bytes(b"\x00" * 64)
        args += ["--model", str(fake)]
    elif name == "overlap >= tile":
        args += ["--tile", "64", "--overlap", "64"]
    elif name == "threshold out of range":
        args += ["--threshold", "1.5"]
    elif name == "invalid crs":
        args += ["--crs", "EPSG:999999"]
    elif name == "negative resolution":
        args += ["--resolution", "-5"]
    elif name == "cuda without gpu":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        args += ["--device", "cuda"]
    return args


CASES = [
    "missing file", "corrupt tif", "truncated tif", "empty folder", "band count mismatch", "band names mismatch",
    "crs on one side only", "no overlap", "all nodata", "all NaN", "unknown band", "unknown model",
    "malicious checkpoint", "not a safetensors checkpoint", "overlap >= tile", "threshold out of range",
    "invalid crs", "negative resolution", "cuda without gpu",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_cleanly(name, tmp_path, good_pair, sample_city, capsys):
    out = tmp_path / "out"
    args = _case(name, tmp_path, good_pair, sample_city)
    rc = main(["detect", *args, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(lines[0]) > len("error: ") + 10, captured.err
    assert "pwned" not in captured.out
    assert not out.exists() or list(out.iterdir()) == []


def test_existing_outputs_need_overwrite_and_stay_untouched(tmp_path, good_pair, capsys):
    t1, t2 = good_pair
    out = tmp_path / "out"
    assert main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a failing run with --overwrite leaves the earlier outputs as they were
    assert main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--overwrite", "--threshold", "7"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_path_is_a_file(tmp_path, good_pair, capsys):
    t1, t2 = good_pair
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(target), "--quiet"]) == 2
    assert target.read_text() == "keep me"


def test_failure_after_prediction_leaves_no_partial_outputs(tmp_path, good_pair, monkeypatch):
    import changedet.detect as detect

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(detect, "polygonize_mask", boom)
    t1, t2 = good_pair
    out = tmp_path / "out"
    with pytest.raises(OSError):
        detect.detect_changes(t1, t2, out, detect.DetectParams(tile=32, overlap=8))
    # only the hidden tile store (for resuming) remains: no output file, no staging folder
    assert [p.name for p in out.iterdir()] == [detect.TILE_STORE_DIR]
    monkeypatch.undo()
    result = detect.detect_changes(t1, t2, out, detect.DetectParams(tile=32, overlap=8))
    assert sorted(p.name for p in out.iterdir()) == sorted(detect.OUTPUT_NAMES)
    assert result.summary["timings"]["model_s"] == 0.0  # every tile came from the store
