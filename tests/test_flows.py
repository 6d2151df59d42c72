"""Prefect orchestration: the detect flow on embedded and real Dask clusters, the deployment from
prefect.yaml run by a real worker, the inbox discovery, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from changedet.pipeline.detect import DIFFERENCE, MASK, PROBABILITY, TILE_STORE_DIR, DetectParams, detect_changes
from changedet.inbox import discover_pairs, outputs_current
from changedet.testing.synthetic import write_synthetic_pair

REPO = Path(__file__).resolve().parents[1]
RASTERS = (PROBABILITY, MASK, DIFFERENCE)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_synthetic_pair(tmp_path_factory.mktemp("pair"), 300, 280, bands=3, n_changes=6)


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """Outputs of the plain in-process run, what every orchestrated run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    detect_changes(pair.t1, pair.t2, out, DetectParams(tile=64, overlap=16, batch_size=4), overwrite=True)
    return out


def _same_rasters(a: Path, b: Path) -> None:
    for name in RASTERS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _flow_params(pair, out: Path):
    from flows.detect import DetectFlowParams

    return DetectFlowParams(t1=str(pair.t1), t2=str(pair.t2), out=str(out), name="synthetic", tile=64, overlap=16, batch_size=4)


def test_flow_on_embedded_dask_matches_the_cli_run(prefect_api, pair, reference, tmp_path):
    from prefect.client.orchestration import get_client
    from flows.detect import detect_pair, task_runner

    out = tmp_path / "flow"
    summary = detect_pair.with_options(task_runner=task_runner(workers=1))(_flow_params(pair, out))
    _same_rasters(out, reference)
    assert (out / "quicklook.png").is_file() and not (out / TILE_STORE_DIR).exists()
    assert outputs_current(out, summary["fingerprint"])
    # a second run with the same content is a no-op
    again = detect_pair.with_options(task_runner=task_runner(workers=1))(_flow_params(pair, out))
    assert again == {"fingerprint": summary["fingerprint"], "skipped": True}
    with get_client(sync_client=True) as client:
        # the Prefect server is shared by the session's flow tests: pick this pair's artifact
        artifact = next(a for a in client.read_latest_artifacts() if "synthetic" in a.key)
    assert "ha in" in artifact.data


def test_flow_runs_randomized_smoothing_on_dask_like_the_cli(prefect_api, pair, tmp_path):
    from flows.detect import DetectFlowParams, detect_pair, task_runner

    from changedet.pipeline.output_table import CERTIFIED_RADIUS

    smoothing = {"model": "cva", "tile": 64, "overlap": 16, "batch_size": 4, "smoothing_sigma": 1.0, "smoothing_samples": 30}
    cli = tmp_path / "cli"
    detect_changes(pair.t1, pair.t2, cli, DetectParams(**smoothing))
    out = tmp_path / "flow"
    params = DetectFlowParams(t1=str(pair.t1), t2=str(pair.t2), out=str(out), name="smoothed", **smoothing)
    detect_pair.with_options(task_runner=task_runner(workers=2))(params)
    for name in (*RASTERS, CERTIFIED_RADIUS):
        assert (out / name).read_bytes() == (cli / name).read_bytes(), name


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_flow_on_real_dask_scheduler_and_two_workers(prefect_api, pair, reference, tmp_path):
    from distributed import Client
    from flows.detect import detect_pair, task_runner

    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bin_dir = Path(sys.executable).parent
    procs = [_start([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(scheduler_file)], env)]
    try:
        for _ in range(600):
            if scheduler_file.exists():
                break
            time.sleep(0.1)
        procs.append(_start([str(bin_dir / "dask"), "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "2",
                             "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"], env))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            address = client.scheduler.address
        out = tmp_path / "dask"
        detect_pair.with_options(task_runner=task_runner(dask_address=address))(_flow_params(pair, out))
        _same_rasters(out, reference)
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=30)


@pytest.mark.slow
def test_deployment_from_prefect_yaml_runs_on_a_worker(prefect_api, pair, reference, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "CHANGEDET_HOME": str(REPO), "PYTHONPATH": str(REPO)}
    prefect = [str(Path(sys.executable).parent / "prefect"), "--no-prompt"]

    def cli(*args: str, timeout: int = 180) -> str:
        done = subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("work-pool", "create", "changedet", "--type", "process", "--overwrite")
    cli("deploy", "--all")
    assert "*/15 * * * *" in cli("deployment", "inspect", "detect-inbox/inbox")
    out = tmp_path / "deployed"
    params = {"params": _flow_params(pair, out).model_dump()}
    cli("deployment", "run", "detect-pair/pair", "--params", json.dumps(params))
    cli("worker", "start", "--pool", "changedet", "--run-once", timeout=600)
    _same_rasters(out, reference)


def test_resume_after_sigkill_only_predicts_missing_tiles(tmp_path):
    pair = write_synthetic_pair(tmp_path / "big", 640, 640, bands=3, n_changes=20)
    args = ["--t1", str(pair.t1), "--t2", str(pair.t2), "--tile", "64", "--overlap", "8", "--batch-size", "2", "--quiet"]
    cli = [sys.executable, "-m", "changedet.cli", "detect"]
    subprocess.run([*cli, *args, "--out", str(tmp_path / "whole")], check=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*cli, *args, "--out", str(out)])
    done_flags = out / TILE_STORE_DIR
    deadline = time.time() + 300
    while time.time() < deadline:
        flags = list(done_flags.glob("*/done/c/*"))
        if len(flags) >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / PROBABILITY).exists()
    subprocess.run([*cli, *args, "--out", str(out)], check=True)
    summary = json.loads((out / "run.json").read_text())
    assert 0 < summary["counts"]["resumed_tiles"] < summary["counts"]["tiles"]
    _same_rasters(out, tmp_path / "whole")
    assert not (out / TILE_STORE_DIR).exists()


def test_inbox_finds_pair_folders_and_csv(tmp_path, make_raster):
    import numpy as np

    for name in ("a", "b"):
        (tmp_path / "inbox" / name).mkdir(parents=True)
        make_raster(f"inbox/{name}/t1.tif", np.ones((1, 8, 8), np.uint8))
        make_raster(f"inbox/{name}/t2.tif", np.ones((1, 8, 8), np.uint8))
    (tmp_path / "inbox" / "incomplete").mkdir()
    assert [j.name for j in discover_pairs(tmp_path / "inbox")] == ["a", "b"]
    (tmp_path / "pairs.csv").write_text("name,t1,t2\nx,inbox/a/t1.tif,inbox/b/t2.tif\n")
    (job,) = discover_pairs(tmp_path / "pairs.csv")
    assert Path(job.t1).is_file() and Path(job.t2).is_file()
