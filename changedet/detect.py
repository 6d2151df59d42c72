"""End-to-end change detection: two scenes in, georeferenced change maps out.

The run is split into plain functions that orchestration (the CLI, Prefect flows on Dask) calls
step by step:

1. :func:`plan_run` — open and align both dates, resolve the model, fit scene statistics, plan tiles
   and fixed tile batches, fingerprint the content of inputs + model + parameters (:class:`RunPlan`,
   picklable, small);
2. :func:`predict_batch` — predict one batch of tiles into a :class:`~changedet.tilestore.TileStore`
   (any process; readers and models are cached per process);
3. :func:`write_outputs` — blend the stored tiles into COGs, polygonise, write ``run.json``, and move
   everything into the output folder atomically.

:func:`detect_changes` chains them in one process.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
import shutil
import threading
import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import rasterio
import torch

import changedet
from changedet.align import AlignedPair, PairReader, align_pair
from changedet.data.stats import date_statistics
from changedet.errors import ChangeDetError, InputError, ModelError
from changedet.io.polygons import polygonize_mask
from changedet.io.scene import Scene, open_scene
from changedet.io.styles import write_mask_style, write_probability_style
from changedet.io.writers import BlockRasterWriter, OutputStaging, write_cog
from changedet.mosaic import StreamingMosaic
from changedet.predictor import DEFAULT_MODEL, ModelSpec, SceneFit, TilePredictor, auto_model, resolve_model
from changedet.tiling import Tile, plan_tiles, validate_tiling
from changedet.tilestore import TileStore

PROBABILITY = "change_probability.tif"
MASK = "change_mask.tif"
DIFFERENCE = "difference.tif"
POLYGONS = "changes.gpkg"
RUN_JSON = "run.json"
PROBABILITY_STYLE = "change_probability.qml"  # QGIS applies <name>.qml to <name>.tif
MASK_STYLE = "change_mask.qml"
OUTPUT_NAMES = [PROBABILITY, MASK, DIFFERENCE, POLYGONS, PROBABILITY_STYLE, MASK_STYLE, RUN_JSON]
FLOAT_NODATA = -9999.0
MASK_NODATA = 255
TILE_STORE_DIR = ".changedet-tiles"


@dataclass
class DetectParams:
    """User-facing parameters of one detect run (what the CLI flags set)."""

    model: str = DEFAULT_MODEL
    tile: int = 256
    overlap: int = 32
    threshold: float | None = None
    crs: str | None = None
    resolution: float | None = None
    bands: Sequence[str] | None = None
    nodata: float | None = None
    resampling: str = "bilinear"
    blend: str = "cosine"
    batch_size: int = 8
    device: str = "cpu"
    runtime: str = "torch"
    threads: int | None = None  # torch intra-op threads per worker (None: torch's default)
    sample_tiles: int = 16
    seed: int = 0
    max_pixels: int = 1 << 32  # refuse larger common grids (a corrupt or absurd declared size)

    def validate(self) -> None:
        """Raise :class:`ChangeDetError` with the reason for impossible settings."""
        validate_tiling(self.tile, self.overlap)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ChangeDetError(f"--threshold must be within [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise ChangeDetError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise ChangeDetError(f"--max-pixels must be >= 1, got {self.max_pixels}")


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


def _hash_file(path: str, digest: "hashlib._Hash", chunk: int = 1 << 22) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)


def content_fingerprint(t1: Scene, t2: Scene, spec: ModelSpec, params: DetectParams) -> str:
    """Hash of the input files' bytes, the model (checkpoint bytes or name+config) and every
    parameter that changes predictions — not of paths, so renamed or moved inputs still match."""
    digest = hashlib.blake2b(digest_size=16)
    for scene in (t1, t2):
        for path in dict.fromkeys(b.path for b in scene.bands):
            _hash_file(path, digest)
        digest.update(json.dumps([(b.name, b.index) for b in scene.bands]).encode())
    if spec.checkpoint is not None:
        _hash_file(str(spec.checkpoint), digest)
    settings = {k: v for k, v in asdict(params).items() if k not in ("model", "threshold", "device", "threads", "max_pixels")}
    settings["model"] = spec.name
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def open_inputs(t1: str | Path, t2: str | Path, params: DetectParams) -> tuple[Scene, Scene, ModelSpec]:
    """Validate parameters, resolve the model and open both dates with the model's bands."""
    params.validate()
    if params.model == DEFAULT_MODEL:
        spec = auto_model(open_scene(t1, params.bands, params.nodata).band_names)
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
    scene1, scene2 = open_scene(t1, bands1, params.nodata), open_scene(t2, bands2, params.nodata)
    spec.check_band_counts((scene1.count, scene2.count), (str(t1), str(t2)))
    return scene1, scene2, spec


