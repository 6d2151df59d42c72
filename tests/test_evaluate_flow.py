"""The evaluation flow on embedded Dask (same numbers as the in-process run, report files, artifact) and
the ``changedet domain-shift`` / ``robustness`` CLI."""

from __future__ import annotations

import json

from changedet.cli import main
from changedet.evaluation.runs import run_evaluation
from changedet.evaluation.stages.robustness import RobustnessConfig


def test_evaluate_flow_reports_match_the_in_process_run(prefect_api, sample_city, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.evaluate import EvaluateFlowParams, evaluate_model, task_runner

    config = RobustnessConfig(data=str(sample_city), scenes=["bercy"], eps=[0, 2], modes=["fake"], methods=["fgsm"])
    out = tmp_path / "robustness"
    report = evaluate_model.with_options(task_runner=task_runner(workers=1))(EvaluateFlowParams(config=config, out=str(out), threads=1))
    expected = run_evaluation(config)
    assert report["rows"] == expected["rows"] and len(report["rows"]) == 2
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"] == expected["rows"] and "| fgsm | fake |" in saved["markdown"]
    assert (out / "f1_vs_eps.png").stat().st_size > 1000 and not list(out.glob(".changedet-staging-*"))
    with get_client(sync_client=True) as client:
        assert "evaluation-robustness" in {a.key for a in client.read_latest_artifacts()}


def test_domain_shift_cli_writes_the_report(sample_city, tmp_path, capsys):
    args = ["--data", str(sample_city), "--scenes", "bercy", "--out", str(tmp_path / "ds"), "--quiet"]
    assert main(["domain-shift", *args, "--shifts", "blur", "--severities", "3", "--adaptations", "histmatch"]) == 0
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert [(r["shift"], r["severity"]) for r in report["rows"]] == [("clean", 0.0), ("blur", 3.0)]
    assert (tmp_path / "ds" / "f1_vs_severity.png").is_file() and "| blur |" in capsys.readouterr().out
    assert main(["domain-shift", *args, "--shifts", "blur"]) == 2  # existing report, no --overwrite
    assert main(["robustness", *args[:-3], "--out", str(tmp_path / "rob"), "--modes", "sideways"]) == 2
    assert "unknown robustness setting(s): sideways" in capsys.readouterr().err
