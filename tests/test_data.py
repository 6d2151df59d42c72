"""Datasets over scenes: layouts, labels on the common grid, lazy patches, balanced sampling,
paired augmentation, group splits and training statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from affine import Affine
from rasterio.windows import Window

from changedet.data import (
    IGNORE,
    BalancedPatchSampler,
    ChangeScene,
    PairedAugment,
    PatchDataset,
    PatchKey,
    SceneRecord,
    check_disjoint,
    collate_patches,
    compute_normalization,
    discover_scenes,
    leave_cities_out_folds,
    levir_scenes,
    open_scenes,
    oscd_scenes,
    pair_folder_scenes,
    split_by_groups,
)
from changedet.errors import InputError

# ------------------------------------------------------------------------------------------
# paired augmentation
# ------------------------------------------------------------------------------------------


def _patterned(h: int = 12, w: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Date 1 encodes each pixel's identity; date 2, label and mask are functions of it."""
    ident = np.arange(h * w, dtype=np.float32).reshape(h, w)
    x1 = np.stack([ident, -ident])
    x2 = np.stack([ident + 1000, ident * 2])
    label = (ident % 3 == 0).astype(np.float32)
    valid = ident % 7 != 0
    return x1, x2, label, valid


def test_paired_augment_applies_identical_geometry() -> None:
    aug = PairedAugment(hflip=True, vflip=True, rot90=True, crop=9, gain=0, offset=0, noise=0)
    seen = set()
    for seed in range(40):
        x1, x2, label, valid = _patterned()
        o1, o2, ol, ov = aug(x1, x2, label, valid, np.random.default_rng(seed))
        assert o1.shape == (2, 9, 9) and o2.shape == (2, 9, 9) and ol.shape == (9, 9) and ov.shape == (9, 9)
        ident = o1[0]
        # every output array was moved with the same pixel permutation as date 1
        np.testing.assert_array_equal(o2[0], ident + 1000)
        np.testing.assert_array_equal(o2[1], ident * 2)
        np.testing.assert_array_equal(o1[1], -ident)
        np.testing.assert_array_equal(ol, (ident % 3 == 0).astype(np.float32))
        np.testing.assert_array_equal(ov, ident % 7 != 0)
        # the output is a real crop of the input (contiguous 9x9 block up to a dihedral transform)
        rows, cols = np.divmod(ident.astype(int), 12)
        assert rows.max() - rows.min() == 8 and cols.max() - cols.min() == 8
        seen.add((ident[0, 0], ident[0, 1]))
    assert len(seen) > 8  # crops, rotations and flips do vary


def test_paired_augment_photometry_is_independent_per_date_and_keeps_geometry() -> None:
    aug = PairedAugment(crop=None, gain=0.2, offset=0.3, noise=0.0)
    x1, _, label, _ = _patterned()
    valid = np.ones_like(label, bool)
    o1, o2, ol, _ = aug(x1, x1.copy(), label, valid, np.random.default_rng(3))
    assert not np.allclose(o1, o2)  # the same input, different jitter per date
    # a positive gain and an offset keep the pixel order: both dates share the geometry
    np.testing.assert_array_equal(np.argsort(o1[0], axis=None), np.argsort(o2[0], axis=None))
    order = np.argsort(o1[0], axis=None)
    np.testing.assert_array_equal(ol.ravel()[order], label.ravel()[np.argsort(x1[0], axis=None)])
    noisy = PairedAugment(rot90=False, hflip=False, vflip=False, gain=0, offset=0, noise=0.5)
    n1, _, _, _ = noisy(x1, x1, label, valid & (label == 0), np.random.default_rng(0))
    assert np.array_equal(n1[:, label == 1], x1[:, label == 1])  # invalid pixels untouched
    assert not np.array_equal(n1[:, label == 0], x1[:, label == 0])


def test_paired_augment_swap_exchanges_dates() -> None:
    x1, x2, label, valid = _patterned()
    aug = PairedAugment(hflip=False, vflip=False, rot90=False, gain=0, offset=0, noise=0, swap=1.0)
    o1, o2, ol, _ = aug(x1, x2, label, valid, np.random.default_rng(0))
    np.testing.assert_array_equal(o1, x2)
    np.testing.assert_array_equal(o2, x1)
    np.testing.assert_array_equal(ol, label)


