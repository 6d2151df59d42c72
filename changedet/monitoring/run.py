"""``changedet monitor``: one monitoring step over an area — the catalog's new acquisitions, in date order.

The step is split for orchestration (the Prefect flow maps :func:`ingest_date` over dates on Dask):

1. :func:`plan_monitor` — read the catalog (nothing is written before it answers), load the state,
   choose the grid, list the acquisitions not yet processed;
2. :func:`ingest_date` — put one acquisition on the grid (independent per date once the reference,
   the first usable date, exists);
3. :func:`apply_date` — compare it with the baseline through ``changedet detect``'s one path and update
   the state, strictly in date order; the state is saved after every date;
4. :func:`~changedet.monitoring.products.write_products` — the outputs, from the state alone, so an
   incremental run and one run over the whole period write the same bytes.

:func:`monitor_area` chains them in one process, holding the output folder's lock.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rasterio

from changedet.errors import InputError
from changedet.io.outdir import OutputLock, check_out_dir
from changedet.io.zones import row_areas
from changedet.monitoring.acquisition import ingest, monitoring_grid, read_band_folder, write_band_folder
from changedet.monitoring.catalog import Acquisition, acquisitions, catalog_items
from changedet.monitoring.params import MonitorParams
from changedet.monitoring.products import output_names, write_products, zone_masks, zone_rows
from changedet.monitoring.state import MonitorState, PixelState
from changedet.pipeline.grid import Grid
from changedet.pipeline.output_table import FLOAT_NODATA, MASK, PROBABILITY

STATE_DIR = ".monitor"


@dataclass(frozen=True)
class MonitorPlan:
    """One step over an area: where, with which options, on which grid, and the dates still to do."""

    out_dir: Path
    params: MonitorParams
    grid: Grid | None
    todo: tuple[Acquisition, ...]

    @property
    def state_dir(self) -> Path:
        """The hidden folder of the state, the saved items and the date folders."""
        return self.out_dir / STATE_DIR

    def date_dir(self, acquisition: Acquisition) -> Path:
        """Where one acquisition is put on the grid."""
        return self.state_dir / "dates" / acquisition.date

    @property
    def reference_dir(self) -> Path:
        """The first usable date's folder: the co-registration reference."""
        return self.state_dir / "reference"

    @cached_property
    def pixel_ha(self) -> np.ndarray:
        """Hectares of one pixel per grid row, ``(H, 1)``; computed once per step."""
        return row_areas(self.grid, 0, self.grid.height)[:, None] / 1e4

    @cached_property
    def zone_masks(self) -> list:
        """The zones rasterized on the grid (:func:`~changedet.monitoring.products.zone_masks`), once per step."""
        return zone_masks(self.params.zones, self.grid)


def load_state(out_dir: str | Path, params: MonitorParams, pixels: bool = True) -> MonitorState:
    """The state of ``out_dir`` (``pixels=False``: without its arrays); :class:`InputError` when it was
    built with other options."""
    try:
        return MonitorState.load(Path(out_dir) / STATE_DIR, params.fingerprint(), pixels)
    except ValueError as exc:
        raise InputError(f"--out {out_dir}: {exc}; monitor into a new folder to change them") from None


def plan_monitor(out_dir: str | Path, params: MonitorParams) -> MonitorPlan:
    """Read the catalog and the state; the acquisitions after the last processed date, oldest first.
    Items dated on or before it that were not seen then are recorded as late and left out (the
    period is processed in date order)."""
    out_dir = Path(out_dir).absolute()
    state = load_state(out_dir, params, pixels=False)
    items = catalog_items(params.stac, tuple(params.bbox), params.collection, params.start, params.end)
    folder = out_dir / STATE_DIR / "items"
    new = [a for a in acquisitions(items, tuple(params.bbox), folder) if a.item_id not in state.seen]
    late = [a for a in new if state.last_date is not None and a.date <= state.last_date]
    for acquisition in late:
        warnings.warn(f"item {acquisition.item_id} of {acquisition.date} arrived after {state.last_date} was processed: "
                      "left out (monitor into a new folder to include it)", stacklevel=2)  # fmt: skip
    todo = tuple(a for a in new if a not in late)
    grid = Grid.from_dict(state.grid) if state.grid else None
    if grid is None:
        first = next((a for a in todo if a.skipped is None), None)
        grid = None if first is None else monitoring_grid(first, params)
    return MonitorPlan(out_dir, params, grid, todo)


def has_reference(plan: MonitorPlan) -> bool:
    """Whether the reference date exists (later dates can then be ingested in any order)."""
    return (plan.reference_dir / "acquisition.json").is_file()


def ingest_date(plan: MonitorPlan, acquisition: Acquisition) -> dict[str, Any]:
    """Put ``acquisition`` on the plan's grid (see :func:`~changedet.monitoring.acquisition.ingest`); the
    first usable one becomes the reference."""
    (plan.state_dir / "dates").mkdir(parents=True, exist_ok=True)
    reference = plan.reference_dir if has_reference(plan) else None
    meta = ingest(acquisition, plan.grid, reference, plan.params, plan.date_dir(acquisition))
    if reference is None and meta["skipped"] is None:
        partial = plan.state_dir / ".reference.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(plan.date_dir(acquisition), partial)
        partial.replace(plan.reference_dir)
    return meta


