"""``changedet evaluate`` / :func:`evaluate_mask` give the right counts or refuse with one reason: masks
that are not 0/1, label nodata, labels aligned by georeference (partial, offset, other CRS, south-up),
labels without CRS, and change values that do not fit the label."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import Resampling, calculate_default_transform, reproject

from changedet.cli import main
from changedet.errors import GridError, InputError
from changedet.evaluate import evaluate_mask
from changedet.pipeline.grid import Grid
from tests.conftest import write_raster

H = W = 40
T = Affine(10.0, 0, 500000.0, 0, -10.0, 5400000.0)
RNG = np.random.default_rng(7)
LABEL = np.kron(RNG.random((5, 5)) < 0.4, np.ones((8, 8))).astype(np.uint8)  # 8x8 px blocks of change
PRED = np.where(RNG.random((H, W)) < 0.1, 1 - LABEL, LABEL).astype(np.uint8)  # 10 % of pixels wrong
PRED[:4, :4] = 255  # prediction nodata


def _counts(pred: np.ndarray, label: np.ndarray, scored: np.ndarray, change: int = 1) -> dict[str, int]:
    p, t = pred[scored] == 1, label[scored] == change
    return {"tp": int(np.sum(p & t)), "fp": int(np.sum(p & ~t)), "fn": int(np.sum(~p & t)), "tn": int(np.sum(~p & ~t))}


def _pred(tmp_path: Path, data: np.ndarray = PRED, **kwargs) -> Path:
    return write_raster(tmp_path / "change_mask.tif", data, **{"nodata": 255, **kwargs})


def _cli_json(capsys, pred: Path, label: Path, *extra: str) -> dict:
    rc = main(["evaluate", "--pred", str(pred), "--label", str(label), "--json", *extra])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def _cli_refusal(capsys, pred: Path, label: Path, *extra: str) -> str:
    rc = main(["evaluate", "--pred", str(pred), "--label", str(label), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# 1. the prediction must be one band of 0/1

@pytest.mark.parametrize("name, data, nodata, found", [
    ("change_probability.tif", np.linspace(0.013, 0.97, H * W, dtype=np.float32).reshape(H, W), -9999.0,
     "(float32, values 0.013..0.97)"),
    ("difference.tif", np.linspace(-3, 5, H * W, dtype=np.float32).reshape(H, W), -9999.0, "(float32, values -3..5)"),
    ("mask_0_255.tif", LABEL * np.uint8(255), None, "(uint8, values 0..255)"),
    ("classes.tif", LABEL * np.uint8(3), 255, "(uint8, values 0..3)"),
])
def test_prediction_that_is_not_a_01_mask_is_refused(tmp_path, capsys, name, data, nodata, found):
    pred = write_raster(tmp_path / name, data, nodata=nodata)
    label = write_raster(tmp_path / "label.tif", LABEL)
    with pytest.raises(InputError, match="is not a 0/1 change mask") as exc:
        evaluate_mask(pred, label)
    assert f"prediction {name} is not a 0/1 change mask {found}" in str(exc.value)
    assert "pass change_mask.tif" in str(exc.value)
    assert found in _cli_refusal(capsys, pred, label)


def test_multiband_prediction_is_refused(tmp_path, capsys):
    pred = write_raster(tmp_path / "pred.tif", np.stack([PRED, PRED]), nodata=255)
    label = write_raster(tmp_path / "label.tif", LABEL)
    with pytest.raises(InputError, match="prediction pred.tif has 2 bands"):
        evaluate_mask(pred, label)
    assert "has 2 bands" in _cli_refusal(capsys, pred, label)


# 2. label nodata and masked pixels are never scored

@pytest.mark.parametrize("change_value", [None, 1])
@pytest.mark.parametrize("how", ["nodata", "mask"])
def test_label_nodata_and_mask_are_not_scored(tmp_path, capsys, change_value, how):
    label = LABEL.copy()
    hole = np.zeros((H, W), bool)
    hole[10:16, :] = True
    path = tmp_path / "label.tif"
    if how == "nodata":
        label[hole] = 255
        write_raster(path, label, nodata=255)
    else:
        with rasterio.open(path, "w", driver="GTiff", width=W, height=H, count=1, dtype="uint8", crs="EPSG:32631",
                           transform=T) as dst:
            dst.write(label, 1)
            dst.write_mask(np.where(hole, 0, 255).astype(np.uint8))
    pred = _pred(tmp_path)
    scored = (PRED != 255) & ~hole
    extra = [] if change_value is None else ["--change-value", str(change_value)]
    with pytest.warns(UserWarning, match=f"{np.sum((PRED != 255) & hole)} valid prediction pixels are outside"):
        metrics = evaluate_mask(pred, path, change_value)
        assert _cli_json(capsys, pred, path, *extra) == metrics
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, LABEL, scored)
    assert metrics["change_value"] == 1 and metrics["scored_pixels"] == scored.sum()
    assert metrics["unscored_pixels"] == np.sum((PRED != 255) & hole)


def test_label_nodata_that_is_its_no_change_value_is_refused(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL, nodata=0)  # a mis-declared 0/1 mask
    pred = _pred(tmp_path)
    with pytest.raises(InputError, match="declares nodata 0, which is also its no-change value"):
        evaluate_mask(pred, label)
    assert "no-change value" in _cli_refusal(capsys, pred, label)


# 3. / 5. labels are aligned by georeference and only the pixels they cover are scored

def test_label_covering_half_the_prediction_scores_only_that_half(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL[:, : W // 2])
    pred = _pred(tmp_path)
    half = np.zeros((H, W), bool)
    half[:, : W // 2] = True
    scored = (PRED != 255) & half
    with pytest.warns(UserWarning, match="not scored"):
        metrics = evaluate_mask(pred, label)
        assert _cli_json(capsys, pred, label) == metrics
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, LABEL, scored)
    assert metrics["scored_pixels"] == scored.sum() and metrics["unscored_pixels"] == np.sum((PRED != 255) & ~half)


def test_offset_label_on_the_same_lattice(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL, transform=T * Affine.translation(5, 7))  # 5 cols, 7 rows on
    pred = _pred(tmp_path)
    shifted = np.zeros((H, W), np.uint8)
    shifted[7:, 5:] = LABEL[: H - 7, : W - 5]
    covered = np.zeros((H, W), bool)
    covered[7:, 5:] = True
    with pytest.warns(UserWarning, match="not scored"):
        metrics = evaluate_mask(pred, label)
        assert _cli_json(capsys, pred, label) == metrics
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, shifted, (PRED != 255) & covered)


def test_label_that_does_not_overlap_is_refused(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL, transform=T * Affine.translation(W + 10, 0))
    pred = _pred(tmp_path)
    with pytest.raises(InputError, match="share no valid pixel"):
        evaluate_mask(pred, label)
    assert "share no valid pixel" in _cli_refusal(capsys, pred, label)


def test_label_in_another_crs_gives_nearly_the_same_metrics(tmp_path, capsys):
    transform, width, height = calculate_default_transform("EPSG:32631", "EPSG:4326", W, H,
                                                           *Grid(None, T, W, H).bounds)
    warped = np.full((height, width), 255, np.uint8)
    reproject(LABEL, warped, src_transform=T, src_crs="EPSG:32631", dst_transform=transform, dst_crs="EPSG:4326",
              resampling=Resampling.nearest, dst_nodata=255)
    label_utm = write_raster(tmp_path / "label_utm.tif", LABEL)
    label_geo = write_raster(tmp_path / "label_4326.tif", warped, crs="EPSG:4326", transform=transform, nodata=255)
    pred = _pred(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few edge pixels fall outside the warped label
        same, other = evaluate_mask(pred, label_utm), evaluate_mask(pred, label_geo)
    assert other["f1"] == pytest.approx(same["f1"], abs=0.03) and other["change_value"] == 1
    assert 0.9 * same["scored_pixels"] <= other["scored_pixels"] <= same["scored_pixels"]
    assert other["scored_pixels"] + other["unscored_pixels"] == same["scored_pixels"]
    assert _cli_json(capsys, pred, label_geo)["tp"] == other["tp"]


def test_south_up_label_equals_the_north_up_one(tmp_path, capsys):
    north = write_raster(tmp_path / "north.tif", LABEL[:, :30])
    south = write_raster(tmp_path / "south.tif", LABEL[::-1, :30].copy(),
                         transform=Affine(10.0, 0, 500000.0, 0, 10.0, 5400000.0 - 10.0 * H))
    pred = _pred(tmp_path)
    with pytest.warns(UserWarning, match="not scored"):  # the labels cover 30 of the 40 columns
        expected = evaluate_mask(pred, north)
        assert evaluate_mask(pred, south) == expected
        assert _cli_json(capsys, pred, south) == expected
    assert expected["unscored_pixels"] == np.sum(PRED[:, 30:] != 255)


def test_coarser_label_is_read_by_nearest(tmp_path, capsys):
    label = write_raster(tmp_path / "label_20m.tif", LABEL[::2, ::2].copy(), transform=T * Affine.scale(2))
    pred = _pred(tmp_path)
    metrics = evaluate_mask(pred, label)  # 8-px blocks: each 10 m pixel takes the 20 m pixel under its centre
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, LABEL, PRED != 255)
    assert _cli_json(capsys, pred, label) == metrics


def test_south_up_prediction_is_warped_onto(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL)
    pred = _pred(tmp_path, PRED[::-1].copy(), transform=Affine(10.0, 0, 500000.0, 0, 10.0, 5400000.0 - 10.0 * H))
    metrics = evaluate_mask(pred, label)
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, LABEL, PRED != 255)
    assert _cli_json(capsys, pred, label)["fp"] == metrics["fp"]


# 4. a label without CRS is placed only where we know it lies

def _run_json(tmp_path: Path, grid: Grid) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"reference_grid": grid.to_dict()}))


def test_label_without_crs_not_matching_run_json_reference_is_refused(tmp_path, capsys):
    _run_json(tmp_path, Grid(rasterio.crs.CRS.from_epsg(32631), T * Affine.translation(-5, -5), W + 10, H + 10))
    label = write_raster(tmp_path / "label.tif", LABEL, crs=None)  # the prediction's shape, not t1's
    pred = _pred(tmp_path)
    with pytest.raises(GridError, match=r"is 40x40 px, but t1's grid recorded in run.json is 50x50 px"):
        evaluate_mask(pred, label)
    assert "50x50" in _cli_refusal(capsys, pred, label)


def test_label_without_crs_on_the_run_json_reference(tmp_path, capsys):
    _run_json(tmp_path, Grid(rasterio.crs.CRS.from_epsg(32631), T * Affine.translation(-5, -5), W + 10, H + 10))
    big = np.zeros((H + 10, W + 10), np.uint8)
    big[5:-5, 5:-5] = LABEL
    label = write_raster(tmp_path / "label.tif", big, crs=None)
    pred = _pred(tmp_path)
    metrics = evaluate_mask(pred, label)
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, LABEL, PRED != 255)
    assert metrics["unscored_pixels"] == 0 and _cli_json(capsys, pred, label)["tp"] == metrics["tp"]


def test_label_without_crs_and_no_run_json_is_assumed_on_the_prediction_grid(tmp_path):
    label = write_raster(tmp_path / "label.tif", LABEL, crs=None)
    with pytest.warns(UserWarning, match="label label.tif has no georeference: assuming it is on the prediction's"):
        metrics = evaluate_mask(_pred(tmp_path), label)
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, LABEL, PRED != 255)


def test_label_without_crs_of_another_shape_is_refused(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL[:30], crs=None)
    for pred in (_pred(tmp_path), write_raster(tmp_path / "plain.tif", PRED, crs=None, nodata=255)):
        with pytest.raises(GridError, match="is 30x40 px but the prediction is 40x40 px"):
            evaluate_mask(pred, label)
        assert "30x40" in _cli_refusal(capsys, pred, label)


def test_georeferenced_label_against_a_plain_prediction_is_refused(tmp_path, capsys):
    pred = write_raster(tmp_path / "plain.tif", PRED, crs=None, nodata=255)
    label = write_raster(tmp_path / "label.tif", LABEL)
    with pytest.raises(GridError, match="is georeferenced but the prediction plain.tif is not"):
        evaluate_mask(pred, label)
    assert "georeferenced" in _cli_refusal(capsys, pred, label)


# 6. a change value must fit the label's values

@pytest.mark.parametrize("data, change_value, found", [
    (LABEL + 1, 1, "[2] besides change 1 and no-change 0"),  # OSCD 1/2 coding read as change 1
    (LABEL + 1, 255, "[1, 2] besides change 255 and no-change 0"),
    (np.where(LABEL == 1, 2, LABEL), 1, "[2] besides change 1 and no-change 0"),
    (LABEL, 2, "[0] besides change 2 and no-change 1"),
])
def test_change_value_that_does_not_fit_the_label_is_refused(tmp_path, capsys, data, change_value, found):
    label = write_raster(tmp_path / "label.tif", data.astype(np.uint8))
    pred = _pred(tmp_path)
    with pytest.raises(InputError, match="pass --ignore-value") as exc:
        evaluate_mask(pred, label, change_value)
    assert found in str(exc.value)
    assert found in _cli_refusal(capsys, pred, label, "--change-value", str(change_value))


def test_change_value_with_ignored_values_and_absent_change_are_accepted(tmp_path, capsys):
    oscd = np.where(LABEL == 1, 2, 1).astype(np.uint8)
    oscd[:, :8] = 0  # unknown
    label = write_raster(tmp_path / "label.tif", oscd)
    pred = _pred(tmp_path)
    metrics = _cli_json(capsys, pred, label, "--change-value", "2", "--ignore-value", "0")
    known = (PRED != 255) & (oscd != 0)
    assert {k: metrics[k] for k in ("tp", "fp", "fn", "tn")} == _counts(PRED, oscd, known, change=2)
    assert metrics["ignored_pixels"] == np.sum((PRED != 255) & (oscd == 0)) and metrics["unscored_pixels"] == 0
    empty = write_raster(tmp_path / "empty.tif", np.zeros((H, W), np.uint8))  # no change at all: allowed
    assert evaluate_mask(pred, empty, 1)["tp"] == 0


# 7. the coding is the whole label's, not the part under the prediction; ambiguous codings are refused

def test_coding_is_inferred_from_the_whole_label(tmp_path, capsys):
    oscd = np.ones((H, W), np.uint8)
    oscd[:8, 24:32] = 2  # change only outside the prediction's rows below
    label = write_raster(tmp_path / "label.tif", oscd)
    south = T * Affine.translation(0, 20)
    pred = write_raster(tmp_path / "change_mask.tif", np.zeros((20, W), np.uint8), nodata=255, transform=south)
    metrics = _cli_json(capsys, pred, label)
    assert metrics["change_value"] == 2 and metrics["tn"] == 20 * W and metrics["oa"] == 1.0


@pytest.mark.parametrize("values", [[1], [0, 2]])
def test_ambiguous_label_coding_is_refused(values, tmp_path, capsys):
    data = np.full((H, W), values[0], np.uint8)
    data[10:20, 10:20] = values[-1]
    label = write_raster(tmp_path / "label.tif", data)
    assert "ambiguous" in _cli_refusal(capsys, _pred(tmp_path), label)
    assert _cli_json(capsys, _pred(tmp_path), label, "--change-value", str(values[-1]))["change_value"] == values[-1]


def test_change_value_that_is_also_ignored_is_refused(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", LABEL)
    assert "also an --ignore-value" in _cli_refusal(capsys, _pred(tmp_path), label, "--change-value", "1", "--ignore-value", "1")


def test_json_has_no_nan(tmp_path, capsys):
    label = write_raster(tmp_path / "label.tif", np.zeros((H, W), np.uint8))
    rc = main(["evaluate", "--pred", str(_pred(tmp_path, np.zeros((H, W), np.uint8))), "--label", str(label), "--json"])
    text = capsys.readouterr().out
    assert rc == 0 and "NaN" not in text and json.loads(text)["recall"] is None


# 8. a label without CRS lies on t1's own grid, even when the outputs are on another one

@pytest.mark.parametrize("how", ["south-up t1", "reprojected"])
def test_label_without_crs_follows_t1s_own_grid(how, tmp_path, capsys):
    from changedet.pipeline.detect import MASK, DetectParams, detect_changes

    rng = np.random.default_rng(4)
    t1 = rng.integers(1000, 2000, (3, 64, 64)).astype(np.uint16)
    t2 = t1.copy()
    t2[:, 16:32, 32:48] += 3000
    truth = np.zeros((64, 64), np.uint8)
    truth[16:32, 32:48] = 1
    if how == "south-up t1":  # rows stored bottom-up: the label without CRS is in t1's stored pixel order
        t1, t2, truth = t1[:, ::-1].copy(), t2[:, ::-1].copy(), truth[::-1].copy()
        transform, crs = Affine(10.0, 0, 500000.0, 0, 10.0, 5400000.0 - 640), None
    else:
        transform, crs = T, "EPSG:32632"
    a = write_raster(tmp_path / "a.tif", t1, transform=transform)
    b = write_raster(tmp_path / "b.tif", t2, transform=transform)
    label = write_raster(tmp_path / "label.tif", truth, crs=None)
    result = detect_changes(a, b, tmp_path / "out", DetectParams(model="cva", tile=32, overlap=8, crs=crs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate_mask(result.path(MASK), label)
    assert metrics["f1"] > 0.9, metrics
