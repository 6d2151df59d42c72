"""Grids of any affine (rotated, sheared, south-up, east-to-west), ``--resolution`` units, input paths
and globs, ``--nodata`` against declared nodata, band colour interpretation and selection by description.
Runs go through :func:`detect_changes` (outputs checked against the planned grid) or the CLI (refusals)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window

from changedet.pipeline.align import PairReader, align_pair
from changedet.cli import main
from changedet.pipeline.detect import PROBABILITY, RUN_JSON, DetectParams, detect_changes
from changedet.errors import GridError, InputError
from changedet.pipeline.grid import Grid
from changedet.io.scene import open_scene

from tests.conftest import write_raster

UTM = CRS.from_epsg(32631)
NORTH_UP = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5400000.0)
PARAMS = dict(model="cva", tile=32, overlap=8)


def _pair_data(bands: int = 3, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d1 = rng.random((bands, size, size)).astype(np.float32)
    d2 = d1 + rng.normal(0, 0.01, d1.shape).astype(np.float32)
    d2[:, 20:36, 24:44] += 1.5
    return d1, d2


def _detect(t1: Path, t2: Path, out: Path, **params) -> tuple[Grid, np.ndarray, dict]:
    """Run detect; return the planned grid, the probability raster (checked to carry that grid) and run.json."""
    planned: list[Grid] = []
    result = detect_changes(t1, t2, out, DetectParams(**{**PARAMS, **params}), on_planned=lambda p: planned.append(p.pair.grid))
    grid = planned[0]
    with rasterio.open(result.path(PROBABILITY)) as ds:
        assert ds.crs == grid.crs and ds.transform == grid.transform and ds.shape == grid.shape
        assert ds.nodata == -9999.0
        prob = ds.read(1)
    summary = json.loads(result.path(RUN_JSON).read_text())
    assert Affine(*summary["grid"]["transform"]) == grid.transform
    return grid, prob, summary


def _refuse(capsys, *args: str) -> str:
    """Run the CLI; assert exit 2 and exactly one ``error:`` line (the last); return its reason."""
    rc = main(["detect", *args, "--model", "cva", "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0][len("error: "):]


# 1. Grid footprints, bounds, resolution and lattices for any affine --------------------------------


def _corners(transform: Affine, width: int, height: int) -> list[tuple[float, float]]:
    return [transform * (c, r) for c in (0, width) for r in (0, height)]


@pytest.mark.parametrize("transform", [NORTH_UP * Affine.rotation(30), NORTH_UP * Affine.shear(15, 0)])
def test_bounds_and_res_of_a_rotated_or_sheared_grid(transform):
    grid = Grid(UTM, transform, 40, 20)
    xs, ys = zip(*_corners(transform, 40, 20))
    assert grid.bounds == pytest.approx((min(xs), min(ys), max(xs), max(ys)))
    assert grid.res == pytest.approx((math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)))
    assert grid.pixel_area == pytest.approx(100.0) and not grid.is_north_up and not grid.is_axis_aligned


def test_rotated_pixel_size_is_the_pixel_side():
    assert Grid(UTM, NORTH_UP * Affine.rotation(20), 8, 8).res == pytest.approx((10.0, 10.0))


def test_same_lattice_and_window_of_identical_rotated_grids():
    rotated = Grid(UTM, NORTH_UP * Affine.rotation(20), 50, 40)
    sub = rotated.window(Window(5, 7, 10, 12))
    assert rotated.same_lattice(sub)
    assert rotated.window_of(sub) == Window(5, 7, 10, 12)
    assert not rotated.same_lattice(Grid(UTM, NORTH_UP * Affine.rotation(21), 50, 40))


AXIS_ALIGNED = [NORTH_UP, Affine(10.0, 0, 500000.0, 0, 10.0, 5399000.0), Affine(-10.0, 0, 500640.0, 0, -10.0, 5400000.0)]
AXIS_IDS = ["north-up", "south-up", "east-to-west"]


@pytest.mark.parametrize("transform", AXIS_ALIGNED, ids=AXIS_IDS)
def test_window_of_and_clip_to_bounds_for_axis_aligned_grids(transform):
    grid = Grid(UTM, transform, 64, 48)
    sub = grid.window(Window(10, 5, 20, 30))
    assert grid.same_lattice(sub) and grid.window_of(sub) == Window(10, 5, 20, 30)
    assert not grid.same_lattice(Grid(UTM, Affine(-transform.a, 0, 0, 0, transform.e, 0), 64, 48))
    left, bottom, right, top = sub.bounds
    # a box a little (< half a pixel) larger and smaller than the sub-grid keeps exactly its pixels
    assert grid.clip_to_bounds((left - 4, bottom + 4, right + 4, top - 4)) == sub


@pytest.mark.parametrize("transform", AXIS_ALIGNED, ids=AXIS_IDS)
def test_north_up_of_an_axis_aligned_grid_is_the_same_pixels_flipped(transform):
    grid = Grid(UTM, transform, 64, 48)
    north_up = grid.north_up()
    assert north_up.is_north_up and north_up.res == grid.res and north_up.shape == grid.shape
    assert north_up.bounds == grid.bounds and (north_up is grid) == grid.is_north_up


@pytest.mark.parametrize("transform", [NORTH_UP, Affine(10.0, 0, 500000.0, 0, 10.0, 5399360.0)], ids=["north-up", "south-up"])
def test_clip_to_bounds_keeps_only_pixels_more_than_half_inside(transform):
    grid = Grid(UTM, transform, 64, 64)
    left, bottom, right, top = grid.bounds
    for shift in (5.0, 15.0, 25.0):  # 0.5, 1.5, 2.5 px: exact halves are dropped on every side alike
        clipped = grid.clip_to_bounds((left + shift, bottom + shift, right - shift, top - shift))
        n = int(shift // 10) + 1
        assert clipped.shape == (64 - 2 * n, 64 - 2 * n) and grid.window_of(clipped) == Window(n, n, 64 - 2 * n, 64 - 2 * n)
    assert grid.clip_to_bounds((left + 4.0, bottom + 6.0, right - 6.0, top - 4.0)).shape == (63, 63)


def test_clip_to_bounds_refuses_a_rotated_grid():
    with pytest.raises(GridError, match="rotated"):
        Grid(UTM, NORTH_UP * Affine.rotation(20), 64, 64).clip_to_bounds((500000, 5399500, 500300, 5400000))


# 2. Rotated, sheared and south-up inputs end to end -------------------------------------------------


@pytest.mark.parametrize("skew", [Affine.rotation(20), Affine.shear(10, 0)], ids=["rotated", "sheared"])
def test_rotated_t1_gives_a_north_up_grid_with_a_warning(tmp_path, skew):
    transform = NORTH_UP * skew
    d1, d2 = _pair_data()
    t1 = write_raster(tmp_path / "t1.tif", d1, transform=transform)
    t2 = write_raster(tmp_path / "t2.tif", d2, transform=transform)
    with pytest.warns(UserWarning, match="rotated/sheared.*north-up"):
        grid, prob, _ = _detect(t1, t2, tmp_path / "out")
    source = Grid(UTM, transform, 64, 64)
    expected = calculate_default_transform(UTM, UTM, 64, 64, *source.bounds, resolution=source.res)
    assert grid.crs == UTM and grid.is_north_up
    assert grid.res == pytest.approx(source.res, rel=1e-9)
    assert grid.transform.almost_equals(expected[0], precision=1e-6)
    # the box around the footprint, clipped to the pixels more than half inside it
    left, bottom, right, top = source.bounds
    assert grid.shape == (round((top - bottom) / grid.res[1]), round((right - left) / grid.res[0]))
    assert grid.shape[0] <= expected[2] and grid.shape[1] <= expected[1]
    # pixel centres outside the skewed footprint are nodata, inside are valid
    rows, cols = np.mgrid[0 : grid.height, 0 : grid.width] + 0.5
    xs, ys = grid.transform * (cols, rows)
    c, r = ~transform * (xs, ys)
    inside = (c > 1) & (c < 63) & (r > 1) & (r < 63)
    outside = (c < -1) | (c > 65) | (r < -1) | (r > 65)
    assert (prob[inside] != -9999).all() and (prob[outside] == -9999).all() and outside.any()
    # the change patch (t1 pixels rows 20:36, cols 24:44) is found where it lies on the ground
    patch = (c > 26) & (c < 42) & (r > 22) & (r < 34)
    assert prob[patch].min() > 0.5 and np.median(prob[inside & ~patch]) < 0.5


def test_rotated_pair_through_the_cli(tmp_path, capsys):
    transform = NORTH_UP * Affine.rotation(-30)
    d1, d2 = _pair_data()
    t1 = write_raster(tmp_path / "t1.tif", d1, transform=transform)
    t2 = write_raster(tmp_path / "t2.tif", d2, transform=transform)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"t1's geotransform is rotated/sheared \(.*t1.tif\)"):
        rc = main(["detect", "--t1", str(t1), "--t2", str(t2), "--out", str(out), "--model", "cva", "--quiet",
                   "--tile", "32", "--overlap", "8"])
    assert rc == 0 and "error" not in capsys.readouterr().err
    grid = Grid.from_dict(json.loads((out / RUN_JSON).read_text())["grid"])
    for name in ("change_probability.tif", "change_mask.tif", "difference.tif"):
        with rasterio.open(out / name) as ds:
            assert Grid.from_dataset(ds) == grid and grid.is_north_up and grid.res == (10.0, 10.0)


def test_rotated_t2_clips_the_t1_grid_to_its_whole_footprint(tmp_path):
    d1, d2 = _pair_data(size=96)
    rotated = Affine(10.0, 0, 500300.0, 0, -10.0, 5399700.0) * Affine.rotation(25)
    t1 = write_raster(tmp_path / "t1.tif", d1, transform=NORTH_UP)
    t2 = write_raster(tmp_path / "t2.tif", d2[:, :48, :48].copy(), transform=rotated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # t1 is north-up: no warning
        grid, prob, _ = _detect(t1, t2, tmp_path / "out")
    xs, ys = zip(*_corners(rotated, 48, 48))
    footprint = (min(xs), min(ys), max(xs), max(ys))
    assert Grid(UTM, NORTH_UP, 96, 96).same_lattice(grid)
    assert grid.bounds == pytest.approx(footprint, abs=5.0)  # the box around all four corners, to half a pixel
    rows, cols = np.mgrid[0 : grid.height, 0 : grid.width] + 0.5
    c, r = ~rotated * (grid.transform * (cols, rows))
    assert (prob[(c > 1) & (c < 47) & (r > 1) & (r < 47)] != -9999).all()
    assert (prob[(c < -1) | (c > 49) | (r < -1) | (r > 49)] == -9999).all()


def test_south_up_t2_gives_the_same_change_map_as_north_up(tmp_path):
    d1, d2 = _pair_data()
    south_up = Affine(10.0, 0, 500000.0, 0, 10.0, 5400000.0 - 640)
    t1 = write_raster(tmp_path / "t1.tif", d1, transform=NORTH_UP)
    t2 = write_raster(tmp_path / "t2.tif", d2, transform=NORTH_UP)
    t2_flipped = write_raster(tmp_path / "t2s.tif", d2[:, ::-1].copy(), transform=south_up)
    grid, reference, _ = _detect(t1, t2, tmp_path / "ref")
    grid_s, prob, _ = _detect(t1, t2_flipped, tmp_path / "out")
    assert grid_s == grid == Grid(UTM, NORTH_UP, 64, 64)
    np.testing.assert_array_equal(prob, reference)


@pytest.mark.parametrize("orientation", ["south-up", "east-to-west"])
def test_flipped_t1_is_normalised_to_the_north_up_grid_with_a_warning(tmp_path, orientation):
    d1, d2 = _pair_data()
    if orientation == "south-up":
        flip, transform = (slice(None), slice(None, None, -1)), Affine(10.0, 0, 500000.0, 0, 10.0, 5399360.0)
    else:
        flip, transform = (slice(None), slice(None), slice(None, None, -1)), Affine(-10.0, 0, 500640.0, 0, -10.0, 5400000.0)
    ref_grid, reference, _ = _detect(write_raster(tmp_path / "n1.tif", d1), write_raster(tmp_path / "n2.tif", d2), tmp_path / "ref")
    t1 = write_raster(tmp_path / "t1.tif", d1[flip].copy(), transform=transform)
    t2 = write_raster(tmp_path / "t2.tif", d2[flip].copy(), transform=transform)
    with pytest.warns(UserWarning, match=f"{orientation}.*north-up"):
        grid, prob, _ = _detect(t1, t2, tmp_path / "out")
    assert grid == ref_grid == Grid(UTM, NORTH_UP, 64, 64)
    np.testing.assert_array_equal(prob, reference)


def test_pixel_grids_without_crs_ignore_a_geotransform_on_one_date(tmp_path):
    d1, d2 = _pair_data()
    profile = dict(driver="GTiff", width=64, height=64, count=3, dtype="float32")
    with rasterio.open(tmp_path / "t1.tif", "w", transform=Affine(10, 0, 100, 0, -10, 1000), **profile) as ds:
        ds.write(d1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(tmp_path / "t2.tif", "w", **profile) as ds:
            ds.write(d2)
        grid, prob, _ = _detect(tmp_path / "t1.tif", tmp_path / "t2.tif", tmp_path / "out")
    assert grid.crs is None and grid.shape == (64, 64)
    assert (prob != -9999).all() and prob[24:32, 28:40].min() > 0.5


# 3. --resolution against the units of the target CRS ---------------------------------------------


def test_resolution_in_degrees_coarser_than_a_geographic_scene_is_refused(tmp_path, capsys):
    data = np.random.default_rng(1).random((2, 45, 60)).astype(np.float32)
    transform = Affine(0.0002, 0, 2.30, 0, -0.0002, 48.86)
    t1 = write_raster(tmp_path / "t1.tif", data, crs="EPSG:4326", transform=transform)
    t2 = write_raster(tmp_path / "t2.tif", data + 0.1, crs="EPSG:4326", transform=transform)
    reason = _refuse(capsys, "--t1", str(t1), "--t2", str(t2), "--out", str(tmp_path / "out"), "--resolution", "10")
    assert reason.startswith("--resolution 10 is in degrees (the unit of EPSG:4326)")
    assert "0.012 x 0.009 degrees" in reason and "metres" in reason and "EPSG:32631" in reason
    assert not (tmp_path / "out").exists()


def test_resolution_in_metres_coarser_than_a_projected_scene_is_refused(tmp_path, capsys):
    d1, d2 = _pair_data()
    t1, t2 = write_raster(tmp_path / "t1.tif", d1), write_raster(tmp_path / "t2.tif", d2)
    reason = _refuse(capsys, "--t1", str(t1), "--t2", str(t2), "--out", str(tmp_path / "out"), "--resolution", "700")
    assert reason.startswith("--resolution 700 is in metres (the unit of EPSG:32631)") and "640 x 640 metres" in reason


def test_resolution_within_the_scene_in_degrees_is_used(tmp_path):
    data = np.random.default_rng(1).random((2, 45, 60)).astype(np.float32)
    transform = Affine(0.0002, 0, 2.30, 0, -0.0002, 48.86)
    t1 = write_raster(tmp_path / "t1.tif", data, crs="EPSG:4326", transform=transform)
    t2 = write_raster(tmp_path / "t2.tif", data + 0.1, crs="EPSG:4326", transform=transform)
    grid, _, _ = _detect(t1, t2, tmp_path / "out", resolution=0.0003)
    assert grid.crs == CRS.from_epsg(4326) and grid.res == pytest.approx((0.0003, 0.0003)) and grid.shape == (30, 40)


def test_resolution_on_pixel_grids_is_refused(tmp_path, capsys):
    d1, d2 = _pair_data()
    t1 = write_raster(tmp_path / "t1.tif", d1, crs=None)
    t2 = write_raster(tmp_path / "t2.tif", d2, crs=None)
    reason = _refuse(capsys, "--t1", str(t1), "--t2", str(t2), "--out", str(tmp_path / "out"), "--resolution", "10")
    assert "need georeferenced inputs" in reason


# 4. Paths and globs ---------------------------------------------------------------------------------


def _band_folder(folder: Path, names: tuple[str, ...] = ("B02", "B03", "B04")) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        write_raster(folder / f"S2_{name}.tif", np.full((16, 16), i, np.float32))
    return folder


def test_an_existing_file_with_glob_characters_is_a_path(tmp_path):
    write_raster(tmp_path / "scene1.tif", np.zeros((1, 8, 8), np.float32))  # what the glob would match
    literal = write_raster(tmp_path / "scene[1].tif", np.zeros((3, 8, 8), np.float32))
    scene = open_scene(literal)
    assert scene.count == 3 and {b.path for b in scene.bands} == {str(literal)}


def test_an_existing_folder_with_glob_characters_is_a_path(tmp_path):
    folder = _band_folder(tmp_path / "a*b")
    _band_folder(tmp_path / "axb", ("B08",))
    scene = open_scene(folder)
    assert scene.band_names == ("B02", "B03", "B04") and all(b.path.startswith(str(folder)) for b in scene.bands)


def test_a_glob_ignores_folders_hidden_and_non_raster_files(tmp_path):
    folder = _band_folder(tmp_path / "imgs")
    (folder / "S2_B08.tif.aux.xml").write_text("<PAMDataset/>")
    (folder / "S2_notes.txt").write_text("not a raster")
    (folder / "S2_sub").mkdir()
    (folder / "._S2_B05.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert open_scene(str(folder / "*")).band_names == ("B02", "B03", "B04")
    assert open_scene(str(folder / "*S2_*")).band_names == ("B02", "B03", "B04")
    assert open_scene(folder).band_names == ("B02", "B03", "B04")


def test_a_glob_matching_nothing_usable_is_refused(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    (tmp_path / "docs" / "sub").mkdir()
    pattern = str(tmp_path / "docs" / "*")
    reason = _refuse(capsys, "--t1", pattern, "--t2", pattern, "--out", str(tmp_path / "out"))
    assert reason.startswith(f"pattern {pattern} matches no raster file") and "readme.txt" in reason


def test_a_folder_of_sub_folders_only_contains_no_raster_files(tmp_path, capsys):
    _band_folder(tmp_path / "city" / "imgs_1")
    _band_folder(tmp_path / "city" / "imgs_2")
    with pytest.raises(InputError, match=r"contains no raster files.*sub-folders \(imgs_1/, imgs_2/\)"):
        open_scene(tmp_path / "city")
    reason = _refuse(capsys, "--t1", str(tmp_path / "city"), "--t2", str(tmp_path / "city"), "--out", str(tmp_path / "o"))
    assert "contains no raster files" in reason


def test_a_hidden_file_only_folder_contains_no_raster_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "._B01.tif").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(InputError, match="contains no raster files"):
        open_scene(tmp_path / "imgs")


# 5. --nodata applies only where no nodata is declared ----------------------------------------------


def test_nodata_option_does_not_override_a_declared_nodata(tmp_path):
    d1, d2 = _pair_data(bands=1)
    d1[0, :4], d1[0, 4:8] = 0.0, -1.0  # rows 0-3: declared nodata; rows 4-7: the --nodata value
    t1 = write_raster(tmp_path / "t1.tif", d1, nodata=0.0)
    t2 = write_raster(tmp_path / "t2.tif", d2)
    assert open_scene(t1, nodata=-1.0).bands[0].nodata == 0.0
    assert open_scene(t2, nodata=-1.0).bands[0].nodata == -1.0
    _, prob, _ = _detect(t1, t2, tmp_path / "out", nodata=-1.0)
    assert (prob[:4] == -9999).all() and (prob[4:8] != -9999).all()


# 6. Colour interpretation and selection by GDAL band description ----------------------------------


def test_colorinterp_is_recorded_per_band(tmp_path):
    path = tmp_path / "rgb.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8", crs=UTM,
                       transform=NORTH_UP, photometric="RGB") as ds:
        ds.write(np.zeros((3, 8, 8), np.uint8))
    assert [b.colorinterp for b in open_scene(path).bands] == ["red", "green", "blue"]
    gray = write_raster(tmp_path / "gray.tif", np.zeros((8, 8), np.float32))
    assert open_scene(gray).bands[0].colorinterp == "gray"


def _described(path: Path, descriptions: list[str], seed: int = 0, shift: float = 0.0) -> Path:
    data = np.random.default_rng(seed).random((len(descriptions), 32, 32)).astype(np.float32) + shift
    write_raster(path, data)
    with rasterio.open(path, "r+") as ds:
        for i, description in enumerate(descriptions, start=1):
            ds.set_band_description(i, description)
    return path


S2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def test_bands_are_selected_by_description_when_no_name_matches(tmp_path):
    t1 = _described(tmp_path / "t1.tif", S2)
    t2 = _described(tmp_path / "t2.tif", S2, shift=0.5)
    scene = open_scene(t1, ["b04", "B03", "B02", "B8A"])
    assert [b.index for b in scene.bands] == [4, 3, 2, 9] and scene.band_names == ("B4", "B3", "B2", "B9")
    assert [b.index for b in open_scene(t1, ["B2", "1"]).bands] == [2, 1]  # names and indexes first
    grid, _, summary = _detect(t1, t2, tmp_path / "out", bands=["B04", "B03", "B02"])
    assert summary["t1"]["bands"] == ["B4", "B3", "B2"] and grid.shape == (32, 32)


def test_a_description_wins_over_a_positional_name_and_duplicates_are_ambiguous(tmp_path):
    path = _described(tmp_path / "t.tif", ["B2", "nir", "NIR"])  # band 1 is described B2; band 2 is named B2 by position
    assert [b.index for b in open_scene(path, ["B2"]).bands] == [1]
    with pytest.raises(InputError, match=r"'nir'.*bands 2, 3"):
        open_scene(path, ["nir"])


def test_align_pair_keeps_band_reading_windowed_on_the_north_up_grid(tmp_path):
    d1, d2 = _pair_data()
    pair = align_pair(open_scene(write_raster(tmp_path / "t1.tif", d1)), open_scene(write_raster(tmp_path / "t2.tif", d2)))
    with PairReader(pair) as reader:
        x1, _, valid = reader.read(Window(0, 0, 64, 64))
        assert all(r.vrt is None for readers, _ in reader._readers for r in readers)
    assert valid.all() and np.array_equal(x1, d1)
