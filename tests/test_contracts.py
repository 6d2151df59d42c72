"""Contracts of the declared-once tables: detect parameters (one pydantic model, options derived for the
CLI and the flow) and the output table (every file, its dtype/nodata/style, the same set from the CLI
and the flow)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Literal

import pytest
import rasterio
from pydantic import BaseModel, Field

from changedet.cli import build_parser as cli_parser
from changedet.options import ParameterError, add_model_options, given_values, option_name
from changedet.pipeline.detect import detect_changes
from changedet.pipeline.output_table import CERTIFIED_RADIUS, OUTPUT_NAMES, OUTPUTS, RASTERS, RUN_JSON, ZONES_CSV
from changedet.pipeline.params import DetectParams
from changedet.testing.synthetic import write_synthetic_pair


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.fixture(scope="module")
def parsers() -> dict[str, dict[str, argparse.Action]]:
    from flows.detect import build_parser as flow_parser

    return {"changedet detect": _options(_subparser(cli_parser(), "detect")),
            "flows/detect.py run": _options(_subparser(flow_parser(), "run"))}


def test_every_detect_parameter_is_an_option_of_the_cli_and_the_flow(parsers):
    for where, options in parsers.items():
        for name, info in DetectParams.model_fields.items():
            assert option_name(name) in options, f"{where} lacks {option_name(name)}"
            action = options[option_name(name)]
            assert info.description and info.description in (action.help or ""), (where, name)
            if name != "threads":  # the flow documents its own per-worker default
                default = info.get_default()
                if default not in (None, False):
                    assert f"default {default}" in action.help, (where, name)


def test_flow_params_are_the_detect_params_plus_orchestration():
    from flows.detect import DetectFlowParams

    assert issubclass(DetectFlowParams, DetectParams)
    flow = DetectFlowParams(t1="a.tif", t2="b.tif", out="out", tile=64, overlap=8, blend="mean")
    assert flow.detect_params() == DetectParams(tile=64, overlap=8, blend="mean")
    assert set(DetectFlowParams.model_fields) - set(DetectParams.model_fields) == {"t1", "t2", "out", "name", "overwrite", "batches_per_task"}


def test_defaults_come_from_the_model_and_bad_values_name_the_option():
    parser = argparse.ArgumentParser()
    add_model_options(parser, DetectParams)
    assert DetectParams(**given_values(parser.parse_args([]), DetectParams)) == DetectParams()
    given = given_values(parser.parse_args(["--tile", "64", "--bands", "B04, B03", "--blend", "mean"]), DetectParams)
    assert given == {"tile": 64, "bands": ["B04", "B03"], "blend": "mean"}
    for values, expect in (({"tile": 8}, "--tile: must be at least 16, got 8"), ({"threshold": 2.0}, "--threshold"),
                           ({"tile": 64, "overlap": 64}, "--overlap must be in [0, tile)"), ({"runtime": "tf"}, "--runtime")):
        with pytest.raises(ParameterError, match=re.escape(expect)):
            DetectParams(**values)


def test_option_derivation_covers_every_field_kind():
    class Toy(BaseModel):
        size: int = Field(3, ge=1, description="a size")
        ratio: float | None = Field(None, description="a ratio")
        mode: Literal["a", "b"] = Field("a", description="a mode")
        names: list[str] | None = Field(None, description="names")
        levels: list[float] = Field(default_factory=lambda: [1.0, 2.0], description="levels")
        flag: bool = Field(False, description="a flag")
        path: str = Field(description="a required path")

    parser = argparse.ArgumentParser()
    add_model_options(parser, Toy)
    args = parser.parse_args(["--path", "p", "--size", "5", "--mode", "b", "--names", "x,y", "--levels", "0,4", "--flag"])
    assert Toy(**given_values(args, Toy)) == Toy(path="p", size=5, mode="b", names=["x", "y"], levels=[0.0, 4.0], flag=True)
    assert Toy(**given_values(parser.parse_args(["--path", "p"]), Toy)) == Toy(path="p")
    help_text = parser.format_help()
    assert "default 3; at least 1" in help_text and "default 1.0,2.0" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "p", "--mode", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --path is required


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("outputs")
    pair = write_synthetic_pair(root / "pair", 120, 100, bands=3, n_changes=3)
    detect_changes(pair.t1, pair.t2, root / "out", DetectParams(model="cva", tile=64, overlap=16))
    return pair, root / "out"


def test_detect_writes_exactly_the_output_table(outputs):
    pair, out = outputs
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)
    assert set(OUTPUT_NAMES) == {n for n, o in OUTPUTS.items() if o.default}
    assert {n for n, o in OUTPUTS.items() if not o.default} == {CERTIFIED_RADIUS, ZONES_CSV}  # with --smoothing-sigma, --zones
    summary = json.loads((out / RUN_JSON).read_text())
    assert summary["outputs"] == {n: n for n in OUTPUT_NAMES}
    assert summary["nodata"] == {o.name: o.nodata for o in RASTERS}
    with rasterio.open(pair.t1) as src:
        crs, transform = src.crs, src.transform
    for output in RASTERS:
        with rasterio.open(out / output.name) as ds:
            assert ds.dtypes[0] == output.dtype and ds.nodata == output.nodata
            assert ds.crs == crs and ds.transform == transform
        if output.style:
            assert (out / output.style).is_file() and OUTPUTS[output.style].kind == "style"


def test_the_flow_writes_the_same_files(prefect_api, outputs, tmp_path):
    from flows.detect import DetectFlowParams, detect_pair, task_runner

    pair, out = outputs
    params = DetectFlowParams(t1=str(pair.t1), t2=str(pair.t2), out=str(tmp_path / "flow"), model="cva", tile=64, overlap=16)
    detect_pair.with_options(task_runner=task_runner(workers=1))(params)
    assert sorted(p.name for p in (tmp_path / "flow").iterdir()) == sorted(p.name for p in out.iterdir())
    for output in RASTERS:
        assert (tmp_path / "flow" / output.name).read_bytes() == (out / output.name).read_bytes()


def test_inference_imports_no_training_evaluation_or_orchestration_code():
    """The layout's rule: what a detect run loads (pipeline, runtime, io, models) never pulls in training
    data, the trainer, the evaluation stages or Prefect."""
    import subprocess
    import sys

    code = ("import sys, changedet.pipeline.detect, changedet.pipeline.validation, changedet.runtime.onnx; "
            "print(','.join(sorted(m for m in sys.modules if m.startswith(('changedet.data', 'changedet.train', "
            "'changedet.evaluation', 'prefect')))))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_library_code_never_imports_prefect():
    """Flows are thin: orchestration lives in flows/, the library under changedet/ never imports Prefect."""
    import ast

    offenders = []
    for path in sorted((Path(__file__).resolve().parents[1] / "changedet").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("prefect", "prefect_dask")]
    assert offenders == []


def test_cached_plans_key_on_the_plan_layout(monkeypatch):
    """The flow's cached plans are keyed on the fields of everything a RunPlan pickles: a new field
    anywhere (here in the Normalization it holds) gives another key, so no stale plan is unpickled."""
    import dataclasses

    from changedet.normalization import Normalization
    from changedet.pipeline import planning

    before = planning.plan_layout()
    assert before == planning.plan_layout() and len(before) == 12
    grown = dataclasses.make_dataclass("Normalization", [("extra", int, dataclasses.field(default=0))], bases=(Normalization,), eq=False, frozen=True)
    monkeypatch.setattr(planning, "Normalization", grown)
    assert planning.plan_layout() != before
