"""The evaluation-stage registry: every stage honours the contract (config with a literal ``stage``, one
clean setting, report files, CLI and flow options derived from its config), a stage registered from
outside appears in the CLI, the flow and the report with no other edit, and robustness's preparation
(``--adv-finetune``) evaluates the fine-tuned checkpoint next to the original."""

from __future__ import annotations

import json
import shutil
from typing import Any, Literal, get_args

import numpy as np
import pytest
from pydantic import Field

from changedet.cli import build_parser, main
from changedet.evaluation.report import REPORT, report_names
from changedet.evaluation.tables import Line, Panel, format_metric, markdown_table
from changedet.evaluation.stages import CLEAN, STAGES, EvaluationConfig, Stage, all_stages, register_stage, stage_config
from changedet.evaluation.stages.robustness import RobustnessConfig
from changedet.metrics import ProbabilityHistogram, ValidationResult
from changedet.options import field_option
from changedet.weights import bundled_checkpoint
from flows.evaluate import EvaluateFlowParams
from flows.evaluate import build_parser as flow_parser


def _subcommand(parser, name):
    return next(a for a in parser._subparsers._group_actions if a.dest in ("command", "stage")).choices[name]


def _options(parser, name) -> set[str]:
    return {o for action in _subcommand(parser, name)._actions for o in action.option_strings}


def _key(setting: dict[str, Any]) -> tuple:
    return tuple(sorted(setting.items()))


@pytest.mark.parametrize("name", list(all_stages()))
def test_every_stage_honours_the_contract(name):
    stage = all_stages()[name]
    field = stage.config.model_fields["stage"]
    assert get_args(field.annotation) == (name,) and field.default == name and stage.name == name
    cfg = stage.config(data="somewhere")
    settings = stage.settings(cfg)
    assert len({_key(s) for s in settings}) == len(settings)  # no job twice
    clean = [s for s in settings if CLEAN in s.values()]
    # exactly one clean setting per variant (what is left once the clean/zero entries are dropped)
    variants = [_key({k: v for k, v in s.items() if v not in (CLEAN, 0.0)}) for s in clean]
    assert clean and len(set(variants)) == len(variants)
    assert report_names(name) == [REPORT, "report.md", "report.html", stage.plot_name] and stage.plot_name.endswith(".png")
    fields = [f for f in stage.config.model_fields if f != "stage"]
    for parser in (build_parser(), flow_parser()):
        assert {field_option(stage.config, f) for f in fields} <= _options(parser, name)
        defaults = parser.parse_args([name, "--data", "somewhere", "--out", "o"])
        assert stage_config(name, defaults) == cfg  # the options' defaults are the model's
    assert {"--out", "--overwrite", "--quiet"} <= _options(build_parser(), name)
    assert {"--out", "--overwrite", "--dask-address", "--workers"} <= _options(flow_parser(), name)


def test_robustness_has_one_clean_setting_and_domain_shift_one_per_adaptation():
    rob = all_stages()["robustness"].settings(RobustnessConfig(data="d", eps=[0, 2, 0], methods=["fgsm"], modes=["t1"]))
    assert rob == [{"method": CLEAN, "mode": CLEAN, "eps_255": 0.0, "steps": 0, "restarts": 0, "sigma_255": 0.0},
                   {"method": "fgsm", "mode": "t1", "eps_255": 2.0, "steps": 1, "restarts": 1, "sigma_255": 0.0}]  # fmt: skip
    shift = all_stages()["domain-shift"]
    settings = shift.settings(shift.config(data="d", shifts=["blur"], severities=[0, 3], adaptations=["none", "adabn"]))
    assert [s for s in settings if s["shift"] == CLEAN] == [
        {"shift": CLEAN, "severity": 0.0, "adaptation": "none"}, {"shift": CLEAN, "severity": 0.0, "adaptation": "adabn"},
    ]  # fmt: skip
    assert len(settings) == 4


@pytest.mark.parametrize("parser", [build_parser, flow_parser], ids=["cli", "flow"])
def test_the_existing_option_names_keep_their_meaning(parser):
    common = ["--data", "d", "--out", "o", "--model", "a", "--model", "b.safetensors", "--scenes", "x,y", "--tile", "64",
              "--overlap", "8", "--batch-size", "2", "--device", "cuda", "--overwrite"]  # fmt: skip
    args = parser().parse_args(["robustness", *common, "--eps", "0,2.5", "--modes", "fake,t1", "--methods", "pgd", "--steps", "3",
                                "--step-size", "0.5", "--random-start", "--adv-finetune", "at.safetensors", "--finetune-steps", "7",
                                "--restarts", "3,1", "--queries", "100"])  # fmt: skip
    cfg = stage_config("robustness", args)
    assert (cfg.checkpoints, cfg.data, cfg.scenes, cfg.tile, cfg.overlap, cfg.batch_size, cfg.device) == (
        ["a", "b.safetensors"], "d", ["x", "y"], 64, 8, 2, "cuda")
    assert (cfg.eps, cfg.modes, cfg.methods, cfg.steps, cfg.step_size, cfg.random_start) == ([0, 2.5], ["fake", "t1"], ["pgd"], [3], 0.5, True)
    assert (cfg.restarts, cfg.queries) == ([1, 3], 100)
    assert (cfg.adv_finetune, cfg.finetune_steps, args.out, args.overwrite) == ("at.safetensors", 7, "o", True)
    args = parser().parse_args(["domain-shift", "--data", "d", "--out", "o", "--shifts", "blur,haze", "--severities", "1,4",
                                "--adaptations", "adabn", "--dates", "both"])  # fmt: skip
    cfg = stage_config("domain-shift", args)
    assert (cfg.checkpoints, cfg.shifts, cfg.severities, cfg.adaptations, cfg.dates) == (["oscd-s2"], ["blur", "haze"], [1, 4], ["adabn"], "both")


