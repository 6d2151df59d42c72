"""End-to-end change detection: two scenes in, georeferenced change maps out.

Each step is a plain function so that orchestration (the CLI, Prefect flows) can call them one by
one: :func:`prepare_run` (open + align + model), :func:`sample_scene`, :func:`predict_to_rasters`,
:func:`finalize_outputs`. :func:`detect_changes` chains them.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import rasterio
import torch

import changedet
from changedet.align import AlignedPair, PairReader, align_pair
from changedet.errors import ChangeDetError, InputError
from changedet.io.polygons import polygonize_mask
from changedet.io.scene import open_scene
from changedet.io.writers import BlockRasterWriter, OutputStaging, write_cog
from changedet.mosaic import StreamingMosaic
from changedet.predictor import DEFAULT_MODEL, ModelSpec, TilePredictor, resolve_model
from changedet.tiling import Tile, plan_tiles, validate_tiling

PROBABILITY = "change_probability.tif"
MASK = "change_mask.tif"
DIFFERENCE = "difference.tif"
POLYGONS = "changes.gpkg"
RUN_JSON = "run.json"
OUTPUT_NAMES = [PROBABILITY, MASK, DIFFERENCE, POLYGONS, RUN_JSON]
FLOAT_NODATA = -9999.0
MASK_NODATA = 255


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
    sample_tiles: int = 16
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ChangeDetError` with the reason for impossible settings."""
        validate_tiling(self.tile, self.overlap)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ChangeDetError(f"--threshold must be within [0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise ChangeDetError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass
class PreparedRun:
    """Everything decided before reading pixels: the aligned pair, tile plan and predictor."""

    pair: AlignedPair
    tiles: list[Tile]
    predictor: TilePredictor
    params: DetectParams
    threshold: float
    timings: dict[str, float] = field(default_factory=dict)


def prepare_run(t1: str | Path, t2: str | Path, params: DetectParams) -> PreparedRun:
    """Open both dates, resolve the model (choosing its bands), align to a common grid, plan tiles."""
    start = time.perf_counter()
    params.validate()
    spec: ModelSpec = resolve_model(params.model)
    bands1 = bands2 = list(params.bands) if params.bands else None
    if bands1 is None and spec.bands is not None:
        bands1, bands2 = spec.bands
    scene1 = open_scene(t1, bands1, params.nodata)
    scene2 = open_scene(t2, bands2, params.nodata)
    heterogeneous = not spec.metadata.get("config", {}).get("shared", True) or bands1 != bands2
    pair = align_pair(scene1, scene2, params.crs, params.resolution, params.resampling, heterogeneous)
    predictor = TilePredictor(spec, (scene1.count, scene2.count), params.device)
    threshold = params.threshold if params.threshold is not None else float(spec.metadata.get("threshold", 0.5))
    tiles = plan_tiles(pair.grid.height, pair.grid.width, params.tile, params.overlap)
    return PreparedRun(pair, tiles, predictor, params, threshold, {"prepare_s": time.perf_counter() - start})


def sample_scene(run: PreparedRun, reader: PairReader, max_pixels: int = 200_000) -> None:
    """Fit scene statistics from valid pixels of up to ``sample_tiles`` evenly spread tiles."""
    if not run.predictor.needs_samples:
        return
    start = time.perf_counter()
    picks = np.unique(np.linspace(0, len(run.tiles) - 1, min(run.params.sample_tiles, len(run.tiles))).astype(int))
    chunks1, chunks2 = [], []
    for i in picks:
        x1, x2, valid = reader.read(run.tiles[i].window)
        chunks1.append(x1[:, valid].T)
        chunks2.append(x2[:, valid].T)
    s1, s2 = np.concatenate(chunks1), np.concatenate(chunks2)
    if len(s1) < 2:
        s1, s2 = _scan_for_valid(run, reader)
    rng = np.random.default_rng(run.params.seed)
    if len(s1) > max_pixels:
        keep = rng.choice(len(s1), max_pixels, replace=False)
        s1, s2 = s1[keep], s2[keep]
    run.predictor.fit_scene(s1, s2)
    run.timings["sample_s"] = time.perf_counter() - start


def _scan_for_valid(run: PreparedRun, reader: PairReader) -> tuple[np.ndarray, np.ndarray]:
    for tile in run.tiles:
        x1, x2, valid = reader.read(tile.window)
        if valid.sum() >= 2:
            return x1[:, valid].T, x2[:, valid].T
    raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")


def _batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for i in range(0, len(tiles), size):
        yield tiles[i : i + size]


def predict_to_rasters(
    run: PreparedRun,
    reader: PairReader,
    paths: dict[str, Path],
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Predict every tile, blend, and stream probability/mask/difference rows into scratch GeoTIFFs.

    Returns pixel counts ``{"valid_pixels", "changed_pixels", "tiles", "skipped_tiles"}``.
    """
    grid = run.pair.grid
    writers = {
        PROBABILITY: BlockRasterWriter(paths[PROBABILITY], grid, "float32", FLOAT_NODATA),
        MASK: BlockRasterWriter(paths[MASK], grid, "uint8", MASK_NODATA),
        DIFFERENCE: BlockRasterWriter(paths[DIFFERENCE], grid, "float32", FLOAT_NODATA),
    }
    counts = {"valid_pixels": 0, "changed_pixels": 0, "tiles": len(run.tiles), "skipped_tiles": 0}

    def sink(row_off: int, values: np.ndarray, valid: np.ndarray) -> None:
        prob, diff = values
        changed = valid & (prob >= run.threshold)
        writers[PROBABILITY].write_rows(row_off, np.where(valid, prob, FLOAT_NODATA))
        writers[DIFFERENCE].write_rows(row_off, np.where(valid, diff, FLOAT_NODATA))
        writers[MASK].write_rows(row_off, np.where(valid, changed, MASK_NODATA).astype(np.uint8))
        counts["valid_pixels"] += int(valid.sum())
        counts["changed_pixels"] += int(changed.sum())

    mosaic = StreamingMosaic(grid.shape, run.tiles, 2, sink, run.params.overlap, run.params.blend)
    read_s = 0.0
    try:
        for batch in _batches(run.tiles, run.params.batch_size):
            start = time.perf_counter()
            reads = [reader.read(t.window) for t in batch]
            read_s += time.perf_counter() - start
            live = [(t, r) for t, r in zip(batch, reads) if r[2].any()]
            for t, r in zip(batch, reads):
                if not r[2].any():
                    mosaic.skip(t)
                    counts["skipped_tiles"] += 1
            if live:
                x1 = np.stack([r[0] for _, r in live])
                x2 = np.stack([r[1] for _, r in live])
                valid = np.stack([r[2] for _, r in live])
                prob, diff = run.predictor.predict(x1, x2, valid)
                for i, (tile, _) in enumerate(live):
                    mosaic.add(tile, np.stack([prob[i], diff[i]]), valid[i])
            if progress:
                progress(len(batch))
    finally:
        for w in writers.values():
            w.dataset.close()
    if counts["valid_pixels"] == 0:
        raise InputError("no valid pixel where t1 and t2 overlap (all nodata/NaN)")
    for w in writers.values():
        w.close()
    run.timings["read_s"] = read_s
    run.timings["model_s"] = run.predictor.model_seconds
    return counts


def finalize_outputs(run: PreparedRun, scratch: dict[str, Path], staging: OutputStaging) -> dict[str, Any]:
    """Scratch rasters -> COGs, mask -> GeoPackage polygons; returns the polygon summary."""
    start = time.perf_counter()
    write_cog(scratch[PROBABILITY], staging.path(PROBABILITY), "average")
    write_cog(scratch[DIFFERENCE], staging.path(DIFFERENCE), "average")
    write_cog(scratch[MASK], staging.path(MASK), "nearest")
    run.timings["cog_s"] = time.perf_counter() - start
    start = time.perf_counter()
    n = polygonize_mask(staging.path(MASK), staging.path(PROBABILITY), staging.path(POLYGONS))
    run.timings["polygons_s"] = time.perf_counter() - start
    import geopandas as gpd

    area = float(gpd.read_file(staging.path(POLYGONS), engine="pyogrio")["area_m2"].sum()) if n else 0.0
    return {"regions": n, "changed_area_m2": area, "changed_area_ha": area / 1e4}


def _versions() -> dict[str, str]:
    import segmentation_models_pytorch
    import timm

    return {
        "changedet": changedet.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "segmentation_models_pytorch": segmentation_models_pytorch.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "numpy": np.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    on_prepared: Callable[[PreparedRun], None] | None = None,
) -> DetectResult:
    """Run the whole path and write ``change_probability.tif``, ``change_mask.tif``,
    ``difference.tif`` (COGs on the common grid), ``changes.gpkg`` and ``run.json`` into ``out_dir``.

    Nothing appears in ``out_dir`` unless the whole run succeeds; existing outputs are only replaced
    with ``overwrite=True``.
    """
    params = params or DetectParams()
    start = time.perf_counter()
    run = prepare_run(t1, t2, params)
    if on_prepared:
        on_prepared(run)
    with OutputStaging(out_dir, OUTPUT_NAMES, overwrite) as staging:
        scratch = {name: staging.path(f"scratch_{name}") for name in (PROBABILITY, MASK, DIFFERENCE)}
        with PairReader(run.pair) as reader:
            sample_scene(run, reader)
            start_predict = time.perf_counter()
            counts = predict_to_rasters(run, reader, scratch, progress)
            run.timings["predict_total_s"] = time.perf_counter() - start_predict
        polygons = finalize_outputs(run, scratch, staging)
        run.timings["total_s"] = time.perf_counter() - start
        summary = {
            "inputs": {"t1": str(t1), "t2": str(t2)},
            **run.pair.to_dict(),
            "model": run.predictor.spec.describe(),
            "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(params).items()},
            "threshold": run.threshold,
            "counts": counts,
            "changes": polygons,
            "outputs": {name: name for name in OUTPUT_NAMES},
            "nodata": {PROBABILITY: FLOAT_NODATA, DIFFERENCE: FLOAT_NODATA, MASK: MASK_NODATA},
            "timings": {k: round(v, 4) for k, v in run.timings.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "versions": _versions(),
        }
        staging.path(RUN_JSON).write_text(json.dumps(summary, indent=2, default=str))
        staging.commit()
    return DetectResult(Path(out_dir), summary)
