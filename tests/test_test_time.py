"""Test-time options of the one inference path: dihedral TTA, ensembles, histogram harmonisation,
the Otsu threshold rule and small-region removal — each does what it says, in the model and in detect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from scipy import ndimage

from changedet.checkpoint import read_metadata, save_checkpoint
from changedet.cli import main as cli_main
from changedet.harmonization import QuantileMap
from changedet.metrics import ProbabilityHistogram
from changedet.models import create_model
from changedet.models.test_time import DIHEDRAL, DihedralTTA, Ensemble, dihedral, undo_dihedral
from changedet.pipeline.output_table import MASK, PROBABILITY, RUN_JSON
from changedet.pipeline.params import DetectParams
from changedet.pipeline.postprocess import CONNECTIVITY, drop_small_regions
from changedet.weights import bundled_checkpoint


def _pair(bands: int = 4, side: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, bands, side, side, generator=g), torch.randn(1, bands, side, side, generator=g)


@pytest.mark.parametrize("k", range(DIHEDRAL))
def test_dihedral_inverse(k: int) -> None:
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(undo_dihedral(dihedral(x, k), k), x)


def test_dihedral_transforms_are_distinct() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert len({tuple(dihedral(x, k).flatten().tolist()) for k in range(DIHEDRAL)}) == DIHEDRAL


def test_tta_output_is_dihedral_equivariant() -> None:
    torch.manual_seed(0)
    tta = DihedralTTA(create_model("fc-siam-diff", in_channels=4, base_channels=8)).eval()
    t1, t2 = _pair()
    with torch.no_grad():
        base = tta(t1, t2).logits
        for k in range(DIHEDRAL):
            turned = tta(dihedral(t1, k), dihedral(t2, k)).logits
            torch.testing.assert_close(turned, dihedral(base, k), atol=1e-5, rtol=1e-5)
        plain = tta.model(t1, t2).logits
    assert not torch.allclose(plain, base, atol=1e-4)  # a convolutional model is not equivariant: TTA changes it


def test_tta_of_a_per_pixel_model_is_a_no_op() -> None:
    model = create_model("cva", in_channels=4).eval()  # change vector analysis: per pixel
    t1, t2 = _pair()
    model.fit_scene(t1[0].flatten(1).T, t2[0].flatten(1).T, torch.ones(t1[0, 0].numel(), dtype=torch.bool))
    with torch.no_grad():
        plain, tta = model(t1, t2), DihedralTTA(model)(t1, t2)
    torch.testing.assert_close(torch.sigmoid(tta.logits), torch.sigmoid(plain.logits), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tta.difference, plain.difference, atol=1e-6, rtol=1e-5)


def test_ensemble_averages_member_probabilities() -> None:
    torch.manual_seed(0)
    members = [create_model("fc-siam-diff", in_channels=4, base_channels=8).eval() for _ in range(3)]
    ensemble = Ensemble(members).eval()
    t1, t2 = _pair()
    with torch.no_grad():
        expected = torch.stack([torch.sigmoid(m(t1, t2).logits) for m in members]).mean(0)
        torch.testing.assert_close(torch.sigmoid(ensemble(t1, t2).logits), expected, atol=1e-6, rtol=1e-5)
    assert {k.split(".")[1] for k in ensemble.state_dict()} == {"0", "1", "2"}


def test_ensemble_of_copies_is_its_member() -> None:
    torch.manual_seed(0)
    member = create_model("fc-siam-diff", in_channels=4, base_channels=8).eval()
    ensemble = create_model("ensemble", in_channels=4, members=[{"model": "fc-siam-diff", "config": {"base_channels": 8}}] * 2)
    ensemble.load_state_dict({f"members.{i}.{k}": v for i in range(2) for k, v in member.state_dict().items()})
    t1, t2 = _pair()
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(ensemble.eval()(t1, t2).logits), torch.sigmoid(member(t1, t2).logits))


def test_quantile_map_matches_the_target_distribution() -> None:
    rng = np.random.default_rng(0)
    target = rng.gamma(2.0, 500.0, (20000, 2))
    source = 0.7 * rng.gamma(2.0, 500.0, (20000, 2)) + 300  # same shape, another gain and offset
    qmap = QuantileMap.fit(source, target)
    image = source.T.reshape(2, 100, 200)
    valid = np.ones((100, 200), bool)
    valid[:5] = False
    mapped = qmap.apply(image, valid)
    assert np.array_equal(mapped[:, ~valid], image[:, ~valid].astype(np.float32))  # invalid pixels untouched
    for b in range(2):
        got, want = np.quantile(mapped[b][valid], [0.1, 0.5, 0.9]), np.quantile(target[:, b], [0.1, 0.5, 0.9])
        np.testing.assert_allclose(got, want, rtol=0.03)
        order = np.argsort(image[b][valid])
        assert (np.diff(mapped[b][valid][order]) >= -1e-3).all()  # monotone


def test_drop_small_regions() -> None:
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True  # 4 px
    mask[10:16, 10:16] = True  # 36 px
    mask[5, 5] = mask[5, 6] = True  # a region of 2 px
    mask[8, 8] = mask[9, 9] = True  # diagonal neighbours: two 4-connected regions, as the polygons
    kept, dropped = drop_small_regions(mask, 5)
    assert dropped == 4 and kept.sum() == 36 and kept[10:16, 10:16].all()
    assert drop_small_regions(mask, 0)[0] is mask


def test_unset_test_time_fields_take_the_models_recommendation() -> None:
    params = DetectParams().with_test_time({"tta": "dihedral", "threshold_rule": "otsu", "min_region": 9})
    assert (params.tta, params.threshold_rule, params.min_region, params.harmonize) == ("dihedral", "otsu", 9, "none")
    given = DetectParams(tta="none", threshold=0.4).with_test_time({"tta": "dihedral", "threshold_rule": "otsu"})
    assert (given.tta, given.threshold_rule) == ("none", "fixed")


# -- through changedet detect on the bundled sample ---------------------------------------------------------------------
def _detect(sample_city: Path, out: Path, *options: str) -> dict:
    args = ["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(out),
            "--tile", "128", "--overlap", "16", "--quiet", *options]
    assert cli_main(args) == 0
    return json.loads((out / RUN_JSON).read_text())


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, sample_city) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    _detect(sample_city, out, "--model", "oscd-s2")
    return out


def test_detect_tta_changes_the_probability(tmp_path, sample_city, plain) -> None:
    run = _detect(sample_city, tmp_path / "tta", "--model", "oscd-s2", "--tta", "dihedral")
    assert run["parameters"]["tta"] == "dihedral"
    base, tta = _read(plain / PROBABILITY), _read(tmp_path / "tta" / PROBABILITY)
    valid = base != run["nodata"][PROBABILITY]
    assert 1e-4 < np.abs(base[valid] - tta[valid]).mean() < 0.2


def test_detect_otsu_rule_thresholds_the_written_probability(tmp_path, sample_city) -> None:
    run = _detect(sample_city, tmp_path / "otsu", "--model", "oscd-s2", "--threshold-rule", "otsu")
    prob, mask = _read(tmp_path / "otsu" / PROBABILITY), _read(tmp_path / "otsu" / MASK)
    valid = prob != run["nodata"][PROBABILITY]
    hist = ProbabilityHistogram()
    hist.update(prob, np.zeros(prob.shape, bool), valid)
    assert run["threshold"] == pytest.approx(hist.otsu_threshold()) and run["threshold"] != 0.788
    assert np.array_equal(mask[valid] == 1, prob[valid] >= run["threshold"])


def test_detect_min_region_leaves_no_small_region(tmp_path, sample_city, plain) -> None:
    run = _detect(sample_city, tmp_path / "mr", "--model", "oscd-s2", "--min-region", "12")
    mask, before = _read(tmp_path / "mr" / MASK) == 1, _read(plain / MASK) == 1
    labels, n = ndimage.label(mask, structure=CONNECTIVITY)
    assert n == run["changes"]["regions"] and np.bincount(labels.ravel())[1:].min() >= 12
    assert run["counts"]["dropped_regions"] > 0 and (mask <= before).all()  # only removals
    assert run["counts"]["changed_pixels"] == int(mask.sum())


def test_detect_harmonize_maps_t2(tmp_path, sample_city, plain) -> None:
    run = _detect(sample_city, tmp_path / "h", "--model", "oscd-s2", "--harmonize", "histogram")
    assert run["parameters"]["harmonize"] == "histogram"
    assert not np.array_equal(_read(plain / PROBABILITY), _read(tmp_path / "h" / PROBABILITY))


def test_harmonize_refused_for_models_with_different_bands_per_date(tmp_path, sample_city, capsys) -> None:
    args = ["detect", "--t1", str(sample_city / "imgs_1"), "--t2", str(sample_city / "imgs_2"), "--out", str(tmp_path / "x"),
            "--model", "pseudo-siamese-fc", "--bands", "B02,B03,B04", "--harmonize", "histogram", "--quiet"]
    assert cli_main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--harmonize" in err[0]
    assert not (tmp_path / "x").exists()


def test_checkpoint_recommendation_applies_and_is_overridable(tmp_path, sample_city, plain) -> None:
    path = bundled_checkpoint("oscd-s2")
    from safetensors.torch import load_file

    meta = read_metadata(path)
    meta["test_time"] = {**meta.get("test_time", {}), "min_region": 12}
    ckpt = tmp_path / "rec.safetensors"
    save_checkpoint(ckpt, _Flat(load_file(path)), meta)
    assert _detect(sample_city, tmp_path / "rec", "--model", str(ckpt))["parameters"]["min_region"] == 12
    assert _detect(sample_city, tmp_path / "off", "--model", str(ckpt), "--min-region", "0")["parameters"]["min_region"] == 0
    assert np.array_equal(_read(tmp_path / "off" / MASK), _read(plain / MASK))


class _Flat(torch.nn.Module):
    """A module whose state_dict is exactly ``state`` (to re-save a checkpoint with other metadata)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return dict(self._state)


def test_ensemble_runs_on_onnx_runtime_with_equal_outputs() -> None:
    from changedet.runtime.onnx import to_runtime

    torch.manual_seed(0)
    ensemble = create_model("ensemble", in_channels=4).eval()
    t1, t2 = _pair(side=64)
    with torch.no_grad():
        eager, onnx = ensemble(t1, t2), to_runtime(ensemble, "onnx")(t1, t2)
    torch.testing.assert_close(torch.sigmoid(onnx.logits), torch.sigmoid(eager.logits), atol=1e-5, rtol=1e-4)
