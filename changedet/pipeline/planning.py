"""Planning one detect run: parameters, inputs opened with the model's bands, common grid, tiles,
scene statistics and the content fingerprint — everything decided before any tile is predicted.

Degenerate inputs are refused here with their reason rather than turned into a plausible map: too few
valid pixels for a model that estimates scene statistics, a grid smaller than a spatial model's
input, bands whose declared roles are not the model's (see :mod:`changedet.io.bands`). Warnings
raised while planning (bands taken by position or reordered, grids without georeference, …) are kept
in :attr:`RunPlan.warnings` and written to ``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np

import changedet
from changedet.errors import CloudyError, InputError, ModelError
from changedet.normalization import Normalization
from changedet.pipeline.align import AlignedPair, PairReader, align_pair
from changedet.pipeline.clouds import CloudMask, cloud_mask, sun_angles
from changedet.pipeline.coregistration import Coregistration, measure_offset, shifted_scene
from changedet.pipeline.grid import Grid
from changedet.pipeline.params import DEFAULT_MODEL, DetectParams
from changedet.io.bands import model_roles, order_for_model, order_like, scene_roles
from changedet.io.remote import is_remote, remote_identity
from changedet.io.scene import BandSource, Scene, open_scene
from changedet.io.zones import read_zones
from changedet.pipeline.predictor import ModelSpec, SceneFit, TilePredictor, auto_model, resolve_model
from changedet.pipeline.smoothing import Smoothing
from changedet.pipeline.tiling import Tile
from changedet.pipeline.tilestore import TileStore
from changedet.sensor import sensor_for

MIN_SCENE_PIXELS = 100  # valid pixels a model needs to estimate scene statistics (CVA's Otsu, per-scene norms)
SCALE_DECADES = 1.0  # refuse a date whose typical band level is more than 10x off the model's training data
SCALE_WARN_DECADES = 0.5  # warn beyond ~3.2x (the 28 OSCD dates stay within 10^0.28 of their training mean)


@dataclass
class RunPlan:
    """Everything decided before predicting: small and picklable (sent to Dask workers)."""

    pair: AlignedPair
    tiles: list[Tile]
    batches: list[list[int]]
    spec: ModelSpec
    params: DetectParams
    threshold: float
    scene_fit: SceneFit
    fingerprint: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    predictor: TilePredictor | None = field(default=None, repr=False, compare=False)
    smoothing: Smoothing | None = None
    runtime: str = "torch"

    def __getstate__(self) -> dict:
        """Pickled without the planning process's model: other processes build their own."""
        return {**self.__dict__, "predictor": None}


def _hash_file(path: str, digest: "hashlib._Hash", chunk: int = 1 << 22) -> None:
    if is_remote(path):  # never downloaded whole: identified by URL and the server's ETag/size/date
        digest.update(remote_identity(path))
        return
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)


def content_fingerprint(t1: Scene, t2: Scene, spec: ModelSpec, params: DetectParams) -> str:
    """Hash of the input files' bytes, the model (checkpoint bytes or name+config) and every
    parameter that changes predictions — not of paths, so renamed or moved inputs still match.
    With a cloud mask, every file of each date counts (the mask reads bands the model does not)."""
    digest = hashlib.blake2b(digest_size=16)
    for scene in (t1, t2):
        bands = open_scene(scene.source, None, params.nodata).bands if params.cloud_mask != "none" else scene.bands
        for path in dict.fromkeys(b.path for b in bands):
            _hash_file(path, digest)
        digest.update(json.dumps([(b.name, b.index) for b in scene.bands]).encode())
    if spec.checkpoint is not None:
        _hash_file(str(spec.checkpoint), digest)
    if params.zones is not None and Path(params.zones).is_file():  # new zones, new outputs (a missing file is refused later)
        _hash_file(str(params.zones), digest)
    resolved = params.with_test_time(spec.metadata.get("test_time"))
    settings = {k: v for k, v in resolved.model_dump().items() if k not in ("model", "threshold", "device", "threads", "max_pixels")}
    settings["model"] = spec.name
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _model_label(params: DetectParams, spec: ModelSpec) -> str:
    return params.model if params.model != DEFAULT_MODEL else (spec.checkpoint.stem if spec.checkpoint else spec.name)


