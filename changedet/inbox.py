"""Find pairs to process: a folder of pair folders, or a CSV pair list; skip pairs already done."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from changedet.errors import InputError
from changedet.io.remote import is_remote
from changedet.io.scene import RASTER_SUFFIXES
from changedet.pipeline.output_table import RUN_JSON


@dataclass(frozen=True)
class PairJob:
    """One pair to process: a ``name`` (used for the output folder), and both dates."""

    name: str
    t1: str
    t2: str


def _date_input(folder: Path, date: str) -> Path | None:
    """``folder/t1`` (a folder of band files), ``folder/t1.<raster suffix>`` or ``folder/t1.json`` (a STAC Item)."""
    if (folder / date).is_dir():
        return folder / date
    for suffix in (*RASTER_SUFFIXES, ".json"):
        if (folder / f"{date}{suffix}").is_file():
            return folder / f"{date}{suffix}"
    return None


def discover_pairs(source: str | Path) -> list[PairJob]:
    """Pairs in ``source``: a CSV with columns ``name,t1,t2`` (paths relative to the CSV, URLs and STAC
    Item URLs allowed), or
    a folder whose sub-folders each hold ``t1`` and ``t2`` (folders or single rasters ``t1.tif``…)."""
    source = Path(source)
    if source.is_file():
        with open(source, newline="") as fh:
            rows = list(csv.DictReader(fh))
        missing = {"name", "t1", "t2"} - set(rows[0] if rows else {})
        if missing:
            raise InputError(f"pair list {source} needs columns name,t1,t2 (missing {', '.join(sorted(missing))})")
        return [PairJob(r["name"], *(r[d] if is_remote(r[d]) else str(source.parent / r[d]) for d in ("t1", "t2"))) for r in rows]
    if not source.is_dir():
        raise InputError(f"inbox {source} is neither a folder nor a pair list")
    jobs = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        t1, t2 = _date_input(folder, "t1"), _date_input(folder, "t2")
        if t1 is not None and t2 is not None:
            jobs.append(PairJob(folder.name, str(t1), str(t2)))
    return jobs


def outputs_current(out_dir: str | Path, fingerprint: str) -> bool:
    """True when ``out_dir/run.json`` records a finished run with this content fingerprint."""
    run_json = Path(out_dir) / RUN_JSON
    try:
        return json.loads(run_json.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False
