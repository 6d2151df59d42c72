"""Heterogeneous change detection: unshared pseudo-Siamese branches, cross-modal representation learning,
hyperspectral vs LiDAR DSM through detect (CLI and Prefect flow), and the real heterogeneous data loaders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from scipy import ndimage
from torch.utils.data import DataLoader

from changedet.checkpoint import save_checkpoint
from changedet.cli import main as cli_main
from changedet.data import (
    ChangeScene,
    PatchDataset,
    SceneRecord,
    collate_patches,
    compute_normalization,
)
from changedet.data.hetero import hetero_cd_scenes, prepare_scene, sar_cd_scenes
from changedet.data.houston import held_apart_split, load_houston
from changedet.pipeline.detect import MASK, MASK_NODATA, PROBABILITY
from changedet.losses import CrossModalLoss
from changedet.models import create_model
from changedet.testing.synthetic import write_synthetic_hsi_lidar
from changedet.train import checkpoint_metadata
from changedet.train.crossmodal import (
    embed_pixels,
    matching_distances,
    retrieval_topk,
    train_cross_modal,
)

HSI_BANDS = 120
TINY = {"base_channels": 4}


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Tiny models on a busy 2-core machine: one torch thread (intra-op threads spin-wait under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def branch_tensors(model: torch.nn.Module, date: int) -> list[torch.Tensor]:
    """Parameters and buffers of one date's encoder and projections."""
    modules = (getattr(model, f"encoder_t{date}"), getattr(model, f"project_t{date}"))
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


@pytest.fixture(scope="module")
def hsi_lidar(tmp_path_factory):
    return write_synthetic_hsi_lidar(tmp_path_factory.mktemp("hsi_lidar"), 64, 80, bands=HSI_BANDS, n_changes=6)


@pytest.fixture(scope="module")
def scene(hsi_lidar) -> ChangeScene:
    record = SceneRecord("hsi-lidar", str(hsi_lidar.t1), str(hsi_lidar.t2), str(hsi_lidar.label))
    return ChangeScene.open(record, allow_different_bands=True).cache()


