"""Prefect flow: one monitoring step for every area of a YAML list (scheduled), dates ingested on Dask.

Thin orchestration over :mod:`changedet.monitoring.run`: per area, plan (catalog + state) → ingest each
new acquisition onto the area's grid (mapped on Dask once the reference date exists) → fold the dates
into the state in date order → write the outputs → a markdown artifact with the timeline → one webhook
notification per alert (a zone's confirmed area crossing its limit), recorded so it is never sent twice.
Tasks retry on I/O errors only.

    python -m flows.monitor run --areas configs/monitor/areas.yaml --out-root outputs/monitor [--webhook-url URL]
    python -m flows.monitor serve --areas configs/monitor/areas.yaml --out-root outputs/monitor --cron "0 6 * * *"

The areas file is a list of mappings: ``name`` (the output folder under ``--out-root``) and any
``changedet monitor`` option (``stac``, ``bbox`` as [W, S, E, N], ``zones``, ``alert_ha``, ``model``…),
relative paths resolved against the file's folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.notifications import CustomWebhookNotificationBlock

from changedet.errors import ChangeDetError, InputError
from changedet.failures import ErrorLineParser, command_main
from changedet.io.outdir import OutputLock, check_out_dir
from changedet.io.remote import is_url
from changedet.monitoring.catalog import Acquisition
from changedet.monitoring.params import MonitorParams
from changedet.monitoring.products import output_names, write_products
from changedet.monitoring.run import (MonitorPlan, apply_date, has_reference, ingest_date, load_state, mark_notified,
                                      pending_alerts, plan_monitor)  # fmt: skip
from flows.detect import FLOW_LOGGERS, _only_io_errors, task_runner

PATH_FIELDS = ("stac", "zones")


def read_areas(path: str | Path) -> list[tuple[str, MonitorParams]]:
    """``(name, parameters)`` of every area in the YAML list at ``path``; :class:`InputError` when unusable."""
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read areas {path}: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
        raise InputError(f"areas {path} must be a list of mappings, each with a name")
    areas = []
    for entry in entries:
        fields = {k: v for k, v in entry.items() if k != "name"}
        for key in PATH_FIELDS:
            if isinstance(fields.get(key), str) and not is_url(fields[key]) and not Path(fields[key]).is_absolute():
                fields[key] = str((path.parent / fields[key]).resolve())
        areas.append((str(entry["name"]), MonitorParams(**fields)))
    return areas


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_only_io_errors)
def plan(out: str, params: MonitorParams) -> MonitorPlan:
    """The catalog's new acquisitions over the area and its grid."""
    return plan_monitor(out, params)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_only_io_errors)
def ingest(monitor_plan: MonitorPlan, acquisition: Acquisition) -> dict[str, Any]:
    """One acquisition onto the grid (any Dask worker)."""
    return ingest_date(monitor_plan, acquisition)


