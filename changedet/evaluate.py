"""Evaluate a predicted change mask against a label raster, streamed window by window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from changedet.errors import GridError, InputError
from changedet.grid import Grid
from changedet.io.scene import open_raster
from changedet.metrics import Confusion

STRIP = 1024


def infer_label_coding(values: set[int]) -> tuple[int, set[int]]:
    """``(change_value, ignore_values)`` from the label's distinct values.

    ``{0,1}`` -> change 1; ``{1,2}`` (OSCD ``cm.tif``) -> change 2, 0 ignored; ``{0,255}`` -> change 255.
    """
    if values <= {0, 1}:
        return 1, set()
    if values <= {0, 1, 2}:
        return 2, {0}
    if values <= {0, 255}:
        return 255, set()
    raise InputError(f"cannot infer the label coding from its values {sorted(values)[:10]}; pass --change-value")


def _label_window_reader(label, pred_grid: Grid, pred_path: Path):
    """A function ``window -> label array`` on the prediction grid."""
    label_grid = Grid.from_dataset(label)
    if label_grid.crs is not None and pred_grid.crs is not None:
        if label_grid.same_lattice(pred_grid):
            offset = label_grid.window_of(pred_grid)
            return lambda w: label.read(1, window=Window(w.col_off + offset.col_off, w.row_off + offset.row_off, w.width, w.height), boundless=True, fill_value=0)
        vrt = WarpedVRT(label, crs=pred_grid.crs, transform=pred_grid.transform, width=pred_grid.width, height=pred_grid.height, resampling=Resampling.nearest)
        return lambda w: vrt.read(1, window=w)
    if label_grid.crs is not None:
        raise GridError("the label is georeferenced but the prediction is not")
    if label_grid.shape == pred_grid.shape:
        return lambda w: label.read(1, window=w)
    run_json = pred_path.parent / "run.json"
    if run_json.is_file():
        reference = Grid.from_dict(json.loads(run_json.read_text())["reference_grid"])
        if reference.shape == label_grid.shape:
            offset = reference.window_of(pred_grid)
            return lambda w: label.read(1, window=Window(w.col_off + offset.col_off, w.row_off + offset.row_off, w.width, w.height))
    raise GridError(
        f"label {label_grid.height}x{label_grid.width} has no CRS and matches neither the prediction grid "
        f"{pred_grid.height}x{pred_grid.width} nor t1's grid recorded in run.json"
    )


def evaluate_mask(
    pred_path: str | Path,
    label_path: str | Path,
    change_value: int | None = None,
    ignore_values: set[int] | None = None,
) -> dict[str, Any]:
    """Precision, recall, F1, IoU, OA, kappa of ``pred_path`` (0/1, nodata excluded) vs a label.

    A label without CRS is taken to be on the prediction grid, or on t1's grid recorded in the
    ``run.json`` next to the prediction (OSCD ``cm.tif``). The label coding is inferred unless
    ``change_value`` is given.
    """
    pred_path = Path(pred_path)
    with open_raster(pred_path) as pred, open_raster(label_path) as label:
        grid = Grid.from_dataset(pred)
        read_label = _label_window_reader(label, grid, pred_path)
        windows = [Window(0, r, grid.width, min(STRIP, grid.height - r)) for r in range(0, grid.height, STRIP)]
        if change_value is None:
            values: set[int] = set()
            for w in windows:
                values |= set(np.unique(read_label(w)).tolist())
            change_value, inferred_ignore = infer_label_coding(values)
            ignore_values = inferred_ignore if ignore_values is None else ignore_values
        ignore_values = ignore_values or set()
        confusion = Confusion()
        for w in windows:
            p = pred.read(1, window=w)
            t = read_label(w)
            valid = (p != (pred.nodata if pred.nodata is not None else 255)) & ~np.isin(t, list(ignore_values))
            confusion.update(p == 1, t == change_value, valid)
    if confusion.total == 0:
        raise InputError("no pixel to evaluate: prediction and label share no valid pixel")
    return {**confusion.metrics(), "change_value": change_value, "ignore_values": sorted(ignore_values)}
