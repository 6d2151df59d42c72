"""Evaluate a predicted 0/1 change mask against a label raster, streamed strip by strip.

Which pixels are scored: valid prediction pixels (not nodata, not masked) that the label covers with a
valid pixel (inside its footprint, not its declared nodata, not masked by its GDAL mask band, finite).
Labels are put on the prediction grid by georeference, never by the upper-left corner: a label on the
same pixel lattice (same CRS, orientation, pixel size, whole-pixel offset) is read window by window; any
other label (another CRS, resolution, sub-pixel offset, rotated or south-up transform) is warped with
nearest resampling, which keeps its classes: a coarser label gives each prediction pixel the class of the
label pixel under its centre, a finer one the class of the label pixel nearest to its centre.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from changedet.errors import GridError, InputError
from changedet.pipeline.grid import Grid
from changedet.io.scene import open_raster
from changedet.metrics import Confusion
from changedet.pipeline.output_table import MASK, MASK_NODATA, RUN_JSON

STRIP = 1024
MASK_HINT = f"expected one band of 0 (no change) / 1 (change), nodata {MASK_NODATA}: pass {MASK}"

LabelReader = Callable[[Window], tuple[np.ndarray, np.ndarray]]


def infer_label_coding(values: set[int]) -> tuple[int, set[int]]:
    """``(change_value, ignore_values)`` from the label's distinct values.

    ``{0,1}`` -> change 1; ``{1,2}`` (OSCD ``cm.tif``) -> change 2, 0 ignored; ``{0,255}`` -> change 255.
    ``{1}`` and ``{0,2}`` fit two codings and are refused (:class:`InputError`: pass ``--change-value``).
    """
    if values in ({1}, {0, 2}):  # all no change under OSCD or all change under 0/1; OSCD without no-change or 0/2
        raise InputError(
            f"the label coding is ambiguous: its only values are {sorted(values)}; pass --change-value "
            "(and --ignore-value for unknown pixels)"
        )
    if values <= {0, 1}:
        return 1, set()
    if values <= {0, 1, 2}:
        return 2, {0}
    if values <= {0, 255}:
        return 255, set()
    raise InputError(f"cannot infer the label coding from its values {sorted(values)[:10]}; pass --change-value")


def _no_change(change_value: float, values: set) -> int:
    """The label value meaning "no change": 1 when change is 2 and the label has 1s (OSCD), else 0."""
    return 1 if change_value == 2 and 1 in values else 0


def _shape(grid: Grid) -> str:
    return f"{grid.height}x{grid.width}"


def _run_reference(pred_path: Path) -> Grid | None:
    """t1's grid recorded as ``reference_grid`` in the ``run.json`` next to the prediction, if any."""
    run_json = pred_path.parent / RUN_JSON
    if not run_json.is_file():
        return None
    try:
        data = json.loads(run_json.read_text())
        return Grid.from_dict(data["reference_grid"]) if "reference_grid" in data else None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read t1's grid (reference_grid) from {run_json}: {exc}") from None


def _label_grid(label: DatasetReader, name: str, pred: Grid, pred_path: Path) -> tuple[Grid, str | None]:
    """The grid the label lies on, and a warning to give when that is an assumption.

    A label without CRS lies on t1's grid recorded in ``run.json`` (its shape must match), or, with no
    ``run.json``, on the prediction's grid (its shape must match; warned about when the prediction is
    georeferenced).
    """
    own = Grid.from_dataset(label)
    if own.is_georeferenced:
        if not pred.is_georeferenced:
            raise GridError(f"the label {name} is georeferenced but the prediction {pred_path.name} is not")
        return own, None
    reference = _run_reference(pred_path)
    if reference is not None:
        if reference.shape != own.shape:
            raise GridError(
                f"label {name} has no CRS and is {_shape(own)} px, but t1's grid recorded in run.json is "
                f"{_shape(reference)} px: cannot tell where the label lies"
            )
        return Grid(reference.crs, reference.transform, own.width, own.height), None
    if own.shape != pred.shape:
        raise GridError(
            f"label {name} has no CRS and is {_shape(own)} px but the prediction is {_shape(pred)} px "
            "(and no run.json beside the prediction records t1's grid): cannot tell where the label lies"
        )
    note = f"label {name} has no georeference: assuming it is on the prediction's pixel grid"
    return Grid(pred.crs, pred.transform, own.width, own.height), note if pred.is_georeferenced else None


