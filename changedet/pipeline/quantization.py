"""``changedet quantize``: a checkpoint's static int8 graph, calibrated on tiles of its training scenes.

Every calibration pair goes through the detect plan of the checkpoint (bands, alignment, the
checkpoint's normalisation or the scene's own, harmonisation), so the activation ranges are
measured on exactly the inputs ``--runtime onnx-int8`` will feed the graph. Tiles are spread
evenly over each scene (row-major plan order); the float32 export comes from the export cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from changedet.errors import InputError, ModelError
from changedet.pipeline.detect import read_tiles
from changedet.pipeline.params import DetectParams
from changedet.pipeline.planning import RunPlan, plan_run
from changedet.runtime.ort import OnnxArrays
from changedet.runtime.quantize import Int8Graph, int8_graph_path, quantize_static_int8

DEFAULT_CALIBRATION_TILES = 8  # per pair: ranges settle within a few tiles; more cost calibration time only


def _calibration_plan(t1: str | Path, t2: str | Path, model: str, tile: int) -> RunPlan:
    plan = plan_run(t1, t2, DetectParams(model=model, runtime="onnx", tile=tile, batch_size=1))
    if not isinstance(plan.predictor.model, OnnxArrays) or plan.predictor.spec.checkpoint is None:
        raise ModelError(f"changedet quantize needs a trained checkpoint that exports to ONNX; {model} is not one")
    return plan


def calibration_inputs(plans: Sequence[RunPlan], tiles_per_pair: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Normalised ``(z1, z2)`` single-tile batches, ``tiles_per_pair`` spread evenly over each plan's tiles."""
    for plan in plans:
        runner = plan.predictor.runner(plan.params.tiling, 1, plan.smoothing)
        picks = np.unique(np.linspace(0, len(plan.batches) - 1, min(tiles_per_pair, len(plan.batches))).round().astype(int))
        for b in picks.tolist():
            yield runner.inputs(read_tiles(plan, b)[0])


def quantize_checkpoint(
    model: str, pairs: Sequence[tuple[str, str]], tiles_per_pair: int = DEFAULT_CALIBRATION_TILES,
    out: str | Path | None = None, tile: int | None = None,
) -> Int8Graph:  # fmt: skip
    """Calibrate and write the int8 graph of checkpoint ``model`` (path or bundled name) on ``pairs``
    of (t1, t2) scenes, ``tiles_per_pair`` tiles each, to ``out`` (default: beside the checkpoint,
    where ``--runtime onnx-int8`` looks). Returns its record."""
    if not pairs:
        raise InputError("give at least one --calibrate T1 T2 pair (training scenes of the model)")
    if tiles_per_pair < 1:
        raise InputError(f"--tiles must be at least 1, not {tiles_per_pair}")
    tile = tile or DetectParams.model_fields["tile"].default
    plans = [_calibration_plan(t1, t2, model, tile) for t1, t2 in pairs]
    first = plans[0].predictor
    for plan in plans[1:]:
        if plan.predictor.model.in_channels != first.model.in_channels:
            raise InputError(f"calibration pairs give the model different bands: {first.model.in_channels} and {plan.predictor.model.in_channels}")
    dst = Path(out) if out is not None else int8_graph_path(first.spec.checkpoint)
    calibration = {"pairs": [[str(t1), str(t2)] for t1, t2 in pairs], "tiles_per_pair": tiles_per_pair, "tile": tile,
                   "method": "static QOperator, per-channel int8 weights, uint8 activations, percentile 99.99 ranges"}  # fmt: skip
    return quantize_static_int8(
        first.model.onnx_path, dst, calibration_inputs(plans, tiles_per_pair), checkpoint_digest=first.spec.digest,
        in_channels=tuple(first.model.in_channels), min_input_size=first.min_input_size, calibration=calibration,
    )  # fmt: skip