def open_inputs(t1: str | Path, t2: str | Path, params: DetectParams) -> tuple[Scene, Scene, ModelSpec]:
    """Resolve the model and open both dates with the model's bands, in the
    model's order (by band name for checkpoints with ``bands``, by declared role for ``channel_names``)."""
    first = None
    if params.model == DEFAULT_MODEL:
        first = open_scene(t1, params.bands, params.nodata)
        spec = auto_model(first.band_names, scene_roles(first))
    else:
        spec = resolve_model(params.model)
    bands1 = bands2 = list(params.bands) if params.bands else None
    if spec.bands is not None:
        if bands1 is not None and [b.upper() for b in bands1] != [b.upper() for b in spec.bands[0]]:
            raise ModelError(
                f"model {params.model} was trained on bands {','.join(spec.bands[0])}; "
                f"--bands {','.join(bands1)} does not match (omit --bands to let the model pick its bands)"
            )
        bands1, bands2 = spec.bands
    scene1 = first if first is not None and spec.bands is None else open_scene(t1, bands1, params.nodata)
    scene2 = open_scene(t2, bands2, params.nodata)
    if not spec.heterogeneous:  # band-by-band models: t2's bands in t1's order by declared role
        scene2 = order_like(scene1, scene2)
    roles = model_roles(spec.metadata.get("channel_names")) if spec.bands is None else None
    if roles is not None:
        label = _model_label(params, spec)
        scene1, scene2 = order_for_model(scene1, roles, label, "t1"), order_for_model(scene2, roles, label, "t2")
    spec.check_band_counts((scene1.count, scene2.count), (str(t1), str(t2)))
    return scene1, scene2, spec


def input_fingerprint(t1: str | Path, t2: str | Path, params: DetectParams) -> str:
    """:func:`content_fingerprint` straight from paths (what a cache key needs before planning)."""
    return content_fingerprint(*open_inputs(t1, t2, params), params)


#: ``view(x1, x2, valid) -> (x1, x2)``: the values of a raw tile that the scene fit samples
FitView = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _spread(tiles: list[Tile], count: int) -> np.ndarray:
    """Indices of up to ``count`` tiles spread evenly over the plan (first and last included)."""
    return np.unique(np.linspace(0, len(tiles) - 1, min(count, len(tiles))).astype(int))


