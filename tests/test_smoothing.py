"""Randomized smoothing in detect: the certificate arithmetic, owner blending, certified_radius.tif on
the exact grid with abstentions in the mask, determinism, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from scipy.stats import norm

from changedet.cli import main
from changedet.pipeline.detect import MASK, MASK_STYLE, PROBABILITY, DetectParams, detect_changes
from changedet.pipeline.mosaic import blend_weights
from changedet.pipeline.output_table import CERTIFIED_RADIUS, FLOAT_NODATA, MASK_NODATA
from changedet.pipeline.smoothing import ABSTAIN, Smoothing
from changedet.pipeline.tiling import plan_tiles
from changedet.testing.synthetic import write_synthetic_pair

PARAMS = {"model": "cva", "tile": 64, "overlap": 16}


def test_certify_turns_votes_into_majority_radius_and_abstention():
    s = Smoothing(sigma=2.0, samples=100, alpha=0.001, threshold=0.5, raw_per_reflectance=10000.0, pixels=1000)
    mask, radius = s.certify(np.array([1.0, 0.0, 0.5, 0.51, 0.97, np.nan], np.float32))
    all_votes = 2.0 * norm.ppf((0.001 / 1000) ** (1 / 100))  # Clopper-Pearson with every vote: alpha^(1/n)
    assert mask.tolist()[:2] == [1, 0] and radius[0] == pytest.approx(all_votes, rel=1e-5) and radius[1] == radius[0]
    assert mask[2] == mask[3] == ABSTAIN and radius[2] == radius[3] == 0.0  # 51 of 100 is no certainty
    assert mask[4] == 1 and 0 < radius[4] < radius[0]
    assert s.max_radius == pytest.approx(all_votes, rel=1e-5) and s.sigma_raw == pytest.approx(2 / 255 * 10000)


@pytest.mark.parametrize("shape, tile, overlap", [((300, 280), 64, 16), ((64, 100), 64, 0), ((500, 501), 256, 32)])
def test_owner_blending_gives_every_pixel_exactly_one_tile(shape, tile, overlap):
    cover = np.zeros(shape)
    for t in plan_tiles(*shape, tile, overlap):
        cover[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width] += blend_weights(t, shape, overlap, "owner")
    assert np.array_equal(cover, np.ones(shape))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pair = write_synthetic_pair(tmp_path_factory.mktemp("pair"), 150, 130, bands=3, n_changes=6)
    root = tmp_path_factory.mktemp("smoothing")
    smoothed = DetectParams(**PARAMS, smoothing_sigma=1.0, smoothing_samples=40)
    out = {
        "smoothed": detect_changes(pair.t1, pair.t2, root / "smoothed", smoothed),
        "again": detect_changes(pair.t1, pair.t2, root / "again", smoothed),
        "plain": detect_changes(pair.t1, pair.t2, root / "plain", DetectParams(**PARAMS, blend="owner")),
    }
    return pair, out


def _read(path: Path):
    with rasterio.open(path) as ds:
        return ds.read(1), ds.profile, ds.crs, ds.transform, ds.nodata


def test_smoothed_run_writes_certified_radius_on_the_exact_grid(runs):
    _, out = runs
    folder = out["smoothed"].out_dir
    prob, _, crs, transform, _ = _read(folder / PROBABILITY)
    mask, _, mask_crs, mask_transform, mask_nodata = _read(folder / MASK)
    radius, profile, r_crs, r_transform, r_nodata = _read(folder / CERTIFIED_RADIUS)
    assert (r_crs, r_transform, r_nodata, profile["dtype"]) == (crs, transform, FLOAT_NODATA, "float32")
    assert (mask_crs, mask_transform, mask_nodata) == (crs, transform, MASK_NODATA)
    invalid = prob == FLOAT_NODATA
    assert np.array_equal(invalid, radius == FLOAT_NODATA) and np.array_equal(invalid, mask == MASK_NODATA)
    assert set(np.unique(mask[~invalid])) <= {0, 1, ABSTAIN}
    assert np.all(radius[mask == ABSTAIN] == 0) and np.all(radius[(mask == 0) | (mask == 1)] > 0)
    summary = json.loads((folder / "run.json").read_text())
    smoothing = summary["smoothing"]
    assert smoothing["samples"] == 40 and smoothing["sigma_255"] == 1.0 and smoothing["pixel_alpha"] == pytest.approx(0.001 / (150 * 130))
    assert float(radius.max()) <= smoothing["max_radius_255"] + 1e-6
    assert summary["counts"]["abstained_pixels"] == int((mask == ABSTAIN).sum())
    assert summary["parameters"]["blend"] == "owner" and CERTIFIED_RADIUS in summary["outputs"]
    assert 'label="abstain (not certified)"' in (folder / MASK_STYLE).read_text()
    votes = prob[~invalid] * 40  # the probability is the vote fraction
    assert np.allclose(votes, np.rint(votes), atol=1e-4)


def test_smoothed_majority_agrees_with_the_plain_map_and_reruns_are_identical(runs):
    _, out = runs
    mask = _read(out["smoothed"].out_dir / MASK)[0]
    plain = _read(out["plain"].out_dir / MASK)[0]
    certified = (mask == 0) | (mask == 1)
    assert certified.mean() > 0.5  # small noise: most pixels are certain
    assert (mask[certified] == plain[certified]).mean() > 0.99
    for name in (MASK, PROBABILITY, CERTIFIED_RADIUS):
        assert (out["smoothed"].out_dir / name).read_bytes() == (out["again"].out_dir / name).read_bytes(), name
    assert not (out["plain"].out_dir / CERTIFIED_RADIUS).exists()


@pytest.mark.parametrize("extra, reason", [
    (["--threshold-rule", "otsu"], "certifies a fixed threshold"),
    (["--min-region", "4"], "voids its certificates"),
    (["--blend", "cosine"], "--blend owner"),
    (["--smoothing-samples", "10"], "cannot certify any pixel"),
])  # fmt: skip
def test_refused_combinations_write_nothing(runs, tmp_path, capsys, extra, reason):
    pair, _ = runs
    out = tmp_path / "out"
    argv = ["detect", "--t1", str(pair.t1), "--t2", str(pair.t2), "--out", str(out), "--model", "cva", "--smoothing-sigma", "1", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and reason in err[0]
    assert not out.exists()


def test_certified_f1_counts_uncertain_pixels_as_wrong_and_the_stage_reports_it():
    from changedet.evaluation.stages import get_stage
    from changedet.evaluation.stages.robustness import RobustnessConfig
    from changedet.metrics import ProbabilityHistogram
    from changedet.pipeline.smoothing import abstained_fraction, certified_confusion

    hist = ProbabilityHistogram()
    hist.pos[999], hist.pos[500], hist.neg[0], hist.neg[999] = 10, 5, 80, 5  # 100 pixels, 100 samples
    s = Smoothing(sigma=1.0, samples=100, alpha=0.001, threshold=0.5, raw_per_reflectance=1.0, pixels=100)
    top = s.max_radius  # every vote for one class: sigma * Phi^-1((alpha / 100) ** (1 / 100))
    assert top == pytest.approx(norm.ppf((1e-5) ** 0.01))
    sure = certified_confusion(hist, s, 0.0)
    assert (sure.tp, sure.fp, sure.fn, sure.tn) == (10, 5, 5, 80)  # the 5 tied changes abstain: misses
    assert certified_confusion(hist, s, top + 1e-3).tp == 0 and abstained_fraction(hist, s) == pytest.approx(0.05)
    stage = get_stage("robustness")
    cfg = RobustnessConfig(data="d", methods=[], smoothing_sigma=[1.0], smoothing_samples=100, radii=[0.5, 5])
    (clean, smoothed) = stage.settings(cfg)
    assert smoothed == {"method": "smoothing", "mode": "both", "eps_255": 0.0, "steps": 100, "restarts": 1, "sigma_255": 1.0}
    row = stage.row_metrics(cfg, smoothed, hist)
    assert row["certified_f1"]["0"] == pytest.approx(2 / 3) and row["certified_f1"]["5"] == 0.0 and row["abstained"] == pytest.approx(0.05)
    report = {"checkpoints": ["m"], "config": {**cfg.model_dump(), "eps": [0]}, "row_seconds": [1.0, 3.0], "rows": [
        {"checkpoint": "m", **clean, "f1": 0.5}, {"checkpoint": "m", **smoothed, **row}]}  # fmt: skip
    text = "\n".join(stage.markdown(report))
    assert "## Certified (randomized smoothing)" in text and "| m | 1 | 100 | 5.0 % | 0.6667 |" in text
