"""The state of a monitored area between runs: per-pixel arrays and the dates already processed.

Per pixel the state holds the baseline (the last K clear acquisitions without change; ``previous`` is
K = 1), the run of consecutive changed acquisitions (its length, start date and summed probability),
the first confirmed change date and its mean probability over the confirming acquisitions, and the
last change probability. :func:`update` applies one compared date:

* a pixel valid on the date and in the baseline is *compared*; one changed there (the detection's
  mask) extends its run, one unchanged ends the run and joins the baseline;
* a run of ``persistence`` acquisitions confirms the change: the first confirmation keeps the run's
  start as ``first_change``, and the pixel's baseline restarts from the new state;
* a pixel not valid on the date (cloud, outside the footprint) is left as it is: it neither counts
  nor breaks a run; one valid on the date but not yet in the baseline starts its baseline.

:class:`MonitorState` is written atomically (arrays first, under a new name, then the JSON that
names them), so a run killed at any point resumes from the last completed date.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from changedet.io.writers import writing

ARRAYS = ("history", "observations", "run_length", "run_start", "run_probability", "first_change", "confirmed_probability",
          "last_probability", "compared")


@dataclass
class PixelState:
    """The per-pixel arrays (see the module docstring); ``history`` is ``(K, C, H, W)``, NaN where empty."""

    history: np.ndarray
    observations: np.ndarray
    run_length: np.ndarray
    run_start: np.ndarray
    run_probability: np.ndarray
    first_change: np.ndarray
    confirmed_probability: np.ndarray
    last_probability: np.ndarray
    compared: np.ndarray

    @classmethod
    def empty(cls, k: int, bands: int, shape: tuple[int, int]) -> "PixelState":
        """No acquisition yet."""
        return cls(np.full((k, bands, *shape), np.nan, np.float32), np.zeros(shape, np.uint16), np.zeros(shape, np.uint16),
                   np.zeros(shape, np.uint32), np.zeros(shape, np.float32), np.zeros(shape, np.uint32),
                   np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32), np.zeros(shape, bool))  # fmt: skip

    def baseline(self) -> tuple[np.ndarray, np.ndarray]:
        """The baseline image ``(C, H, W)`` (per-pixel median of the history, the last acquisition for
        K = 1) and where it is valid."""
        if self.history.shape[0] == 1:
            image = self.history[0]
        else:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels: no baseline yet
                image = np.nanmedian(self.history, axis=0).astype(np.float32)
        return image, np.all(np.isfinite(image), axis=0)

    def _push(self, where: np.ndarray, values: np.ndarray, restart: bool = False) -> None:
        if restart:
            self.history[:, :, where] = np.nan
            self.observations[where] = 0
        slot = self.observations.astype(np.int64) % self.history.shape[0]
        for k in range(self.history.shape[0]):
            here = where & (slot == k)
            self.history[k][:, here] = values[:, here]
        self.observations[where] += 1

    def start(self, values: np.ndarray, valid: np.ndarray) -> None:
        """Pixels valid on a date and without a baseline start one from it."""
        self._push(valid & ~self.baseline()[1], values)

    def update(self, values: np.ndarray, valid: np.ndarray, probability: np.ndarray, changed: np.ndarray, stamp: int,
               persistence: int) -> dict[str, np.ndarray]:  # fmt: skip
        """Apply one compared date (see the module docstring); returns its ``compared``, ``changed`` and
        ``confirmed`` (first confirmed on this date) pixels."""
        has_baseline = self.baseline()[1]
        compared = valid & has_baseline & np.isfinite(probability)
        hit, calm = compared & changed, compared & ~changed
        self.last_probability[compared] = probability[compared]
        self.compared |= compared
        self.run_length[calm] = 0
        self.run_probability[calm] = 0.0
        self._push(calm, values)
        starting = hit & (self.run_length == 0)
        self.run_start[starting] = stamp
        self.run_probability[starting] = 0.0
        self.run_length[hit] += 1
        self.run_probability[hit] += probability[hit]
        done = hit & (self.run_length >= persistence)
        confirmed = done & (self.first_change == 0)
        self.first_change[confirmed] = self.run_start[confirmed]
        self.confirmed_probability[confirmed] = self.run_probability[confirmed] / self.run_length[confirmed]
        self.run_length[done] = 0
        self.run_probability[done] = 0.0
        self._push(done, values, restart=True)
        self._push(valid & ~has_baseline, values)  # the baseline starts where there was none
        return {"compared": compared, "changed": hit, "confirmed": confirmed}


@dataclass
class MonitorState:
    """What a run continues from: the options' fingerprint, the grid, the dates processed (timeline
    rows), per-zone rows, the alerts already notified and the pixel arrays."""

    fingerprint: str
    grid: dict[str, Any] | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    zones: list[dict[str, Any]] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)
    pixels: PixelState | None = None

    @property
    def seen(self) -> set[str]:
        """Item ids already processed (compared, used as baseline or skipped)."""
        return {row["item"] for row in self.timeline}

    @property
    def last_date(self) -> str | None:
        """The latest date processed."""
        return self.timeline[-1]["date"] if self.timeline else None

    @property
    def reference(self) -> str | None:
        """The first date used (the grid's and co-registration's reference)."""
        return next((row["date"] for row in self.timeline if row["status"] != "skipped"), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (without the arrays)."""
        return {"fingerprint": self.fingerprint, "grid": self.grid, "timeline": self.timeline, "zones": self.zones,
                "notified": self.notified, "late": self.late}  # fmt: skip

    def save(self, folder: str | Path) -> None:
        """Write the arrays (a new file) and then ``progress.json`` naming them, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        document = self.to_dict()
        if self.pixels is not None:
            name = f"pixels-{len(self.timeline):05d}.npz"
            with writing(folder / name):
                with open(folder / f".{name}.partial", "wb") as fh:
                    np.savez(fh, **{k: getattr(self.pixels, k) for k in ARRAYS})
                os.replace(folder / f".{name}.partial", folder / name)
            document["pixels"] = name
        partial = folder / ".progress.json.partial"
        with writing(folder / "progress.json"):
            partial.write_text(json.dumps(document, indent=1))
            os.replace(partial, folder / "progress.json")
        for old in folder.glob("pixels-*.npz"):
            if old.name != document.get("pixels"):
                old.unlink()

    @classmethod
    def load(cls, folder: str | Path, fingerprint: str, pixels: bool = True) -> "MonitorState":
        """The state saved in ``folder``, or a new one; a state made with other options is not continued
        (:class:`ValueError`). ``pixels=False`` leaves the arrays unread (planning needs only the dates)."""
        path = Path(folder) / "progress.json"
        if not path.is_file():
            return cls(fingerprint)
        document = json.loads(path.read_text())
        if document["fingerprint"] != fingerprint:
            raise ValueError("options differ from the ones this folder's monitoring state was built with")
        arrays = None
        if pixels and document.get("pixels"):
            with np.load(Path(folder) / document["pixels"], allow_pickle=False) as stored:
                arrays = PixelState(**{k: stored[k] for k in ARRAYS})
        fields = {k: document[k] for k in ("grid", "timeline", "zones", "notified", "late")}
        return cls(fingerprint, pixels=arrays, **fields)
