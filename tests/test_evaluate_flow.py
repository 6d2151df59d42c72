"""The evaluation flow on embedded Dask: same numbers as the in-process run, report files, artifact."""

from __future__ import annotations

import json

from changedet.evaluation.runs import (
    DomainShiftConfig,
    RobustnessConfig,
    run_evaluation,
)


def _configs(sample_city):
    common = {"data": str(sample_city), "scenes": ["bercy"], "tile": 256, "overlap": 32}
    return (
        RobustnessConfig(eps=[0, 2], modes=["fake"], methods=["fgsm"], **common),
        DomainShiftConfig(shifts=["blur"], severities=[3], adaptations=["histmatch"], **common),
    )


def test_evaluate_flow_reports_match_the_in_process_run(prefect_api, sample_city, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.evaluate import EvaluateFlowParams, evaluate_model, task_runner

    for config in _configs(sample_city):
        out = tmp_path / config.stage
        params = EvaluateFlowParams(config=config, out=str(out), threads=1)
        report = evaluate_model.with_options(task_runner=task_runner(workers=1))(params)
        expected = run_evaluation(config)
        assert report["rows"] == expected["rows"]
        saved = json.loads((out / "report.json").read_text())
        assert saved["rows"] == expected["rows"] and "| " in saved["markdown"]
        assert (out / ("f1_vs_eps.png" if config.stage == "robustness" else "f1_vs_severity.png")).stat().st_size > 1000
        assert not list(out.glob(".changedet-staging-*"))
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_latest_artifacts()}
    assert {"evaluation-robustness", "evaluation-domain-shift"} <= keys