# ------------------------------------------------------------------------------------------
# OSCD layout on the bundled single-city sample
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bercy(sample_city: Path) -> ChangeScene:
    (record,) = discover_scenes(sample_city)
    return ChangeScene.open(record)


def test_oscd_single_city_folder(sample_city: Path, bercy: ChangeScene) -> None:
    (record,) = oscd_scenes(sample_city)
    assert record.name == record.group == "bercy" and record.label.endswith("cm/bercy-cm.tif")
    assert bercy.shape == (395, 360) and bercy.channels == (13, 13)
    assert bercy.bands[0][:3] == ["B01", "B02", "B03"] and "B8A" in bercy.bands[0]
    label = bercy.label
    assert label.shape == (395, 360) and set(np.unique(label).tolist()) == {0, 1}  # cm.tif 1/2 -> 0/1
    assert int((label == 1).sum()) == 1046  # DATA.md: bercy 0.74 % (1046 px)
    assert not bercy.cached


def test_patch_dataset_reads_windows_lazily(bercy: ChangeScene, monkeypatch: pytest.MonkeyPatch) -> None:
    windows: list[Window] = []
    original = ChangeScene.read

    def spy(self: ChangeScene, window: Window):
        windows.append(window)
        return original(self, window)

    monkeypatch.setattr(ChangeScene, "read", spy)
    ds = PatchDataset([bercy], 32, None, None, length=6, seed=1)
    items = [ds[i] for i in range(6)]
    assert windows and all(int(w.width) <= 32 and int(w.height) <= 32 for w in windows)
    item = items[0]
    assert item["t1"].shape == (13, 32, 32) and item["t1"].dtype == torch.float32
    assert item["target"].shape == (32, 32) and item["valid"].dtype == torch.bool
    # without normalisation/augmentation the patch is exactly the scene window
    key = ds.key(0)
    x1, x2, valid = original(bercy, Window(key.col, key.row, 32, 32))
    np.testing.assert_array_equal(item["t1"].numpy(), np.where(valid[None], x1, 0))
    np.testing.assert_array_equal(item["target"].numpy(), bercy.label[key.row : key.row + 32, key.col : key.col + 32] == 1)
    # deterministic per (seed, epoch, index); new patches every epoch
    assert ds.key(3) == ds.key(3)
    first = [ds.key(i) for i in range(6)]
    ds.set_epoch(1)
    assert [ds.key(i) for i in range(6)] != first
    batch = collate_patches(items[:4])
    assert batch["t1"].shape == (4, 13, 32, 32) and batch["scene"].tolist() == [0, 0, 0, 0]


def test_balanced_sampler_places_patches_on_changes(bercy: ChangeScene) -> None:
    ds = PatchDataset([bercy], 32, None, None, length=40, change_fraction=1.0)
    label = bercy.label
    for i in range(40):
        k = ds.key(i)
        assert (label[k.row : k.row + 32, k.col : k.col + 32] == 1).any()
    uniform = BalancedPatchSampler(ds, 200, change_fraction=0.0, seed=5)
    keys = list(uniform)
    assert len(keys) == 200 and all(isinstance(k, PatchKey) for k in keys)
    hit = np.mean([(label[k.row : k.row + 32, k.col : k.col + 32] == 1).any() for k in keys])
    assert hit < 0.9  # 0.74 % change: uniform patches often miss it
    item = ds[keys[0]]  # a dataset reads any key a sampler yields
    assert item["row"] == keys[0].row and item["col"] == keys[0].col


def test_patch_dataset_normalises_and_augments(bercy: ChangeScene) -> None:
    stats = compute_normalization([bercy], max_pixels_per_scene=20_000)
    ds = PatchDataset([bercy], 32, stats, PairedAugment(crop=24, swap=0.5), length=8, change_fraction=0.5)
    items = [ds[i] for i in range(8)]
    assert all(it["t1"].shape == (13, 24, 24) for it in items)
    values = torch.stack([it["t1"] for it in items])
    assert values.abs().mean() < 5  # normalised, not raw reflectance x 10000
    with pytest.raises(InputError, match="without a label"):
        PatchDataset([ChangeScene(SceneRecord("u", "a", "b"), bercy.pair)], 32)


