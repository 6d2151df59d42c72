"""Reliability test infrastructure: a failing case, its context, and the clean-failure check.

Every case runs against an output folder that already holds the outputs of an earlier successful
run, with ``--overwrite`` (so a run that got far enough would replace them), and must give:

* the documented exit status and exactly one ``error: <reason>`` line that names the cause, and no
  traceback;
* no partial output: no new raster, GeoPackage, style, PNG or staging folder anywhere in ``--out``
  (only the hidden tile store, kept so that a rerun resumes, may remain after an interrupt or a
  full disk);
* the earlier outputs byte-identical.

Case builders live in ``tests/reliability_cases_*.py`` and register themselves with :func:`case`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from changedet.pipeline import detect

OUTPUT_SUFFIXES = (".tif", ".tiff", ".gpkg", ".qml", ".png")


class Payload:
    """A pickle that creates ``marker`` when unpickled by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@dataclass
class Ctx:
    """What a case builder gets: a temp folder, the good pair, the bundled city, the output folder."""

    tmp: Path
    t1: Path
    t2: Path
    city: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    finalizers: list[Callable[[], None]] = field(default_factory=list)

    def args(self, t1: Path | str | None = None, t2: Path | str | None = None) -> list[str]:
        return ["--t1", str(t1 or self.t1), "--t2", str(t2 or self.t2)]


@dataclass(frozen=True)
class Case:
    """A failing run: CLI arguments (without --out), a fragment the error line must contain, the exit status."""

    args: list[str]
    expect: str
    status: int = 2
    overwrite: bool = True
    out: str | None = None  # another --out than the context's (e.g. an empty one)


CASES: dict[str, Callable[[Ctx], Case]] = {}


def case(name: str):
    def register(fn: Callable[[Ctx], Case]) -> Callable[[Ctx], Case]:
        CASES[name] = fn
        return fn

    return register


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (recursively) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


def assert_one_error_line(rc: int, err: str, status: int, expect: str) -> str:
    """The exit status is ``status`` and stderr holds one ``error:`` line containing ``expect``, no traceback."""
    assert rc == status, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    assert expect.lower() in lines[0].lower(), lines[0]
    return lines[0]


def assert_failed_cleanly(rc: int, err: str, out: Path, before: dict[str, bytes], expected: Case) -> None:
    """:func:`assert_one_error_line`, earlier outputs byte-identical, nothing new but the tile store."""
    assert_one_error_line(rc, err, expected.status, expected.expect)
    after = snapshot(out)
    assert {name: after.get(name) for name in before} == before, "earlier outputs changed"
    new = [name for name in after if name not in before]
    assert all(name.startswith(detect.TILE_STORE_DIR + "/") for name in new), new
    assert not [n for n in new if n.endswith(OUTPUT_SUFFIXES)], new
    assert not list(out.glob(".changedet-staging-*")) if out.is_dir() else True