def input_fingerprint(t1: str | Path, t2: str | Path, params: DetectParams) -> str:
    """:func:`content_fingerprint` straight from paths (what a cache key needs before planning)."""
    return content_fingerprint(*open_inputs(t1, t2, params), params)


def _sample_pixels(
    pair: AlignedPair, tiles: list[Tile], params: DetectParams, max_pixels: int = 200_000
) -> tuple[np.ndarray, np.ndarray]:
    """Valid pixel samples ``(N, C)`` of both dates from up to ``sample_tiles`` evenly spread tiles
    (a random subset of each tile is kept, so memory stays at one tile)."""
    picks = np.unique(np.linspace(0, len(tiles) - 1, min(params.sample_tiles, len(tiles))).astype(int))
    per_tile = max(1, max_pixels // len(picks))
    rng = np.random.default_rng(params.seed)
    s1, s2 = [], []

    def keep(x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> None:
        idx = np.flatnonzero(valid)
        idx = np.sort(rng.choice(idx, per_tile, replace=False)) if len(idx) > per_tile else idx
        s1.append(x1.reshape(x1.shape[0], -1)[:, idx].T)
        s2.append(x2.reshape(x2.shape[0], -1)[:, idx].T)

    with PairReader(pair) as reader:
        for i in picks:
            keep(*reader.read(tiles[i].window))
        if sum(len(s) for s in s1) < 2:  # the spread sample missed the data: scan until pixels turn up
            for tile in tiles:
                keep(*reader.read(tile.window))
                if sum(len(s) for s in s1) >= 2:
                    break
            else:
                raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    return np.concatenate(s1), np.concatenate(s2)


def plan_run(t1: str | Path, t2: str | Path, params: DetectParams) -> RunPlan:
    """Open both dates, resolve the model (choosing its bands), align, plan tiles, fit the scene."""
    start = time.perf_counter()
    scene1, scene2, spec = open_inputs(t1, t2, params)
    pair = align_pair(scene1, scene2, params.crs, params.resolution, params.resampling, spec.heterogeneous)
    pixels = pair.grid.height * pair.grid.width
    if pixels > params.max_pixels:
        raise InputError(
            f"common grid of {pair.grid.height} x {pair.grid.width} px ({pixels / 1e9:.1f} Gpx) exceeds the limit of "
            f"{params.max_pixels} px: check the inputs' declared size, or raise --max-pixels"
        )
    predictor = TilePredictor(spec, (scene1.count, scene2.count), params.device, params.runtime)
    tiles = plan_tiles(pair.grid.height, pair.grid.width, params.tile, params.overlap)
    batches = [list(range(i, min(i + params.batch_size, len(tiles)))) for i in range(0, len(tiles), params.batch_size)]
    threshold = params.threshold if params.threshold is not None else float(spec.metadata.get("threshold", 0.5))
    timings = {"prepare_s": time.perf_counter() - start}
    start = time.perf_counter()
    if spec.per_scene_normalization:  # exact statistics of the whole scene, as in training
        with PairReader(pair) as reader:
            predictor.set_scene_statistics(date_statistics(reader.read, pair.grid.height, pair.grid.width))
    if predictor.needs_samples:
        predictor.fit_scene(*_sample_pixels(pair, tiles, params))
    timings["sample_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint = content_fingerprint(scene1, scene2, spec, params)
    timings["fingerprint_s"] = time.perf_counter() - start
    return RunPlan(pair, tiles, batches, spec, params, threshold, predictor.scene_fit(), fingerprint, timings)


_WORKER = threading.local()


def _worker_state(plan: RunPlan, store_root: str | Path) -> tuple[PairReader, TilePredictor, TileStore]:
    """Reader, model and tile store opened once per worker thread and run (rasterio datasets are
    not shared across threads); reopened when another run arrives."""
    key = (plan.fingerprint, str(store_root))
    cached = getattr(_WORKER, "state", None)
    if cached is None or cached[0] != key or not cached[3].path.exists():
        if cached is not None:
            cached[1].close()
        if plan.params.threads:
            torch.set_num_threads(plan.params.threads)
        predictor = TilePredictor(
            plan.spec, (plan.pair.t1.count, plan.pair.t2.count), plan.params.device, plan.params.runtime
        )
        predictor.load_scene_fit(plan.scene_fit)
        _WORKER.state = (key, PairReader(plan.pair).__enter__(), predictor, open_tile_store(plan, store_root))
    return _WORKER.state[1:]


def open_tile_store(plan: RunPlan, root: str | Path) -> TileStore:
    """The tile store of ``plan`` under ``root`` (reused when the fingerprint matches)."""
    tile = plan.tiles[0]
    return TileStore(Path(root) / plan.fingerprint, plan.fingerprint, len(plan.tiles), (tile.height, tile.width))


def predict_batch(plan: RunPlan, batch: int, store_root: str | Path) -> dict[str, float]:
    """Predict the tiles of ``plan.batches[batch]`` into the tile store; returns read/model seconds."""
    reader, predictor, store = _worker_state(plan, store_root)
    tiles = [plan.tiles[i] for i in plan.batches[batch]]
    start = time.perf_counter()
    reads = [reader.read(t.window) for t in tiles]
    read_s = time.perf_counter() - start
    model_before = predictor.model_seconds
    x1 = np.stack([r[0] for r in reads])
    x2 = np.stack([r[1] for r in reads])
    valid = np.stack([r[2] for r in reads])
    if valid.any():
        prob, diff = predictor.predict(x1, x2, valid)
    else:
        prob = diff = np.full(valid.shape, np.nan, np.float32)
    for i, tile in enumerate(tiles):
        store.write(tile.index, prob[i], diff[i], valid[i])
    return {"read_s": read_s, "model_s": predictor.model_seconds - model_before, "tiles": len(tiles)}


def predict_batches(plan: RunPlan, batches: Sequence[int], store_root: str | Path) -> dict[str, float]:
    """:func:`predict_batch` over several batches (one scheduler task); returns summed read/model seconds."""
    stats = [predict_batch(plan, b, store_root) for b in batches]
    return {k: sum(s[k] for s in stats) for k in ("read_s", "model_s", "tiles")}


def missing_batches(plan: RunPlan, store_root: str | Path) -> list[int]:
    """Batches with at least one tile not yet in the store."""
    done = open_tile_store(plan, store_root).done()
    return [b for b, idx in enumerate(plan.batches) if not set(idx) <= done]


def _mosaic_to_scratch(plan: RunPlan, store: TileStore, paths: dict[str, Path]) -> dict[str, int]:
    grid = plan.pair.grid
    writers = {
        PROBABILITY: BlockRasterWriter(paths[PROBABILITY], grid, "float32", FLOAT_NODATA),
        MASK: BlockRasterWriter(paths[MASK], grid, "uint8", MASK_NODATA),
        DIFFERENCE: BlockRasterWriter(paths[DIFFERENCE], grid, "float32", FLOAT_NODATA),
    }
    counts = {"valid_pixels": 0, "changed_pixels": 0, "tiles": len(plan.tiles), "skipped_tiles": 0}

    def sink(row_off: int, values: np.ndarray, valid: np.ndarray) -> None:
        prob, diff = values
        changed = valid & (prob >= plan.threshold)
        writers[PROBABILITY].write_rows(row_off, np.where(valid, prob, FLOAT_NODATA))
        writers[DIFFERENCE].write_rows(row_off, np.where(valid, diff, FLOAT_NODATA))
        writers[MASK].write_rows(row_off, np.where(valid, changed, MASK_NODATA).astype(np.uint8))
        counts["valid_pixels"] += int(valid.sum())
        counts["changed_pixels"] += int(changed.sum())

    mosaic = StreamingMosaic(grid.shape, plan.tiles, 2, sink, plan.params.overlap, plan.params.blend)
    try:
        for tile in plan.tiles:
            values, valid = store.read(tile.index)
            if valid.any():
                mosaic.add(tile, values, valid)
            else:
                mosaic.skip(tile)
                counts["skipped_tiles"] += 1
    finally:
        for w in writers.values():
            w.dataset.close()
    if counts["valid_pixels"] == 0:
        raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    for w in writers.values():
        w.close()
    return counts


def _polygons(staging: OutputStaging, timings: dict[str, float]) -> dict[str, Any]:
    start = time.perf_counter()
    n, area = polygonize_mask(staging.path(MASK), staging.path(PROBABILITY), staging.path(POLYGONS))
    timings["polygons_s"] = time.perf_counter() - start
    return {"regions": n, "changed_area_m2": area, "changed_area_ha": area / 1e4}


def _versions() -> dict[str, str]:
    return {
        "changedet": changedet.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": metadata.version("timm"),
        "segmentation_models_pytorch": metadata.version("segmentation-models-pytorch"),
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "numpy": np.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, which starts afresh at ``exec``; ``ru_maxrss`` keeps the
    parent's peak across fork + exec (a run started by a 3 GB process would report 3 GB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_outputs(
    plan: RunPlan,
    store_root: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    inputs: dict[str, str] | None = None,
    timings: dict[str, float] | None = None,
    started: float | None = None,
    extra_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Blend stored tiles into COGs, polygonise, write ``run.json``; move all into ``out_dir``.

    Nothing appears in ``out_dir`` unless every output was produced; returns the ``run.json`` summary.
    """
    timings = {**plan.timings, **(timings or {})}
    store = open_tile_store(plan, store_root)
    missing = len(plan.tiles) - len(store.done())
    if missing:
        raise ChangeDetError(f"{missing} tiles have no prediction yet in {store.path}")
    with OutputStaging(out_dir, OUTPUT_NAMES, overwrite) as staging:
        start = time.perf_counter()
        scratch = {name: staging.path(f"scratch_{name}") for name in (PROBABILITY, MASK, DIFFERENCE)}
        counts = {**_mosaic_to_scratch(plan, store, scratch), **(extra_counts or {})}
        timings["mosaic_s"] = time.perf_counter() - start
        start = time.perf_counter()
        write_cog(scratch[PROBABILITY], staging.path(PROBABILITY), "average")
        write_cog(scratch[DIFFERENCE], staging.path(DIFFERENCE), "average")
        write_cog(scratch[MASK], staging.path(MASK), "nearest")
        timings["cog_s"] = time.perf_counter() - start
        write_probability_style(staging.path(PROBABILITY_STYLE), plan.threshold, FLOAT_NODATA)
        write_mask_style(staging.path(MASK_STYLE), MASK_NODATA)
        changes = _polygons(staging, timings)
        if started is not None:
            timings["total_s"] = time.perf_counter() - started
        summary = {
            "inputs": inputs or {"t1": plan.pair.t1.source, "t2": plan.pair.t2.source},
            **plan.pair.to_dict(),
            "model": plan.spec.describe(),
            "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan.params).items()},
            "threshold": plan.threshold,
            "fingerprint": plan.fingerprint,
            "counts": counts,
            "changes": changes,
            "outputs": {name: name for name in OUTPUT_NAMES},
            "nodata": {PROBABILITY: FLOAT_NODATA, DIFFERENCE: FLOAT_NODATA, MASK: MASK_NODATA},
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "versions": _versions(),
        }
        staging.path(RUN_JSON).write_text(json.dumps(summary, indent=2, default=str))
        staging.commit()
    return summary


@dataclass
class DetectResult:
    """Where the outputs are and what ``run.json`` says."""

    out_dir: Path
    summary: dict[str, Any]

    def path(self, name: str) -> Path:
        """Path of one output file."""
        return self.out_dir / name


def detect_changes(
    t1: str | Path,
    t2: str | Path,
    out_dir: str | Path,
    params: DetectParams | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_planned: Callable[[RunPlan], None] | None = None,
) -> DetectResult:
    """Run the whole path in this process and write ``change_probability.tif``, ``change_mask.tif``,
    ``difference.tif`` (COGs on the common grid), ``changes.gpkg`` and ``run.json`` into ``out_dir``.

    Tile predictions persist in ``out_dir/.changedet-tiles/<fingerprint>`` until the run succeeds, so
    rerunning an interrupted run only predicts the missing tiles. Nothing else appears in ``out_dir``
    unless the whole run succeeds; existing outputs are only replaced with ``overwrite=True``.
    """
    params = params or DetectParams()
    start = time.perf_counter()
    plan = plan_run(t1, t2, params)
    OutputStaging.check(out_dir, OUTPUT_NAMES, overwrite)
    if on_planned:
        on_planned(plan)
    store_root = Path(out_dir) / TILE_STORE_DIR
    timings = {"read_s": 0.0, "model_s": 0.0}
    start_predict = time.perf_counter()
    try:
        todo = missing_batches(plan, store_root)
        resumed = sum(len(b) for i, b in enumerate(plan.batches) if i not in set(todo))
        if progress:
            progress(resumed)
        for b in todo:
            stats = predict_batch(plan, b, store_root)
            timings["read_s"] += stats["read_s"]
            timings["model_s"] += stats["model_s"]
            if progress:
                progress(len(plan.batches[b]))
        timings["predict_total_s"] = time.perf_counter() - start_predict
        inputs = {"t1": str(t1), "t2": str(t2)}
        summary = write_outputs(plan, store_root, out_dir, overwrite, inputs, timings, start, {"resumed_tiles": resumed})
    except InputError:
        remove_tile_store(store_root)  # bad data: nothing worth resuming
        raise
    remove_tile_store(store_root)
    return DetectResult(Path(out_dir), summary)


def remove_tile_store(root: str | Path) -> None:
    """Delete a tile store folder (after a successful run, or when its inputs are unusable)."""
    shutil.rmtree(root, ignore_errors=True)