def test_normalization_statistics_match_numpy(bercy: ChangeScene) -> None:
    x1, x2, valid = bercy.read(Window(0, 0, 360, 395))
    x1, x2 = x1.astype(np.float64), x2.astype(np.float64)
    stats = compute_normalization([bercy], shared=False, block=128)
    np.testing.assert_allclose(stats["t1"]["mean"], x1[:, valid].mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats["t2"]["std"], x2[:, valid].std(1), rtol=1e-5)
    pooled = compute_normalization([bercy])  # same band names: pooled over both dates by default
    both = np.concatenate([x1[:, valid], x2[:, valid]], axis=1)
    assert pooled["shared"] and pooled["t1"] == pooled["t2"]
    np.testing.assert_allclose(pooled["t1"]["mean"], both.mean(1), rtol=1e-6)
    np.testing.assert_allclose(pooled["t1"]["std"], both.std(1), rtol=1e-5)
    assert pooled["scenes"] == ["bercy"] and pooled["pixels"]["t1"] == int(valid.sum())


def test_cache_gives_the_same_pixels(sample_city: Path) -> None:
    (lazy,) = open_scenes(discover_scenes(sample_city))
    (cached,) = open_scenes(discover_scenes(sample_city), cache_bytes=2**30)
    assert cached.cached and not lazy.cached
    w = Window(100, 50, 40, 30)
    for a, b in zip(lazy.read(w), cached.read(w)):
        np.testing.assert_array_equal(a, b)
    x1, _, valid, label = cached.read_padded(380, 340, 32, 32)  # past the bottom-right edge
    assert x1.shape == (13, 32, 32) and not valid[-1, -1] and label[-1, -1] == IGNORE and valid[0, 0]


# ------------------------------------------------------------------------------------------
# labels on the common grid, generic pair folders
# ------------------------------------------------------------------------------------------


def test_pair_folder_layout_and_georeferenced_label(tmp_path: Path, make_raster) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "scene_a"
    folder.mkdir()
    t = Affine(10.0, 0, 500000.0, 0, -10.0, 5400000.0)
    make_raster("scene_a/t1.tif", rng.integers(0, 200, (3, 40, 50)).astype(np.uint8), transform=t)
    make_raster("scene_a/t2.tif", rng.integers(0, 200, (3, 40, 50)).astype(np.uint8), transform=t)
    gt = np.zeros((50, 60), np.uint8)  # larger label raster, shifted by (row 5, col 3)
    gt[5 + 10 : 5 + 20, 3 + 7 : 3 + 9] = 255
    make_raster("scene_a/gt.tif", gt, transform=t * Affine.translation(-3, -5))
    (record,) = pair_folder_scenes(tmp_path)
    assert record.name == "scene_a" and record.labelled
    scene = ChangeScene.open(record)
    expected = np.zeros((40, 50), np.uint8)
    expected[10:20, 7:9] = 1
    np.testing.assert_array_equal(scene.label, expected)
    assert discover_scenes(tmp_path)[0].name == "scene_a"


def test_label_coding_and_ignore_values(tmp_path: Path, make_raster) -> None:
    data = np.ones((2, 20, 20), np.uint16)
    make_raster("t1.tif", data, crs=None)
    make_raster("t2.tif", data, crs=None)
    cm = np.ones((20, 20), np.uint8)
    cm[0, :] = 0  # OSCD: 0 = unlabelled
    cm[5, 5] = 2
    make_raster("cm.tif", cm, crs=None)
    scene = ChangeScene.open(SceneRecord("x", str(tmp_path / "t1.tif"), str(tmp_path / "t2.tif"), str(tmp_path / "cm.tif")))
    assert scene.label[5, 5] == 1 and (scene.label[0] == IGNORE).all() and (scene.label[1:] != IGNORE).all()
    ds = PatchDataset([scene], 16, None, None, length=4, change_fraction=0.0)
    item = ds[PatchKey(0, 0, 0, 0)]
    assert not item["valid"][0].any() and item["valid"][1:].all()
    # a 0/255 mask that declares nodata=0 (a common mis-declaration): 0 still means "no change"
    mask = np.zeros((20, 20), np.uint8)
    mask[3, 4] = 255
    make_raster("mask.tif", mask, crs=None, nodata=0)
    scene = ChangeScene.open(SceneRecord("y", str(tmp_path / "t1.tif"), str(tmp_path / "t2.tif"), str(tmp_path / "mask.tif")))
    assert scene.label.sum() == 1 and (scene.label != IGNORE).all()
    # a real nodata (not a class value) is ignored
    mask[10:, :] = 99
    make_raster("mask99.tif", mask, crs=None, nodata=99)
    scene = ChangeScene.open(SceneRecord("z", str(tmp_path / "t1.tif"), str(tmp_path / "t2.tif"), str(tmp_path / "mask99.tif")))
    assert (scene.label[10:] == IGNORE).all() and scene.label[3, 4] == 1 and (scene.label[:10] != IGNORE).all()