@pytest.mark.parametrize("argv, expect", [
    (["robustness", "--data", "d", "--out", "o", "--tile", "8"], "--tile: must be at least 16, got 8"),
    (["robustness", "--data", "d", "--out", "o", "--finetune-steps", "0"], "--finetune-steps: must be at least 1, got 0"),
    (["domain-shift", "--data", "d", "--out", "o", "--dates", "t1"], "--dates: invalid choice"),
])  # fmt: skip
def test_bad_options_are_one_error_line(argv, expect, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0]


class ToyConfig(EvaluationConfig):
    """A stage defined outside the package: F1 of a fixed histogram per level."""

    stage: Literal["toy"] = "toy"
    levels: list[float] = Field(default_factory=lambda: [1.0, 2.0], description="toy levels")


@pytest.fixture
def toy_stage():
    @register_stage
    class Toy(Stage[ToyConfig]):
        config = ToyConfig
        help = "a toy stage"
        plot_name = "toy.png"
        xlabel = "level"

        def settings(self, cfg):
            return [{"level": 0.0}] + [{"level": float(v)} for v in cfg.levels]

        def evaluate(self, cfg, loaded, scene, setting):
            pos, neg = np.zeros(10, np.int64), np.zeros(10, np.int64)
            pos[9], pos[0], neg[0] = 10 - setting["level"], setting["level"], 10
            return ValidationResult({scene.name: ProbabilityHistogram(10, pos, neg)}, 10)

        def markdown(self, report):
            return ["## toy\n\n" + markdown_table(["level", "f1"], [[f"{r['level']:g}", format_metric(r["f1"])] for r in report["rows"]])]

        def panels(self, report):
            return [Panel("toy", [Line("f1", {r["level"]: r for r in report["rows"]})])]

    try:
        yield STAGES["toy"]
    finally:
        del STAGES["toy"]


def test_a_registered_stage_appears_in_the_cli_the_flow_and_the_report(toy_stage, sample_city, tmp_path, capsys):
    assert "--levels" in _options(build_parser(), "toy") and "--levels" in _options(flow_parser(), "toy")
    params = EvaluateFlowParams(config={"stage": "toy", "data": str(sample_city), "levels": [3]}, out=str(tmp_path))
    assert isinstance(params.config, ToyConfig) and params.config.levels == [3]
    assert params.model_dump()["config"]["levels"] == [3]
    out = tmp_path / "toy"
    assert main(["toy", "--data", str(sample_city), "--scenes", "bercy", "--out", str(out), "--levels", "5", "--quiet"]) == 0
    report = json.loads((out / REPORT).read_text())
    assert [(r["level"], r["f1"]) for r in report["rows"]] == [(0.0, 1.0), (5.0, pytest.approx(2 / 3))]
    assert "| 5 | 0.6667 |" in (out / "report.md").read_text() and (out / "toy.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "<td>0.6667</td>" in page and 'src="data:image/png;base64,' in page and "http" not in page
    assert "| 5 | 0.6667 |" in capsys.readouterr().out


def test_adv_finetune_evaluates_the_finetuned_checkpoint_next_to_the_first(sample_city, tmp_path, monkeypatch):
    calls = []

    def finetune(source, out, data, steps, device):
        calls.append((source, data, steps, device))
        shutil.copyfile(bundled_checkpoint("oscd-s2"), out)

    monkeypatch.setattr("changedet.evaluation.stages.robustness.finetune_checkpoint", finetune)
    at = tmp_path / "at.safetensors"
    argv = ["robustness", "--data", str(sample_city), "--scenes", "bercy", "--out", str(tmp_path / "r"), "--eps", "0",
            "--adv-finetune", str(at), "--finetune-steps", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert calls == [("oscd-s2", str(sample_city), 3, "cpu")]
    report = json.loads((tmp_path / "r" / REPORT).read_text())
    assert report["config"]["checkpoints"] == ["oscd-s2", str(at)] and "adv_finetune" not in report["config"]
    assert [r["checkpoint"] for r in report["rows"]] == ["oscd-s2-fc-siam-diff", "at"]
    assert report["rows"][0]["f1"] == report["rows"][1]["f1"]  # the same weights