def scene_embeddings(model, scene: ChangeScene, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Normalised per-date embeddings of the valid, unchanged pixels of the whole scene."""
    h, w = scene.shape
    x1, x2, valid = scene.read(Window(0, 0, w, h))
    z = [np.where(valid, (x - np.asarray(stats[d]["mean"])[:, None, None]) / np.asarray(stats[d]["std"])[:, None, None], 0)
         for d, x in (("t1", x1), ("t2", x2))]  # fmt: skip
    out = model.predict(*(torch.from_numpy(v.astype(np.float32))[None] for v in z))
    keep = torch.from_numpy(valid & (scene.label == 0))
    e1, e2 = (F.normalize(e[0].permute(1, 2, 0)[keep], dim=1).numpy() for e in (out.embeddings_t1, out.embeddings_t2))
    return e1, e2


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    """A tiny pseudo-siamese-fc (120-band HSI vs 1-band DSM), cross-modal trained for 40 steps, and its checkpoint."""
    stats = compute_normalization([scene])
    torch.manual_seed(0)
    model = create_model("pseudo-siamese-fc", in_channels=scene.channels, **TINY)
    before = matching_distances(*scene_embeddings(model, scene, stats))
    data = PatchDataset([scene], 32, stats, None, length=160, change_fraction=0.3, seed=0)
    loader = DataLoader(data, batch_size=4, collate_fn=collate_patches)
    history = train_cross_modal(model, loader, CrossModalLoss(max_per_class=64), lr=3e-3)
    after = matching_distances(*scene_embeddings(model, scene, stats))
    path = tmp_path_factory.mktemp("checkpoint") / "pseudo-siamese-fc.safetensors"
    save_checkpoint(path, model, checkpoint_metadata("pseudo-siamese-fc", TINY, scene.bands, stats, 0.5))
    return {"model": model, "before": before, "after": after, "history": history, "checkpoint": path}


def test_branches_take_different_band_counts() -> None:
    torch.manual_seed(0)
    model = create_model("pseudo-siamese-fc", in_channels=(HSI_BANDS, 1), **TINY).train()
    assert model.in_channels == (HSI_BANDS, 1) and not model.weights_shared
    assert model.encoder_t1.in_channels == HSI_BANDS and model.encoder_t2.in_channels == 1
    out = model(torch.randn(2, HSI_BANDS, 40, 36), torch.randn(2, 1, 40, 36))
    assert out.logits.shape == (2, 1, 40, 36) and out.embeddings_t1.shape == out.embeddings_t2.shape
    pixel = create_model("pseudo-siamese-pixel", in_channels=(144, 21))
    e1, e2 = embed_pixels(pixel, np.random.rand(10, 144), np.random.rand(10, 21))
    assert e1.shape == e2.shape == (10, 32)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("name", ["pseudo-siamese-fc", "pseudo-siamese-pixel"])
def test_no_tensor_is_shared_between_branches(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=(HSI_BANDS, 1)).eval()
    ptrs = [{t.untyped_storage().data_ptr() for t in branch_tensors(model, d)} for d in (1, 2)]
    assert ptrs[0] and ptrs[1] and not ptrs[0] & ptrs[1]
    # and functionally: changing the date-1 branch leaves the date-2 embeddings untouched
    t1, t2 = torch.randn(1, HSI_BANDS, 32, 32), torch.randn(1, 1, 32, 32)
    before = model.predict(t1, t2)
    with torch.no_grad():
        for p in branch_tensors(model, 1):
            if p.is_floating_point():
                p.add_(0.5)
    after = model.predict(t1, t2)
    assert torch.equal(before.embeddings_t2, after.embeddings_t2)
    assert not torch.allclose(before.embeddings_t1, after.embeddings_t1)


def test_matching_locations_get_closer_than_other_locations(trained) -> None:
    (match0, other0), (match, other) = trained["before"], trained["after"]
    assert len(trained["history"]) == 40 and np.mean(trained["history"][-5:]) < np.mean(trained["history"][:5])
    assert match0 > 0.95 * other0  # untrained branches: no relation between the two modalities
    assert match < 0.85 * other  # trained: the same location across modalities is closer than another location


def test_retrieval_and_distances() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 8))
    assert retrieval_topk(e, e, (1, 5)) == {1: 1.0, 5: 1.0}
    assert retrieval_topk(e, e, (1,), n_candidates=10) == {1: 1.0}
    shuffled = retrieval_topk(e, e[::-1], (1, 5), n_candidates=10)
    assert shuffled[1] <= 0.1 and shuffled[5] <= 0.6
    match, other = matching_distances(e, e)
    assert match == 0 and other > 0


@pytest.fixture(scope="module")
def cli_run(hsi_lidar, trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "out"
    args = ["detect", "--t1", str(hsi_lidar.t1), "--t2", str(hsi_lidar.t2), "--out", str(out),
            "--model", str(trained["checkpoint"]), "--tile", "64", "--overlap", "16", "--batch-size", "4", "--quiet"]  # fmt: skip
    assert cli_main(args) == 0
    return out


def check_on_hsi_grid(mask_path: Path, hsi: Path, dsm: Path) -> None:
    with rasterio.open(hsi) as ref, rasterio.open(mask_path) as mask, rasterio.open(dsm) as lidar:
        assert mask.crs == ref.crs and mask.transform == ref.transform and mask.shape == ref.shape
        assert mask.nodata == MASK_NODATA
        values = mask.read(1)
        gap = lidar.read(1) == lidar.nodata  # no LiDAR returns: invalid in the mask
        f = lidar.width // ref.width
        invalid = gap.reshape(ref.height, f, ref.width, f).all(axis=(1, 3))
        assert invalid.any() and np.all(values[invalid] == MASK_NODATA)
        assert set(np.unique(values[~invalid])) <= {0, 1}


def test_detect_hsi_vs_lidar_writes_mask_on_the_input_grid(cli_run, hsi_lidar) -> None:
    check_on_hsi_grid(cli_run / MASK, hsi_lidar.t1, hsi_lidar.t2)
    run = json.loads((cli_run / "run.json").read_text())
    assert run["model"]["name"] == "pseudo-siamese-fc"
    assert len(run["t1"]["bands"]) == HSI_BANDS and run["t2"]["bands"] == ["B1"]


def test_detect_with_registry_name_and_clear_error_for_cva(hsi_lidar, tmp_path, capsys) -> None:
    common = ["detect", "--t1", str(hsi_lidar.t1), "--t2", str(hsi_lidar.t2), "--tile", "64", "--overlap", "16", "--quiet"]
    assert cli_main([*common, "--out", str(tmp_path / "ps"), "--model", "pseudo-siamese-fc"]) == 0
    check_on_hsi_grid(tmp_path / "ps" / MASK, hsi_lidar.t1, hsi_lidar.t2)
    assert cli_main([*common, "--out", str(tmp_path / "cva"), "--model", "cva"]) == 2
    assert "pseudo-Siamese model" in capsys.readouterr().err
    assert not (tmp_path / "cva").exists()


def test_flow_over_the_synthetic_hsi_lidar_pair(prefect_api, hsi_lidar, trained, cli_run, tmp_path) -> None:
    from prefect_dask import DaskTaskRunner

    from flows.detect import DetectFlowParams, detect_pair

    out = tmp_path / "flow"
    params = DetectFlowParams(t1=str(hsi_lidar.t1), t2=str(hsi_lidar.t2), out=str(out), name="hsi-lidar",
                              model=str(trained["checkpoint"]), tile=64, overlap=16, batch_size=4)  # fmt: skip
    in_process = DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 1, "processes": False})
    summary = detect_pair.with_options(task_runner=in_process)(params)
    assert summary["model"]["name"] == "pseudo-siamese-fc"
    check_on_hsi_grid(out / MASK, hsi_lidar.t1, hsi_lidar.t2)
    for name in (MASK, PROBABILITY):
        assert (out / name).read_bytes() == (cli_run / name).read_bytes(), name


# --------------------------------------------------------------------------------------------
# real data (../shared/data)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hetero_root(shared_data: Path) -> Path:
    if not (shared_data / "hetero_cd" / "scenes.csv").is_file():
        pytest.skip(f"needs {shared_data / 'hetero_cd'}")
    return shared_data


def test_hetero_cd_and_sar_cd_loaders(hetero_root: Path, tmp_path: Path) -> None:
    records = hetero_cd_scenes(hetero_root / "hetero_cd")
    with (hetero_root / "hetero_cd" / "scenes.csv").open() as fh:
        rows = {r["scene"]: r for r in csv.DictReader(fh)}
    assert [r.name for r in records] == list(rows) and len(records) == 11
    for r in records:
        assert r.modalities == (rows[r.name]["t1_modality"].lower(), rows[r.name]["t2_modality"].lower())
    italy = ChangeScene.open(records[0].record, allow_different_bands=True)
    assert italy.channels == (1, 3)  # different band counts per date
    (yellowriver,) = hetero_cd_scenes(hetero_root / "hetero_cd", ["yellowriver"])
    assert yellowriver.modalities == ("sar", "optical")
    ready = prepare_scene(yellowriver, tmp_path)
    assert ready.modalities == ("optical", "sar")  # swapped: optical first
    prepared = ChangeScene.open(ready.record)
    assert prepared.channels == (3, 3) and prepared.shape == (343, 291)
    assert prepared.change_fraction() == pytest.approx(float(rows["yellowriver"]["change_fraction"]), abs=1e-4)
    x1, x2, _ = prepared.read(Window(0, 0, 291, 343))
    assert abs(x1.mean()) < 1e-3 and abs(x2.std() - 1) < 1e-3
    sar = sar_cd_scenes(hetero_root / "sar_cd")
    assert sorted(r.name for r in sar) == ["bern", "ottawa"] and all(r.modalities == ("sar", "sar") for r in sar)


def test_houston_samples_and_region_split(hetero_root: Path) -> None:
    samples = load_houston(hetero_root / "houston2013_partial")
    assert samples.hsi.shape == (2832, 144) and samples.lidar.shape == (2832, 21)
    assert set(np.unique(samples.labels)) == set(range(1, 16))
    fit, held = held_apart_split(samples, 0.3, seed=0)
    assert not set(fit) & set(held) and len(fit) + len(held) == len(samples)
    assert set(samples.labels[fit]) == set(samples.labels[held]) == set(range(1, 16))
    assert 0.3 <= len(held) / len(samples) < 0.5
    side = np.zeros((samples.rows.max() + 1, samples.cols.max() + 1), np.int8)
    side[samples.rows[fit], samples.cols[fit]], side[samples.rows[held], samples.cols[held]] = 1, 2
    cls = np.zeros_like(side, dtype=np.int16)
    cls[samples.rows, samples.cols] = samples.labels
    for c in range(1, 16):  # no region of a class has pixels on both sides
        regions, n = ndimage.label(cls == c, structure=np.ones((3, 3)))
        for region in range(1, n + 1):
            assert len(np.unique(side[regions == region])) == 1