@task
def fold(monitor_plan: MonitorPlan, metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ingested dates into the state, in date order, then the outputs; returns the alerts to send."""
    state = load_state(monitor_plan.out_dir, monitor_plan.params)
    for acquisition, meta in zip(monitor_plan.todo, metas):
        row = apply_date(monitor_plan, state, acquisition, meta)
        print(f"{row['date']}: {row['status']}" + (f" ({row['reason']})" if row["reason"] else
              f", confirmed {row['confirmed_ha']:.2f} ha" if row["confirmed_ha"] is not None else ""))  # fmt: skip
    return pending_alerts(monitor_plan.out_dir, state, write_products(monitor_plan.out_dir, state, monitor_plan.params))


def _artifact(name: str, out: Path, alerts: list[dict[str, Any]]) -> None:
    """The area's markdown artifact: the timeline plot (inline PNG), the timeline table and the alerts."""
    import base64
    import csv

    with open(out / "timeline.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    plot = base64.b64encode((out / "timeline.png").read_bytes()).decode()
    lines = [f"# Monitoring: {name}", "", f"Outputs: `{out}`", "", f"![timeline](data:image/png;base64,{plot})", "",
             "| date | status | valid | cloud | changed ha | confirmed ha |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['date']} | {r['status']}{' — ' + r['reason'] if r['reason'] else ''} | {r['valid_fraction']} | "
              f"{r['cloud_fraction']} | {r['changed_ha']} | {r['confirmed_ha']} |" for r in rows]  # fmt: skip
    if alerts:
        lines += ["", "## Alerts", ""] + [f"- zone **{a['zone']}**: {a['confirmed_ha']} ha confirmed by {a['date']} "
                                          f"(limit {a['limit_ha']} ha)" for a in alerts]  # fmt: skip
    create_markdown_artifact("\n".join(lines), key=f"monitor-{name}".lower().replace("_", "-")[:60], description=f"monitoring {name}")


def notify(alerts: list[dict[str, Any]], webhook_url: str | None, webhook_block: str | None) -> list[str]:
    """Post each alert as JSON through a Custom Webhook notification block (saved as ``webhook_block``,
    or made for ``webhook_url``); returns the ids sent."""
    if not alerts or not (webhook_url or webhook_block):
        return []
    base = CustomWebhookNotificationBlock.load(webhook_block) if webhook_block else \
        CustomWebhookNotificationBlock(name="changedet-monitor", url=webhook_url)  # fmt: skip
    sent = []
    for alert in alerts:
        block = base.model_copy(update={"json_data": alert})
        block.notify(f"zone {alert['zone']}: {alert['confirmed_ha']} ha confirmed by {alert['date']}", subject=f"changedet: {alert['area']}")
        sent.append(alert["id"])
    return sent


@flow(name="monitor-area", log_prints=True)
def monitor_step(name: str, params: MonitorParams, out: str, webhook_url: str | None = None,
                 webhook_block: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One monitoring step over one area; its new dates are ingested on the flow's Dask task runner."""
    check_out_dir(out, [params.stac], output_names(params))
    with OutputLock(out):
        monitor_plan = plan(out, params)
        metas: list[dict[str, Any]] = []
        todo = list(monitor_plan.todo)
        while todo and not has_reference(monitor_plan):  # the reference first: later dates co-register onto it
            metas.append(ingest(monitor_plan, todo.pop(0)))
        metas += [f.result() for f in ingest.map(unmapped(monitor_plan), todo)]
        alerts = fold(monitor_plan, metas)
        _artifact(name, Path(out), alerts)
    sent = notify(alerts, webhook_url, webhook_block)
    if sent:
        mark_notified(out, params, sent)
    print(f"{name}: {len(monitor_plan.todo)} new acquisition(s), {len(alerts)} alert(s) pending, {len(sent)} sent")
    return {"name": name, "new": len(monitor_plan.todo), "alerts": sent}


@flow(name="monitor-areas", log_prints=True)
def monitor_areas(areas: str, out_root: str, webhook_url: str | None = None, webhook_block: str | None = None,
                  dask_address: str | None = None, workers: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`monitor_step` for every area of the YAML list ``areas``, outputs in ``out_root/<name>``."""
    results = []
    for name, params in read_areas(areas):
        step = monitor_step.with_options(task_runner=task_runner(dask_address, workers), flow_run_name=f"monitor-{name}")
        results.append(step(name, params, str(Path(out_root).absolute() / name), webhook_url, webhook_block))
    return results


def build_parser() -> ErrorLineParser:
    """The ``python flows/monitor.py`` argument parser."""
    parser = ErrorLineParser(prog="python -m flows.monitor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ErrorLineParser)
    for command in ("run", "serve"):
        p = sub.add_parser(command, help="one monitoring step now" if command == "run" else "serve the flow on a cron schedule")
        p.add_argument("--areas", required=True, help="YAML list of areas (configs/monitor/areas.yaml)")
        p.add_argument("--out-root", required=True, help="outputs of each area in OUT_ROOT/<name>")
        p.add_argument("--webhook-url", default=None, help="post each alert as JSON to this URL")
        p.add_argument("--webhook-block", default=None, help="or through this saved Custom Webhook block")
        p.add_argument("--dask-address", default=None, help="tcp://host:port of an existing Dask scheduler")
        p.add_argument("--workers", type=int, default=1, help="embedded LocalCluster worker processes")
        if command == "serve":
            p.add_argument("--cron", default="0 6 * * *")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; one ``error: <reason>`` line on failure (statuses of :mod:`changedet.failures`)."""
    logging.getLogger("distributed").setLevel(logging.WARNING)

    def work(args: list[str]) -> int:
        parsed = build_parser().parse_args(args)
        if parsed.workers < 1:
            raise ChangeDetError(f"--workers must be >= 1, got {parsed.workers}")
        parameters = {"areas": parsed.areas, "out_root": parsed.out_root, "webhook_url": parsed.webhook_url,
                      "webhook_block": parsed.webhook_block, "dask_address": parsed.dask_address, "workers": parsed.workers}  # fmt: skip
        if parsed.command == "run":
            read_areas(parsed.areas)  # refused before any flow starts
            monitor_areas(**parameters)
        else:
            monitor_areas.serve(name="changedet-monitor", cron=parsed.cron, parameters=parameters)
        return 0

    return command_main(argv, work, FLOW_LOGGERS)


if __name__ == "__main__":
    sys.exit(main())