def _label_reader(label: DatasetReader, grid: Grid, pred: Grid, stack: ExitStack) -> LabelReader:
    """A function ``window of the prediction -> (label values, label valid)`` on the prediction grid."""
    try:
        offset = grid.window_of(pred)
    except GridError:
        offset = None
    if offset is not None:
        dtype = label.dtypes[0]

        def read(w: Window) -> tuple[np.ndarray, np.ndarray]:
            values = np.zeros((w.height, w.width), dtype)
            valid = np.zeros((w.height, w.width), bool)
            row0, col0 = offset.row_off + w.row_off, offset.col_off + w.col_off
            r0, r1 = max(row0, 0), min(row0 + w.height, label.height)
            c0, c1 = max(col0, 0), min(col0 + w.width, label.width)
            if r1 > r0 and c1 > c0:  # only the part of the window inside the label is covered
                src = Window(c0, r0, c1 - c0, r1 - r0)
                inside = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
                values[inside] = label.read(1, window=src)
                valid[inside] = label.read_masks(1, window=src) != 0
            return values, valid

        return read
    if grid.crs is None or pred.crs is None:
        raise GridError("the label and the prediction are on different pixel grids and one has no CRS to align them by")
    vrt = stack.enter_context(WarpedVRT(
        label, src_crs=grid.crs, src_transform=grid.transform, crs=pred.crs, transform=pred.transform,
        width=pred.width, height=pred.height, resampling=Resampling.nearest, add_alpha=True,
    ))  # the added alpha band is 0 outside the label and on its nodata/mask
    return lambda w: (vrt.read(1, window=w), vrt.read(vrt.count, window=w) != 0)


def _check_prediction(pred: DatasetReader, name: str, windows: list[Window]) -> None:
    """:class:`InputError` unless the prediction is one band of 0/1 among its valid pixels (streamed)."""
    if pred.count != 1:
        raise InputError(f"prediction {name} has {pred.count} bands; {MASK_HINT}")
    if pred.nodata is not None and pred.nodata in (0, 1):
        raise InputError(f"prediction {name} declares nodata {pred.nodata:g}, a mask class; {MASK_HINT}")
    lo, hi, other = math.inf, -math.inf, False
    for w in windows:
        p = pred.read(1, window=w)
        v = p[pred.read_masks(1, window=w) != 0]
        other = other or bool(np.any((v != 0) & (v != 1)))
        finite = v[np.isfinite(v)] if v.dtype.kind == "f" else v
        if finite.size:
            lo, hi = min(lo, finite.min().item()), max(hi, finite.max().item())
    if other:
        found = f"values {lo:.4g}..{hi:.4g}" if lo <= hi else "no finite value"
        raise InputError(f"prediction {name} is not a 0/1 change mask ({pred.dtypes[0]}, {found}); {MASK_HINT}")


def _check_coding(name: str, values: set, change_value: float, ignore: set, nodata: float | None) -> None:
    """:class:`InputError` when the label's valid values do not fit ``change_value`` / no-change / ignored."""
    no_change = _no_change(change_value, values)
    for role, value in (("change", change_value), ("no-change", no_change)):
        if nodata is not None and nodata == value and value not in ignore:
            raise InputError(
                f"label {name} declares nodata {nodata:g}, which is also its {role} value: "
                "fix the label's nodata (gdal_edit.py -unsetnodata) or pass --change-value"
            )
    unexpected = values - ignore - {change_value, no_change}
    if unexpected:
        raise InputError(
            f"label {name} has values {sorted(unexpected)[:10]} besides change {change_value:g} and no-change "
            f"{no_change}: pass --ignore-value for them, or the right --change-value"
        )


def _confusion(counts: dict[Any, np.ndarray], change_value: float, ignore: set) -> tuple[Confusion, int]:
    """The confusion of the pixels counted per label value (prediction 0, 1, invalid), and how many
    valid prediction pixels lie on an ignored label value."""
    confusion, ignored = Confusion(), 0
    for value, (n0, n1, _) in counts.items():
        if value in ignore:
            ignored += int(n0 + n1)
        elif value == change_value:
            confusion.fn, confusion.tp = confusion.fn + int(n0), confusion.tp + int(n1)
        else:
            confusion.tn, confusion.fp = confusion.tn + int(n0), confusion.fp + int(n1)
    return confusion, ignored


def _label_values(label: DatasetReader, most: int = 64) -> set:
    """The distinct valid values of the whole label (not only under the prediction: a label's coding
    is a property of the label), streamed by strips; stops after ``most`` distinct values."""
    values: set = set()
    for row in range(0, label.height, STRIP):
        window = Window(0, row, label.width, min(STRIP, label.height - row))
        data = label.read(1, window=window)
        valid = label.read_masks(1, window=window) != 0
        if label.nodata is not None:
            valid &= ~(np.isnan(data) if np.isnan(label.nodata) else data == label.nodata)
        if data.dtype.kind == "f":
            valid &= np.isfinite(data)
        values |= set(np.unique(data[valid]).tolist())
        if len(values) > most:
            break
    return values


