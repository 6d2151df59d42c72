"""End-to-end change detection: two scenes in, georeferenced change maps out.

The run is split into plain functions that orchestration (the CLI, Prefect flows on Dask) calls
step by step:

1. :func:`~changedet.pipeline.planning.plan_run` — open and align both dates, resolve the model, fit scene
   statistics, plan tiles and fixed tile batches, fingerprint the content of inputs + model +
   parameters (:class:`~changedet.pipeline.planning.RunPlan`, picklable, small);
2. :func:`predict_batch` — predict one batch of tiles into a :class:`~changedet.pipeline.tilestore.TileStore`
   (any process; readers and models are cached per process), the next batch read meanwhile in a
   background thread (:func:`read_ahead`);
3. :func:`~changedet.pipeline.outputs.write_outputs` — blend the stored tiles into COGs, polygonise, write
   ``run.json``, and move everything into the output folder atomically.

:func:`detect_changes` chains them in one process, holding the output folder's lock
(:class:`~changedet.io.outdir.OutputLock`) from the first tile to the last output.
"""

from __future__ import annotations

import functools
import importlib
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from changedet.pipeline.align import PairReader
from changedet.errors import InputError
from changedet.io.outdir import OutputLock, check_out_dir
from changedet.io.polygons import POLYGON_MODULES
from changedet.io.writers import OutputStaging
from changedet.pipeline.outputs import (  # noqa: F401 - the output table, re-exported for callers of changedet.pipeline.detect
    DIFFERENCE, FLOAT_NODATA, MASK, MASK_NODATA, OUTPUT_NAMES, POLYGONS, PROBABILITY, PROBABILITY_STYLE, MASK_STYLE,
    QUICKLOOK, RUN_JSON, output_names, peak_rss_mb, write_outputs,
)
from changedet.pipeline.planning import (  # noqa: F401 - planning API, re-exported
    DetectParams, RunPlan, content_fingerprint, input_fingerprint, open_inputs, open_tile_store, plan_layout, plan_run,
)
from changedet.pipeline.inference import SceneRunner, TileBatch, read_batch
from changedet.pipeline.predictor import TilePredictor
from changedet.pipeline.tilestore import TileStore
from changedet.runtime.threads import set_threads

TILE_STORE_DIR = ".changedet-tiles"
#: modules a run needs only after planning (sigmoid of ONNX logits) or at its end (polygons, report
#: figures): :func:`detect_changes` imports them in a background thread while it plans and predicts
DEFERRED_MODULES = ("scipy.special", *POLYGON_MODULES, "changedet.pipeline.run_report")


_WORKER = threading.local()


def _worker_state(plan: RunPlan, store_root: str | Path) -> tuple[SceneRunner, TileStore]:
    """Runner and tile store opened once per worker thread and run; reopened when another run
    arrives. In the planning process the plan's own model is reused; other processes build it from
    the plan's spec and scene fit."""
    key = (plan.fingerprint, str(store_root))
    cached = getattr(_WORKER, "state", None)
    if cached is None or cached[0] != key or not cached[2].path.exists():
        if plan.params.threads:
            set_threads(plan.params.threads)
        predictor = plan.predictor
        if predictor is None:
            predictor = TilePredictor.of_params(plan.spec, (plan.pair.t1.count, plan.pair.t2.count), plan.params)
            predictor.load_scene_fit(plan.scene_fit)
        runner = predictor.runner(plan.params.tiling, plan.params.batch_size, plan.smoothing)
        _WORKER.state = (key, runner, open_tile_store(plan, store_root))
    return _WORKER.state[1:]


def _thread_reader(plan: RunPlan) -> PairReader:
    """This thread's reader of the plan's pair (rasterio datasets are not shared across threads)."""
    cached = getattr(_WORKER, "reader", None)
    if cached is None or cached[0] != plan.fingerprint:
        if cached is not None:
            cached[1].close()
        _WORKER.reader = (plan.fingerprint, PairReader(plan.pair).__enter__())
    return _WORKER.reader[1]


def read_tiles(plan: RunPlan, batch: int) -> tuple[TileBatch, float]:
    """The raw tiles of ``plan.batches[batch]`` and the seconds their reading took."""
    start = time.perf_counter()
    raw = read_batch(_thread_reader(plan).read, [plan.tiles[i] for i in plan.batches[batch]])
    return raw, time.perf_counter() - start


@functools.cache
def _read_pool() -> ThreadPoolExecutor:
    """The process's one read-ahead thread, started on first use."""
    return ThreadPoolExecutor(1, thread_name_prefix="changedet-read-ahead")


def import_in_background(modules: Sequence[str]) -> threading.Thread:
    """Import ``modules`` in a daemon thread (their first use then waits for that import at most).
    An import that fails there is left to fail again, with its error, where the module is used."""

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - raised again by the import where the module is used
                pass

    thread = threading.Thread(target=run, name="changedet-imports", daemon=True)
    thread.start()
    return thread


def read_ahead(plan: RunPlan, batches: Sequence[int]) -> Iterator[tuple[int, tuple[TileBatch, float]]]:
    """``(batch, read_tiles(plan, batch))`` in order, each batch read in a background thread while the
    caller predicts the one before (reading, resampling and masking release the GIL in GDAL and numpy)."""
    pool = _read_pool()
    pending: Future | None = None
    for k, batch in enumerate(batches):
        raw = (pending or pool.submit(read_tiles, plan, batch)).result()
        pending = pool.submit(read_tiles, plan, batches[k + 1]) if k + 1 < len(batches) else None
        yield batch, raw


def predict_batch(plan: RunPlan, batch: int, store_root: str | Path, raw: tuple[TileBatch, float] | None = None) -> dict[str, float]:
    """Predict the tiles of ``plan.batches[batch]`` (read here unless ``raw`` holds them, from
    :func:`read_tiles`) into the tile store; returns read/model seconds."""
    runner, store = _worker_state(plan, store_root)
    tiles, read_s = raw or read_tiles(plan, batch)
    model_before = runner.model_seconds
    prob, diff = runner.predict(tiles)
    for i, tile in enumerate(tiles.tiles):
        store.write(tile.index, prob[i], diff[i], tiles.valid[i])
    return {"read_s": read_s, "model_s": runner.model_seconds - model_before, "tiles": len(tiles.tiles)}


def predict_batches(plan: RunPlan, batches: Sequence[int], store_root: str | Path) -> dict[str, float]:
    """:func:`predict_batch` over several batches (one scheduler task), reading ahead; returns summed
    read/model seconds."""
    stats = [predict_batch(plan, b, store_root, raw) for b, raw in read_ahead(plan, batches)]
    return {k: sum(s[k] for s in stats) for k in ("read_s", "model_s", "tiles")}


def missing_batches(plan: RunPlan, store_root: str | Path) -> list[int]:
    """Batches with at least one tile not yet in the store."""
    done = open_tile_store(plan, store_root).done()
    return [b for b, idx in enumerate(plan.batches) if not set(idx) <= done]


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
    names = output_names(params.smoothing_sigma is not None, params.zones is not None)
    check_out_dir(out_dir, (t1, t2), names)
    out_dir = Path(out_dir).absolute()  # every writer (GDAL, SQLite) sees the same path: no "~" expansion
    import_in_background(DEFERRED_MODULES)
    plan = plan_run(t1, t2, params)
    with OutputLock(out_dir):
        OutputStaging.check(out_dir, names, overwrite)
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
            for b, raw in read_ahead(plan, todo):
                stats = predict_batch(plan, b, store_root, raw)
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
