"""flows/monitor.py end to end: the bundled two-date STAC catalog of Bercy, dates ingested on Dask, one
JSON alert per crossing posted to a real HTTP receiver on 127.0.0.1 — and not again on the next step."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from changedet.testing.range_server import threaded_http_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def receiver():
    """An HTTP server on 127.0.0.1 keeping every POSTed JSON body."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    with threaded_http_server(Handler) as url:
        yield f"{url}hook", received


def test_flow_alerts_once_per_crossing(prefect_api, receiver, tmp_path):
    from flows.monitor import monitor_areas

    url, received = receiver
    areas = tmp_path / "areas.yaml"
    sample = REPO / "data" / "sample" / "oscd_bercy"
    areas.write_text(yaml.safe_dump([{"name": "bercy", "stac": str(sample / "stac" / "catalog.json"),
                                      "bbox": [2.362, 48.826, 2.398, 48.862], "persistence": 1, "max_cloud": 0.5,
                                      "zones": str(sample / "bercy.geojson"), "alert_ha": 5.0}]))  # fmt: skip
    first = monitor_areas(str(areas), str(tmp_path / "out"), webhook_url=url)
    assert first[0]["new"] == 2 and len(first[0]["alerts"]) == 1
    assert len(received) == 1
    alert = received[0]
    assert alert["area"] == "bercy" and alert["date"] == "2017-08-29" and alert["confirmed_ha"] > 5.0
    assert Path(alert["outputs"]) == (tmp_path / "out" / "bercy").absolute()
    before = (tmp_path / "out" / "bercy" / "first_change_date.tif").read_bytes()
    second = monitor_areas(str(areas), str(tmp_path / "out"), webhook_url=url)
    assert second[0]["new"] == 0 and second[0]["alerts"] == []
    assert len(received) == 1, "an alert was sent twice"
    assert (tmp_path / "out" / "bercy" / "first_change_date.tif").read_bytes() == before