# ------------------------------------------------------------------------------------------
# splits by group
# ------------------------------------------------------------------------------------------


def _records(groups: dict[str, str]) -> list[SceneRecord]:
    return [SceneRecord(name, "a", "b", "l", group) for name, group in groups.items()]


def test_split_keeps_groups_together() -> None:
    recs = _records({"test_2_0000_0000": "test_2", "test_2_0000_0512": "test_2", "test_7_0256_0512": "test_7", "val_27_0000_0256": "val_27"})
    train, val = split_by_groups(recs, ["test_2_0000_0000"])  # a scene name takes its whole group
    assert {r.name for r in val} == {"test_2_0000_0000", "test_2_0000_0512"}
    assert {r.group for r in train} == {"test_7", "val_27"}
    with pytest.raises(InputError, match="both"):
        split_by_groups(recs, ["test_2"], ["test_2", "test_7"])
    with pytest.raises(InputError, match="not in the dataset"):
        split_by_groups(recs, ["nowhere"])
    with pytest.raises(InputError, match="share"):
        check_disjoint(recs[:1], recs[1:2])


def test_leave_cities_out_folds_never_share_a_city() -> None:
    recs = _records({f"city{i}": f"city{i}" for i in range(7)})
    folds = leave_cities_out_folds(recs, 3, seed=1)
    assert len(folds) == 3
    validated = []
    for train, val in folds:
        assert not {r.group for r in train} & {r.group for r in val}
        assert len(train) + len(val) == 7
        validated += [r.name for r in val]
    assert sorted(validated) == sorted(r.name for r in recs)  # each city validated exactly once
    assert len(leave_cities_out_folds(recs)) == 7


def test_shared_oscd_layout_and_folds(shared_data: Path, sample_city: Path) -> None:
    records = oscd_scenes(shared_data / "oscd")
    assert len(records) == 14 and sum(r.labelled for r in records) == 10
    labelled = oscd_scenes(shared_data / "oscd", labelled_only=True)
    for train, val in leave_cities_out_folds(labelled, 5):
        assert not {r.group for r in train} & {r.group for r in val}
        assert len({r.group for r in train}) == 8
    (shared_bercy,) = oscd_scenes(shared_data / "oscd", ["bercy"])
    (sample_bercy,) = oscd_scenes(sample_city)
    np.testing.assert_array_equal(ChangeScene.open(shared_bercy).label, ChangeScene.open(sample_bercy).label)
    # size quirk: imgs_2 smaller than imgs_1, the label still on the imgs_1 B02 grid
    (abudhabi,) = oscd_scenes(shared_data / "oscd", ["abudhabi"])
    scene = ChangeScene.open(abudhabi)
    assert int((scene.label == 1).sum()) == 23592


def test_levir_layout(shared_data: Path) -> None:
    records = levir_scenes(shared_data / "levir_cd_samples")
    assert len(records) == 11
    groups = {r.name: r.group for r in records}
    assert groups["test_2_0000_0000"] == groups["test_2_0000_0512"] == "test_2"
    scenes = open_scenes(records[:3])
    for s in scenes:
        assert s.channels == (3, 3) and s.shape == (256, 256)
        assert 0.10 < s.change_fraction() < 0.26  # DATA.md: 11.5 %–25.2 %
