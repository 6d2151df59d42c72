"""Structured channel pruning (``changedet prune``) and the fine-tune that follows (``train --init-weights``)."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from changedet.checkpoint import load_state_dict, read_metadata, save_checkpoint
from changedet.cli import main
from changedet.errors import ModelError
from changedet.models import create_model
from changedet.pipeline.detect import MASK, DetectParams, detect_changes
from changedet.train.pruning import prune_checkpoint
from changedet.weights import bundled_checkpoint

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "oscd_bercy"
BANDS = ["B02", "B03", "B04", "B08"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An fc-siam-diff (base 8, 4 bands) whose filters have distinct L1 norms, with detect's metadata."""
    torch.manual_seed(0)
    model = create_model("fc-siam-diff", in_channels=4, base_channels=8)
    with torch.no_grad():  # BatchNorm statistics a trained model would have, not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("prune") / "model.safetensors"
    save_checkpoint(path, model, {"model": "fc-siam-diff", "config": {"base_channels": 8}, "bands": BANDS,
                                  "normalization": "per-scene", "threshold": 0.5, "input_channels": [4, 4],
                                  "metrics": {"f1": 0.9}, "expected_f1_unseen": {"pooled_f1_mean": 0.3}})  # fmt: skip
    return path


def test_pruning_keeps_whole_filters_of_the_source_as_the_narrower_registry_model(source, tmp_path):
    out = tmp_path / "pruned.safetensors"
    record = prune_checkpoint(str(source), out, 0.5)
    meta = read_metadata(out)
    assert meta["config"] == {"base_channels": 4} and meta["bands"] == BANDS and meta["threshold"] == 0.5
    assert "metrics" not in meta and "expected_f1_unseen" not in meta  # the source's figures are not the pruned model's
    assert meta["pruning"]["source_digest"] == record["source_digest"] and meta["pruning"]["keep"] == 0.5
    small = create_model("fc-siam-diff", in_channels=4, base_channels=4)
    assert record["parameters_after"] == sum(p.numel() for p in small.parameters()) < record["parameters_before"] / 3
    small.load_state_dict(load_state_dict(out))  # exactly the registry architecture of base 4
    src, dst = load_state_dict(source), load_state_dict(out)
    first = "encoder.stages.0.0.weight"
    rows = _rows(src[first], dst[first])
    assert len(set(rows)) == 4 and rows == sorted(rows)  # whole filters of the source, in their order, none re-made
    norms = src[first].abs().sum(dim=(1, 2, 3))
    assert norms[rows].sum() > norms.sort().values[:4].sum()  # not the weakest ones


def _rows(big: torch.Tensor, small: torch.Tensor) -> list[int]:
    """For each row of ``small``, the row of ``big`` it equals (on ``small``'s trailing shape)."""
    return [next(i for i in range(big.shape[0]) if torch.equal(big[i], row)) for row in small]


def test_batchnorm_and_the_next_convolution_follow_the_kept_filters(source, tmp_path):
    out = tmp_path / "pruned.safetensors"
    prune_checkpoint(str(source), out, 0.5)
    src, dst = load_state_dict(source), load_state_dict(out)
    kept = _rows(src["encoder.stages.0.0.weight"], dst["encoder.stages.0.0.weight"])
    for stat in ("running_mean", "running_var", "weight", "bias"):  # stage 0: conv 0, BatchNorm 1, ReLU 2, Dropout 3, conv 4
        assert torch.equal(dst[f"encoder.stages.0.1.{stat}"], src[f"encoder.stages.0.1.{stat}"][kept])
    second = src["encoder.stages.0.4.weight"][:, kept]  # the next convolution's inputs: the kept channels only
    kept2 = _rows(second, dst["encoder.stages.0.4.weight"])
    assert len(set(kept2)) == 4 and torch.equal(dst["encoder.stages.0.4.weight"], second[kept2])


def test_pruned_checkpoint_runs_through_detect_with_the_inputs_grid(source, tmp_path):
    out = tmp_path / "pruned.safetensors"
    prune_checkpoint(str(source), out, 0.5)
    result = detect_changes(SAMPLE / "imgs_1", SAMPLE / "imgs_2", tmp_path / "run", DetectParams(model=str(out), tile=64, overlap=16))
    with rasterio.open(result.path(MASK)) as mask, rasterio.open(next((SAMPLE / "imgs_1").glob("*_B02.tif"))) as ref:
        assert mask.crs == ref.crs and mask.transform == ref.transform and mask.shape == ref.shape


def test_bundled_ensemble_prunes_member_by_member(tmp_path):
    out = tmp_path / "oscd-s2-half.safetensors"
    record = prune_checkpoint("oscd-s2", out, 0.5)
    meta = read_metadata(out)
    assert [m["config"]["base_channels"] for m in meta["config"]["members"]] == [4, 4, 4]
    assert record["source_digest"] and record["parameters_after"] < record["parameters_before"] / 3
    assert read_metadata(bundled_checkpoint("oscd-s2"))["config"]["members"][0]["config"]["base_channels"] == 8  # source untouched


def test_prune_refuses_what_it_cannot_prune(source, tmp_path, capsys):
    other = tmp_path / "resnet.safetensors"
    save_checkpoint(other, create_model("siam-unet-resnet18", in_channels=4), {"model": "siam-unet-resnet18", "config": {}, "bands": BANDS})
    with pytest.raises(ModelError, match="cannot be pruned"):
        prune_checkpoint(str(other), tmp_path / "x.safetensors", 0.5)
    for argv, reason in (
        (["prune", "--model", str(other), "--out", str(tmp_path / "x.safetensors")], "cannot be pruned"),
        (["prune", "--model", str(source), "--keep", "0.99", "--out", str(tmp_path / "x.safetensors")], "leaves 8"),
        (["prune", "--model", str(source), "--keep", "1.5", "--out", str(tmp_path / "x.safetensors")], "between 0 and 1"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and reason in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_train_init_weights_fine_tunes_the_pruned_architecture(source, tmp_path, capsys):
    pruned = tmp_path / "pruned.safetensors"
    assert main(["prune", "--model", str(source), "--keep", "0.5", "--out", str(pruned)]) == 0
    assert "fine-tune it: changedet train" in capsys.readouterr().out
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(SAMPLE), "patch_size": 32, "samples_per_epoch": 16, "bands": BANDS, "normalization": "per-scene"},
        "model": {"name": "fc-siam-diff", "config": {"base_channels": 16}},  # replaced by the checkpoint's architecture
        "epochs": 1, "batch_size": 8, "output_dir": str(tmp_path / "run"), "progress": False,
        "validation": {"patience": None}, "optim": {"lr": 1e-6},
    }))  # fmt: skip
    assert main(["train", "--config", str(config), "--init-weights", str(pruned)]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["pretraining"] == {"method": "init_weights", "checkpoint": str(pruned), "tensors": len(load_state_dict(pruned))}
    last = tmp_path / "run" / "last.safetensors"
    assert read_metadata(last)["config"] == {"base_channels": 4}
    start, end = load_state_dict(pruned), load_state_dict(last)
    weights = [k for k in start if k.endswith(".weight")]
    assert all(start[k].shape == end[k].shape for k in start)
    assert max(float((start[k] - end[k]).abs().max()) for k in weights) < 1e-3  # fine-tuned from it, not from scratch
    assert not all(torch.equal(start[k], end[k]) for k in weights)  # and trained
    assert np.isfinite(result["history"][-1]["train_loss"])