def _detect(plan: MonitorPlan, state: MonitorState, date_dir: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The date against the baseline through ``changedet detect``: probability (NaN: not compared), changed, run.json."""
    from changedet.pipeline.detect import detect_changes

    baseline, valid = state.pixels.baseline()
    work = plan.state_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "baseline").mkdir(parents=True)
    write_band_folder(work / "baseline", meta["bands"], meta["dtypes"], plan.grid, baseline, valid)
    result = detect_changes(work / "baseline", date_dir, work / "detect", plan.params.detect_params(), overwrite=True)
    with rasterio.open(result.path(PROBABILITY)) as prob_ds, rasterio.open(result.path(MASK)) as mask_ds:
        if (prob_ds.transform, prob_ds.width, prob_ds.height) != (plan.grid.transform, plan.grid.width, plan.grid.height):
            raise RuntimeError(f"the detection of {meta['date']} is not on the monitoring grid")  # a bug: exit 3
        probability, mask = prob_ds.read(1), mask_ds.read(1)
    probability = np.where(probability == np.float32(FLOAT_NODATA), np.nan, probability).astype(np.float32)
    shutil.rmtree(work, ignore_errors=True)
    return probability, mask == 1, result.summary


def apply_date(plan: MonitorPlan, state: MonitorState, acquisition: Acquisition, meta: dict[str, Any]) -> dict[str, Any]:
    """Fold one ingested date into ``state`` (its timeline row and zone rows) and save it."""
    row = {"date": acquisition.date, "item": acquisition.item_id, "status": "skipped", "reason": meta["skipped"],
           "valid_fraction": meta["valid_fraction"], "cloud_fraction": meta["cloud_fraction"], "changed_ha": None,
           "new_confirmed_ha": None, "confirmed_ha": None, "threshold": None}  # fmt: skip
    date_dir = plan.date_dir(acquisition)
    if meta["skipped"] is None:
        state.grid = state.grid or plan.grid.to_dict()
        values, valid = read_band_folder(date_dir, plan.grid)
        area_ha = plan.pixel_ha
        if state.pixels is None:
            state.pixels = PixelState.empty(plan.params.baseline_k, values.shape[0], plan.grid.shape)
            state.pixels.start(values, valid)
            row["status"] = "baseline"
        else:
            probability, changed, summary = _detect(plan, state, date_dir, meta)
            pixels = state.pixels.update(values, valid, probability, changed, acquisition.stamp, plan.params.persistence)
            confirmed = state.pixels.first_change > 0
            row.update(status="compared", changed_ha=float((pixels["changed"] * area_ha).sum()),
                       new_confirmed_ha=float((pixels["confirmed"] * area_ha).sum()),
                       confirmed_ha=float((confirmed * area_ha).sum()), threshold=summary["threshold"])  # fmt: skip
            if plan.params.zones is not None:
                state.zones.extend(zone_rows(plan.zone_masks, acquisition.date, pixels, probability, confirmed, area_ha))
    state.timeline.append(row)
    state.save(plan.state_dir)
    if date_dir.exists() and date_dir.resolve() != plan.reference_dir.resolve():
        shutil.rmtree(date_dir, ignore_errors=True)
    return row


@dataclass
class MonitorResult:
    """Where the outputs are, the timeline rows of this step and the alerts not yet notified."""

    out_dir: Path
    new_rows: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    alerts: list[dict[str, Any]]


def monitor_area(out_dir: str | Path, params: MonitorParams, progress: Callable[[dict[str, Any]], None] | None = None) -> MonitorResult:
    """One monitoring step in this process (see the module docstring); outputs replaced atomically."""
    names = output_names(params)
    check_out_dir(out_dir, [params.stac], names)
    with OutputLock(out_dir):
        plan = plan_monitor(out_dir, params)
        state = load_state(plan.out_dir, params)
        rows = []
        for acquisition in plan.todo:
            row = apply_date(plan, state, acquisition, ingest_date(plan, acquisition))
            rows.append(row)
            if progress:
                progress(row)
        alerts = write_products(plan.out_dir, state, params)
    return MonitorResult(plan.out_dir, rows, state.timeline, pending_alerts(plan.out_dir, state, alerts))


def pending_alerts(out_dir: Path, state: MonitorState, alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alerts not yet notified, each with ``outputs``: the folder they concern."""
    return [{**a, "outputs": str(out_dir)} for a in alerts if a["id"] not in state.notified]


def mark_notified(out_dir: str | Path, params: MonitorParams, alert_ids: list[str]) -> None:
    """Record that these alerts were sent (they are not offered again)."""
    with OutputLock(out_dir):
        state = load_state(out_dir, params)
        state.notified.extend(i for i in alert_ids if i not in state.notified)
        state.save(Path(out_dir) / STATE_DIR)
