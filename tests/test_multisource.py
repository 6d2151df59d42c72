"""Multi-source training with per-scene statistics (the RGB model's recipe): sources with different
radiometry and band names train one model; inference recomputes the exact training statistics and
refuses scenes with the wrong band count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from changedet.checkpoint import read_metadata
from changedet.cli import main
from changedet.data import PatchDataset, discover_scenes, open_scenes
from changedet.data.stats import PER_SCENE, date_statistics, per_scene_normalization
from changedet.pipeline.detect import DetectParams, plan_run
from changedet.errors import InputError
from changedet.testing.synthetic import write_synthetic_pair
from changedet.train import ConfigError, load_train_config, train_from_config

TINY = {"base_channels": 4, "dropout": 0.0}


def _pair_scene(root: Path, name: str, bands: int, gain: float = 1.0, offset: float = 0.0, seed: int = 0) -> Path:
    """``root/name/{t1,t2,gt}.tif`` (the ``pairs`` layout), pixel values ``gain * synthetic + offset``."""
    folder = root / name
    pair = write_synthetic_pair(folder / "raw", 96, 96, bands=bands, n_changes=6, seed=seed)
    for src, dst in ((pair.t1, "t1.tif"), (pair.t2, "t2.tif")):
        with rasterio.open(src) as ds:
            profile = {**ds.profile, "dtype": "float32", "nodata": None}
            data = ds.read().astype(np.float32) * gain + offset
        with rasterio.open(folder / dst, "w", **profile) as out:
            out.write(data)
    pair.label.rename(folder / "gt.tif")
    for f in (folder / "raw").iterdir():
        f.unlink()
    (folder / "raw").rmdir()
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An 8-bit-like 3-band source and a reflectance-like 4-band source (another scale, offset, band order)."""
    root = tmp_path_factory.mktemp("sources")
    for i in range(2):
        _pair_scene(root / "rgb", f"rgb{i}", 3, gain=0.01, seed=i)
        _pair_scene(root / "refl", f"refl{i}", 4, gain=3.0, offset=500.0, seed=10 + i)
    return root / "rgb", root / "refl"


def test_per_scene_statistics_remove_radiometric_differences(tmp_path: Path) -> None:
    a = _pair_scene(tmp_path, "a", 3, seed=3)
    b = _pair_scene(tmp_path, "b", 3, gain=7.0, offset=300.0, seed=3)  # same scene, another sensor scale
    scenes = open_scenes(discover_scenes(tmp_path, "pairs"))
    assert [s.name for s in scenes] == ["a", "b"] and a.is_dir() and b.is_dir()
    stats = per_scene_normalization(scenes)
    assert stats["mode"] == PER_SCENE
    assert stats["scenes"]["b"]["t1"]["mean"][0] == pytest.approx(7 * stats["scenes"]["a"]["t1"]["mean"][0] + 300, rel=1e-6)
    dataset = PatchDataset(scenes, 32, stats, None, length=4, change_fraction=0.0, seed=0)
    for row, col in ((0, 0), (40, 17)):
        pa, pb = dataset[(0, row, col, 1)], dataset[(1, row, col, 1)]
        np.testing.assert_allclose(pa["t1"].numpy(), pb["t1"].numpy(), atol=1e-4)
        np.testing.assert_allclose(pa["t2"].numpy(), pb["t2"].numpy(), atol=1e-4)


def test_patches_of_sources_with_other_band_counts_are_refused(sources: tuple[Path, Path]) -> None:
    scenes = open_scenes(discover_scenes(sources[0], "pairs")[:1] + discover_scenes(sources[1], "pairs")[:1])
    with pytest.raises(InputError, match="band counts"):
        per_scene_normalization(scenes)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"root": "x", "sources": [{"root": "y"}]}, "either"),
        ({"sources": [{"root": "y"}], "val": ["a"]}, "either"),
        ({}, "required"),
    ],
)
def test_data_sources_are_validated(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(data={"data": data, "model": {"name": "fc-siam-diff"}})


@pytest.fixture(scope="module")
def trained(sources: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rgbrun")
    cfg = {
        "data": {
            "sources": [
                {"layout": "pairs", "root": str(sources[0]), "val": ["rgb1"]},
                {"layout": "pairs", "root": str(sources[1]), "bands": ["B3", "B2", "B1"], "val": ["refl1"]},
            ],
            "normalization": "per-scene", "channel_names": ["red", "green", "blue"],
            "patch_size": 32, "samples_per_epoch": 16,
        },
        "model": {"name": "fc-siam-diff", "config": TINY},
        "validation": {"tile": 64, "overlap": 16},
        "epochs": 1, "batch_size": 8, "output_dir": str(out), "progress": False,
    }  # fmt: skip
    return train_from_config(load_train_config(data=cfg)).best_checkpoint


def test_multi_source_checkpoint_describes_its_inputs(trained: Path) -> None:
    meta = read_metadata(trained)
    assert meta["normalization"] == PER_SCENE and meta["bands"] is None
    assert meta["input_channels"] == [3, 3] and meta["channel_names"] == ["red", "green", "blue"]
    assert meta["split"]["train"] == ["rgb0", "refl0"] and meta["split"]["val"] == ["rgb1", "refl1"]
    assert set(meta["metrics"]["per_scene"]) == {"rgb1", "refl1"}
    assert [s["bands"] for s in meta["data"]["sources"]] == [None, ["B3", "B2", "B1"]]


def test_inference_uses_the_exact_training_statistics(trained: Path, sources: tuple[Path, Path]) -> None:
    folder = sources[0] / "rgb1"
    plan = plan_run(folder / "t1.tif", folder / "t2.tif", DetectParams(model=str(trained)))
    (scene,) = open_scenes(discover_scenes(sources[0], "pairs")[1:])
    expected = date_statistics(scene.read, *scene.shape)
    for date, key in enumerate(("t1", "t2")):
        mean, std = plan.scene_fit.normalization[date]
        np.testing.assert_array_equal(mean, np.asarray(expected[key]["mean"], np.float32))
        np.testing.assert_array_equal(std, np.asarray(expected[key]["std"], np.float32))


def test_wrong_band_count_is_refused_and_bands_select_the_channels(
    trained: Path, sources: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = sources[1] / "refl1"
    args = ["detect", "--t1", str(folder / "t1.tif"), "--t2", str(folder / "t2.tif"), "--model", str(trained), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "takes 3 bands (red, green, blue" in err and "has 4" in err and "--bands" in err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "ok"), "--bands", "B3,B2,B1"]) == 0
    assert (tmp_path / "ok" / "change_mask.tif").is_file()