def evaluate_mask(
    pred_path: str | Path,
    label_path: str | Path,
    change_value: int | None = None,
    ignore_values: set[int] | None = None,
) -> dict[str, Any]:
    """Precision, recall, F1, IoU, OA, kappa and the confusion counts of a 0/1 change mask vs a label.

    The prediction must be one band of 0/1 among its valid pixels (its declared nodata and GDAL-masked
    pixels excluded; detect writes nodata 255), else :class:`InputError` names what was found. Only pixels
    valid in both are scored; see the module docstring for how the label is put on the prediction grid.
    A label without CRS lies on t1's grid recorded in the ``run.json`` next to the prediction (OSCD
    ``cm.tif``), or, without ``run.json``, on the prediction's grid when the shapes match (warned).

    The coding is inferred from the valid values of the whole label (:func:`infer_label_coding`;
    nodata and masked pixels never count; ambiguous sets are refused) unless
    ``change_value`` is given; ``ignore_values`` replaces the inferred ignored values. The no-change
    value is 1 when change is 2 and the label has 1s, else 0. Refused: valid label values that are neither
    change, no-change nor ignored (a wrong ``change_value``), a declared nodata equal to the change or
    no-change value, a change value that is also ignored,
    and no shared valid pixel. A change value absent from the label is allowed (no change there).

    Besides the metrics, the dict has ``change_value``, ``ignore_values``, ``scored_pixels``,
    ``unscored_pixels`` (valid prediction pixels outside the label or on its nodata/mask; warned when
    non-zero) and ``ignored_pixels`` (on an ignored label value).
    """
    pred_path, label_path = Path(pred_path), Path(label_path)
    counts: dict[Any, np.ndarray] = {}  # label value -> pixels with prediction 0, 1, invalid
    unscored = 0
    with open_raster(pred_path) as pred, open_raster(label_path) as label, ExitStack() as stack:
        grid = Grid.from_dataset(pred)
        windows = [Window(0, r, grid.width, min(STRIP, grid.height - r)) for r in range(0, grid.height, STRIP)]
        _check_prediction(pred, pred_path.name, windows)
        label_grid, note = _label_grid(label, label_path.name, grid, pred_path)
        read_label = _label_reader(label, label_grid, grid, stack)
        for w in windows:
            p = pred.read(1, window=w)
            code = np.where(pred.read_masks(1, window=w) != 0, p == 1, 2).astype(np.int64)
            t, valid = read_label(w)
            if t.dtype.kind == "f":
                valid &= np.isfinite(t)
            unscored += int(np.count_nonzero(~valid & (code != 2)))  # valid prediction, no valid label
            values, inverse = np.unique(t[valid], return_inverse=True)
            per_value = np.bincount(inverse.ravel() * 3 + code[valid], minlength=3 * values.size).reshape(-1, 3)
            for value, n in zip(values.tolist(), per_value):
                counts[value] = counts.get(value, 0) + n
        nodata = label.nodata
        label_values = _label_values(label) if change_value is None else set()
    if change_value is None and counts:
        if nodata is not None and nodata in (0, 1, 2, 255):  # a mask whose nodata is one of its own classes
            try:
                coding = infer_label_coding(label_values | {nodata})
            except InputError:
                coding = None
            if coding is not None:
                _check_coding(label_path.name, set(), *coding, nodata)
        change_value, inferred_ignore = infer_label_coding(label_values)
        ignore_values = inferred_ignore if ignore_values is None else ignore_values
    ignore = set(ignore_values or ())
    if change_value in ignore:
        raise InputError(f"--change-value {change_value:g} is also an --ignore-value: a value is either change or ignored")
    if counts:
        _check_coding(label_path.name, set(counts), change_value, ignore, nodata)
    confusion, ignored = _confusion(counts, change_value, ignore)
    if confusion.total == 0:
        raise InputError(
            f"no pixel to evaluate: prediction and label share no valid pixel ({unscored} valid prediction "
            f"pixels outside the label or on its nodata, {ignored} on ignored label values)"
        )
    if note:
        warnings.warn(note, stacklevel=2)
    if unscored:
        warnings.warn(
            f"{unscored} valid prediction pixels are outside the label or on its nodata and were not scored "
            f"({confusion.total} scored)", stacklevel=2,
        )
    return {
        **confusion.metrics(), "change_value": change_value, "ignore_values": sorted(ignore),
        "scored_pixels": confusion.total, "unscored_pixels": unscored, "ignored_pixels": ignored,
    }