def _sample_pixels(
    pair: AlignedPair, tiles: list[Tile], params: DetectParams, model: str, view: FitView | None = None, max_pixels: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Valid pixel samples ``(N, C)`` of both dates from up to ``sample_tiles`` evenly spread tiles
    (a random subset of each tile is kept, so memory stays at one tile). When those hold fewer than
    :data:`MIN_SCENE_PIXELS` distinct valid pixels, every other tile is scanned; a scene that still
    has fewer is refused: statistics (and CVA's Otsu threshold) of a handful of pixels mean nothing.
    ``view`` (the model's :meth:`~changedet.models.ChangeModel.fit_view`) turns each raw tile into the values sampled."""
    picks = _spread(tiles, params.sample_tiles)
    per_tile = max(1, max_pixels // len(picks))
    rng = np.random.default_rng(params.seed)
    width = pair.grid.width
    s1, s2, where = [], [], []

    def keep(tile: Tile, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> None:
        if view is not None:
            x1, x2 = view(x1, x2, valid)
        idx = np.flatnonzero(valid)
        idx = np.sort(rng.choice(idx, per_tile, replace=False)) if len(idx) > per_tile else idx
        rows, cols = np.divmod(idx, tile.width)
        global_idx = (rows + tile.row_off) * width + cols + tile.col_off
        new = ~np.isin(global_idx, np.concatenate(where)) if where else np.ones(len(idx), bool)
        s1.append(x1.reshape(x1.shape[0], -1)[:, idx[new]].T)
        s2.append(x2.reshape(x2.shape[0], -1)[:, idx[new]].T)
        where.append(global_idx[new])

    def count() -> int:
        return sum(len(w) for w in where)

    with PairReader(pair) as reader:
        for i in picks:
            keep(tiles[i], *reader.read(tiles[i].window))
        for i, tile in enumerate(tiles):
            if count() >= MIN_SCENE_PIXELS:
                break
            if i not in picks:
                keep(tile, *reader.read(tile.window))
    if count() == 0:
        raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    if count() < MIN_SCENE_PIXELS:
        raise InputError(
            f"only {count()} valid pixels where t1 and t2 overlap: model {model} estimates scene statistics and "
            f"needs at least {MIN_SCENE_PIXELS}; give a larger area or a model with stored statistics"
        )
    return np.concatenate(s1), np.concatenate(s2)


def _check_model_input_size(pair: AlignedPair, predictor: TilePredictor, model: str) -> None:
    smallest = predictor.min_input_size
    if min(pair.grid.shape) < smallest:
        raise InputError(
            f"common grid of {pair.grid.height} x {pair.grid.width} px is smaller than the {smallest} px "
            f"model {model} needs on each side (its encoder would see padding, not the scene)"
        )


def _check_radiometry(pair: AlignedPair, tiles: list[Tile], spec: ModelSpec, model: str) -> None:
    """Refuse a date on another radiometric scale than the checkpoint's training data (e.g. reflectance
    0–1 or 8-bit values given to a model trained on Sentinel-2 digital numbers): the median over bands
    of ``log10(scene median / training mean)``, from up to 4 spread tiles, must stay within
    :data:`SCALE_DECADES`, and beyond :data:`SCALE_WARN_DECADES` a warning says the scene is outside the
    training distribution (the run report shows it). Checkpoints with per-scene statistics, or non-positive training means (SAR in
    dB, standardised inputs), are not checked."""
    stored = spec.metadata.get("normalization")
    norm = None if stored is None else Normalization.of(stored)
    if norm is None or norm.per_scene:
        return
    means = {d: norm.dates[d][0] for d in (0, 1)}
    checked = {d: m for d, m in means.items() if (m > 0).all() and len(m) == (pair.t1, pair.t2)[d].count}
    if not checked:
        return
    with PairReader(pair) as reader:
        reads = [reader.read(tiles[i].window) for i in _spread(tiles, 4)]
    for d, mean in checked.items():
        date, scene = ("t1", "t2")[d], (pair.t1, pair.t2)[d]
        values = np.concatenate([r[d][:, r[2]] for r in reads], axis=1)
        if values.shape[1] == 0:
            continue
        level = np.median(values, axis=1)
        decades = np.log10(np.maximum(level, 1e-12) / mean)
        off = float(np.median(decades))
        if abs(off) > SCALE_DECADES:
            band = int(np.argmin(np.abs(decades - off)))
            raise InputError(
                f"{date} is on another radiometric scale than the data model {model} was trained on: its band levels "
                f"are about {10 ** abs(off):.3g}x {'lower' if off < 0 else 'higher'} (median {scene.band_names[band]} "
                f"{level[band]:.4g}, training mean {mean[band]:.4g}); give it in the model's units (the bundled "
                "Sentinel-2 model takes L1C digital numbers, reflectance x 10000)"
                + ("; most of its pixels are 0: if 0 is fill, pass --nodata 0" if np.median(level) == 0 else "")
            )
        if abs(off) > SCALE_WARN_DECADES:
            warnings.warn(f"{date}'s band levels are about {10 ** abs(off):.2g}x {'lower' if off < 0 else 'higher'} than "
                          f"model {model}'s training data: the scene is outside what it was trained on, expect lower "
                          "accuracy", stacklevel=2)  # fmt: skip


def coregistered(pair: AlignedPair, params: DetectParams, heterogeneous: bool) -> AlignedPair:
    """``pair`` with its measured t2 -> t1 offset (:func:`~changedet.pipeline.coregistration.measure_offset`)
    and, with ``params.coregister``, t2's georeference corrected and the common grid chosen again from the
    corrected footprint; refused when a correction is asked for but the offset is not trusted."""
    offset = measure_offset(pair)
    if not params.coregister:
        return replace(pair, coregistration=offset)
    if offset.shift_px is None:
        raise InputError(
            f"--coregister: the t2 -> t1 offset cannot be trusted ({offset.confidence} confidence: {offset.reason}); "
            "run without --coregister (the offset is still reported in run.json)"
        )
    t2 = shifted_scene(pair.t2, pair.grid, offset.shift_px)
    corrected = align_pair(pair.t1, t2, params.crs, params.resolution, params.resampling, heterogeneous, params.bbox)
    return replace(corrected, coregistration=replace(offset, applied=True))


def with_clouds(pair: AlignedPair, specs: tuple[str, str], params: DetectParams) -> AlignedPair:
    """``pair`` with the cloud masks of ``params.cloud_mask`` (:mod:`changedet.pipeline.clouds`); refused
    above ``params.max_cloud``. A date ``auto`` finds no bands for is unmasked, with a warning."""
    if params.cloud_mask == "none":
        return pair
    shift = pair.coregistration.shift_px if pair.coregistration is not None and pair.coregistration.applied else None
    masks = []
    for date, spec in enumerate(specs):
        mask = cloud_mask(spec, pair, date, params.cloud_mask, shift if date == 1 else None, sun_angles(spec))
        if mask is None:
            warnings.warn(f"--cloud-mask auto: {('t1', 't2')[date]} has neither an SCL band nor the s2cloudless bands; "
                          "its clouds are not masked", stacklevel=2)  # fmt: skip
        elif params.max_cloud is not None and mask.fraction > params.max_cloud:
            raise CloudyError(
                f"{('t1', 't2')[date]} is {mask.fraction:.1%} cloud or shadow ({mask.method}), above --max-cloud "
                f"{params.max_cloud:g} ({params.max_cloud:.0%}): choose a clearer acquisition or raise --max-cloud"
            )
        masks.append(mask)
    return replace(pair, clouds=(masks[0], masks[1]))


def plan_run(t1: str | Path, t2: str | Path, params: DetectParams, fingerprint: str | None = None) -> RunPlan:
    """Open both dates, resolve the model (choosing its bands), align, plan tiles, fit the scene.

    ``fingerprint``: the :func:`input_fingerprint` of these inputs when the caller has it already
    (the flow's cache key), so the input bytes are hashed once. Warnings raised while planning are
    shown and kept in :attr:`RunPlan.warnings`.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = _plan(t1, t2, params, fingerprint)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    plan.warnings.extend(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    return plan


def _plan(t1: str | Path, t2: str | Path, params: DetectParams, fingerprint: str | None) -> RunPlan:
    start = time.perf_counter()
    scene1, scene2, spec = open_inputs(t1, t2, params)
    params = params.with_test_time(spec.metadata.get("test_time"))
    pair = align_pair(scene1, scene2, params.crs, params.resolution, params.resampling, spec.heterogeneous, params.bbox)
    pixels = pair.grid.height * pair.grid.width
    if pixels > params.max_pixels:
        raise InputError(
            f"common grid of {pair.grid.height} x {pair.grid.width} px ({pixels / 1e9:.1f} Gpx) exceeds the limit of "
            f"{params.max_pixels} px: check the inputs' declared size and --resolution, or raise --max-pixels"
        )
    pair = coregistered(pair, params, spec.heterogeneous)
    pair = with_clouds(pair, (str(t1), str(t2)), params)
    if params.zones is not None:
        read_zones(params.zones, pair.grid)  # refused now, before any tile is predicted
    label = _model_label(params, spec)
    predictor = TilePredictor.of_params(spec, (scene1.count, scene2.count), params)
    _check_model_input_size(pair, predictor, label)
    tiles = params.tiling.plan(pair.grid.height, pair.grid.width)
    _check_radiometry(pair, tiles, spec, label)
    batches = [list(range(i, min(i + params.batch_size, len(tiles)))) for i in range(0, len(tiles), params.batch_size)]
    threshold = params.threshold if params.threshold is not None else float(spec.metadata.get("threshold", 0.5))
    smoothing = None
    if params.smoothing_sigma is not None:
        sensor = sensor_for(scene1.band_names, [b.dtype for b in scene1.bands])
        smoothing = Smoothing(params.smoothing_sigma, params.smoothing_samples, params.smoothing_alpha, threshold, sensor.scale,
                              pixels, params.seed)  # fmt: skip
        if smoothing.max_radius <= 0:
            needed = int(np.floor(np.log2(pixels / params.smoothing_alpha))) + 1
            raise InputError(
                f"--smoothing-samples {params.smoothing_samples} cannot certify any pixel of a {pixels}-pixel grid at "
                f"--smoothing-alpha {params.smoothing_alpha:g}: give at least {needed} samples"
            )
    timings = {"prepare_s": time.perf_counter() - start}
    start = time.perf_counter()
    if spec.per_scene_normalization:  # exact statistics of the whole scene, as in training
        with PairReader(pair) as reader:
            predictor.set_normalization(Normalization.of_pair(reader.read, pair.grid.height, pair.grid.width))
    if predictor.needs_samples or params.harmonize == "histogram":
        x1, x2 = _sample_pixels(pair, tiles, params, label, predictor.model.fit_view)
        if params.harmonize == "histogram":
            x2 = predictor.harmonize(x1, x2)
        if predictor.needs_samples:
            predictor.fit_scene(x1, x2)
    timings["sample_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint = fingerprint or content_fingerprint(scene1, scene2, spec, params)
    timings["fingerprint_s"] = time.perf_counter() - start
    return RunPlan(pair, tiles, batches, spec, params, threshold, predictor.scene_fit(), fingerprint, timings, predictor=predictor,
                   smoothing=smoothing, runtime=predictor.runtime)


def plan_layout() -> str:
    """A digest of the changedet version and of the fields of a :class:`RunPlan` and of every value it
    holds: caches of pickled plans (the flow's plan task) key on it, so a plan pickled by other code is
    never loaded into this one."""
    holds = (RunPlan, AlignedPair, Coregistration, CloudMask, Scene, BandSource, Grid, Tile, ModelSpec, SceneFit, Normalization, Smoothing)
    layout = [changedet.__version__] + [f"{c.__qualname__}:{','.join(f.name for f in fields(c))}" for c in holds]
    layout.append(f"DetectParams:{','.join(DetectParams.model_fields)}")
    return hashlib.blake2b("|".join(layout).encode(), digest_size=6).hexdigest()


def open_tile_store(plan: RunPlan, root: str | Path) -> TileStore:
    """The tile store of ``plan`` under ``root`` (reused when the fingerprint matches)."""
    tile = plan.tiles[0]
    return TileStore(Path(root) / plan.fingerprint, plan.fingerprint, len(plan.tiles), (tile.height, tile.width))
