"""Reliability cases: output folders, concurrent runs, interrupts, injected faults, internal errors.

Real full disks (tmpfs, ``ulimit -f``) are exercised in ``tests/test_disk_full.py``; the faults here
are injected at the write sites so that each class is also checked through the in-process CLI.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from changedet.pipeline import detect, outputs
from changedet.io.outdir import OutputLock
from tests.reliability import Case, Ctx, case

# ------------------------------------------------------------------------------------------------
# outputs and faults
# ------------------------------------------------------------------------------------------------


@case("output exists without --overwrite")
def _(c: Ctx) -> Case:
    return Case(c.args(), "--overwrite", overwrite=False)


@case("output path is a file")
def _(c: Ctx) -> Case:
    shutil.rmtree(c.out)
    c.out.write_text("keep me")
    return Case(c.args(), "not a folder")


@case("unwritable output folder")
def _(c: Ctx) -> Case:
    if os.geteuid() != 0:
        c.out.chmod(0o555)  # holds the earlier outputs; restored by the test
        return Case(c.args(), "permission denied", status=1)
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no folder is unwritable")
    c.out = Path("/sys/changedet-reliability-out")  # root can write anywhere except pseudo file systems
    return Case(c.args(), "not permitted", status=1)


@case("interrupted run (Ctrl-C)")
def _(c: Ctx) -> Case:
    calls = []
    real = detect.predict_batch

    def interrupt_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    c.monkeypatch.setattr(detect, "predict_batch", interrupt_second_batch)
    return Case([*c.args(), "--tile", "32", "--overlap", "8", "--batch-size", "1"], "interrupted", status=130)


def _disk_full(path: str | Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@case("disk full in the tile store")
def _(c: Ctx) -> Case:
    def full(self, index, *args):
        raise _disk_full(self.path / "pred" / str(index))

    c.monkeypatch.setattr(detect.TileStore, "write", full)
    return Case(c.args(), "no space left on device", status=1)


@case("disk full while writing a COG")
def _(c: Ctx) -> Case:
    real = outputs.write_cog

    def full(src, dst, resampling="average"):
        if Path(dst).name == outputs.DIFFERENCE:  # the probability COG is complete, this one half-written
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
            raise _disk_full(dst)
        real(src, dst, resampling)

    c.monkeypatch.setattr(outputs, "write_cog", full)
    return Case(c.args(), "no space left on device", status=1)


@case("disk full while writing the GeoPackage")
def _(c: Ctx) -> Case:
    import geopandas as gpd
    from pyogrio.errors import FeatureError

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
        raise FeatureError("Could not add feature to layer at index 0: sqlite3_exec(...) failed: database or disk is full")

    c.monkeypatch.setattr(gpd.GeoDataFrame, "to_file", full)
    return Case(c.args(), "no space left on device", status=1)


@case("empty --out")
def _(c: Ctx) -> Case:
    c.monkeypatch.chdir(c.out)  # an empty path would mean the current folder: the earlier outputs are here
    return Case(c.args(), "--out is empty", out="")


@case("--out is an input band folder")
def _(c: Ctx) -> Case:
    for band in (c.city / "imgs_1").glob("*.tif"):
        shutil.copy(band, c.out)
    return Case(c.args(c.out, c.city / "imgs_2"), "bands of the next run")


@case("--out would overwrite an input")
def _(c: Ctx) -> Case:
    return Case(c.args(c.out / outputs.PROBABILITY, c.out / outputs.DIFFERENCE), "would overwrite the input")


@case("--out would overwrite an input reached through a symlink")
def _(c: Ctx) -> Case:
    link = c.tmp / "t1_link.tif"
    link.symlink_to(c.out / outputs.PROBABILITY)
    return Case(c.args(link, c.t2), "would overwrite the input")


@case("--out is a dangling symlink")
def _(c: Ctx) -> Case:
    shutil.rmtree(c.out)
    c.out.symlink_to(c.tmp / "gone")
    return Case(c.args(), "does not exist")


@case("another run holds the output folder")
def _(c: Ctx) -> Case:
    lock = OutputLock(c.out).__enter__()
    c.finalizers.append(lambda: lock.__exit__(None, None, None))
    return Case(c.args(), f"pid {os.getpid()}", status=75)


@case("internal error (a bug)")
def _(c: Ctx) -> Case:
    def bug(*args, **kwargs):
        raise RuntimeError("an unexpected failure")

    c.monkeypatch.setattr(detect, "predict_batch", bug)
    return Case(c.args(), "internal error: RuntimeError: an unexpected failure", status=3)
