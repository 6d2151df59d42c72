"""Benchmark: the default detect against ``--runtime torch``, the torchgeo reference and the raw model
forward of each runtime over the same tiles; peak RSS against scene size; Dask worker scaling.

    python benchmarks/speed.py                       # every table (resumable; rows kept in benchmarks/results/speed/)
    python benchmarks/speed.py --sizes 4096 --repeats 3 --city ../shared/data/oscd/... --rss-sizes 2048 8192
    python benchmarks/speed.py --sizes --rss-sizes --workers-size 0   # the machine rows alone

Every measured command is a fresh process (start-up counts, peak RSS is its own, from ``wait4``):

- ``default``: ``changedet detect`` as a user runs it (``--runtime auto``: ONNX Runtime on the CPU);
- ``torch``: the same with ``--runtime torch``;
- ``torchgeo``: ``benchmarks/torchgeo_reference.py``'s reference (RasterDataset + GridGeoSampler +
  DataLoader + in-memory stitching; skipped when torchgeo is not installed);
- ``raw-onnx`` / ``raw-torch``: only the model calls of the same tiles, in the same calls as detect
  makes, after each batch has been read and normalised outside the clock.

The commands of one repeat run back to back in a rotated order; ratios are taken within a repeat
(paired) and reported as median and range. Scenes: synthetic 4-band uint16 pairs, fc-siam-diff
(randomly initialised, saved as a checkpoint), tiles 512 px, overlap 32, batch 4, the same files as
``torchgeo_reference.py``. ``--city`` adds a real ~1 Mpx Sentinel-2 city with the bundled ``oscd-s2``.
The machine rows put the targets in context: the model forward's GFLOP/s against a 2048² sgemm on the
same threads, and the rate two single-thread processes get together against one alone (the ceiling of
two Dask workers × one thread on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
WORK = Path(__file__).parent / "_work"
RESULTS = REPO / "benchmarks" / "results" / "speed"
TILE, OVERLAP, BATCH = 512, 32, 4
TORCHGEO_PYTHON = [sys.executable]  # --torchgeo-python: an environment with torchgeo (not a changedet dependency)


def scene(size: int) -> tuple[SimpleNamespace, Path]:
    """The synthetic pair and checkpoint of ``torchgeo_reference.py`` at ``size``² (written once, by a
    child process: this one stays small, see :func:`measure`)."""
    folder = WORK / f"torchgeo_{size}"
    pair = SimpleNamespace(t1=folder / "t1.tif", t2=folder / "t2.tif", label=folder / "label.tif")
    checkpoint = folder / "fc-siam-diff.safetensors"
    if not (pair.label.exists() and checkpoint.exists()):
        subprocess.run([sys.executable, __file__, "--make-scene", str(size)], check=True, cwd=REPO)
    return pair, checkpoint


def make_scene(size: int) -> None:
    """Write the synthetic pair and a randomly initialised fc-siam-diff checkpoint (child of :func:`scene`)."""
    import torch

    from changedet.checkpoint import save_checkpoint
    from changedet.models import create_model
    from changedet.testing.synthetic import write_synthetic_pair

    folder = WORK / f"torchgeo_{size}"
    if not (folder / "label.tif").exists():
        write_synthetic_pair(folder, size, size, bands=4, n_changes=100)
    torch.manual_seed(0)
    save_checkpoint(folder / "fc-siam-diff.safetensors", create_model("fc-siam-diff", in_channels=4), {"model": "fc-siam-diff", "config": {}})


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one fresh process; its last stdout line when it is JSON.

    Linux counts the pages a child inherited from this process at fork into the child's peak RSS
    (kept across exec), so this process never imports torch or numpy: a measured peak is refused
    when it is not above this process's own.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, cwd=REPO, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if usage.ru_maxrss <= own:
        raise SystemExit(f"error: peak RSS of {cmd[0]} ({usage.ru_maxrss} KB) is not above this process's ({own} KB): not measurable")
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    extra = json.loads(last) if last.startswith("{") else {}
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, **extra}


def detect_cmd(t1: Path, t2: Path, model: str, out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "changedet.cli", "detect", "--t1", str(t1), "--t2", str(t2), "--model", model,
            "--out", str(out), "--overwrite", "--quiet", *options]  # fmt: skip


def raw_forward(t1: str, t2: str, model: str, runtime: str, tiling: dict[str, int]) -> dict[str, float]:
    """Seconds in the model calls alone over every tile of the scene (child process of the ``raw-*``
    commands); ``tiling``: tile/overlap/batch_size given to detect (its defaults otherwise)."""
    from changedet.pipeline.detect import DetectParams, plan_run, read_tiles

    plan = plan_run(t1, t2, DetectParams(model=model, runtime=runtime, **tiling))
    runner = plan.predictor.runner(plan.params.tiling, plan.params.batch_size, plan.smoothing)
    for b in range(len(plan.batches)):
        runner.probabilities(*runner.inputs(read_tiles(plan, b)[0]))
    seconds = runner.model_seconds
    return {"forward_s": seconds, "runtime": plan.runtime, "tiles": len(plan.tiles)}


def commands(t1: Path, t2: Path, model: str, size_key: str, torchgeo_size: int | None) -> dict[str, list[str]]:
    out = WORK / "speed_out" / size_key
    raw = [sys.executable, __file__, "--raw", "--t1", str(t1), "--t2", str(t2), "--model", model]
    cmds = {
        "default": detect_cmd(t1, t2, model, out / "default"),
        "torch": detect_cmd(t1, t2, model, out / "torch", "--runtime", "torch"),
        "raw-onnx": [*raw, "--runtime", "onnx"],
        "raw-torch": [*raw, "--runtime", "torch"],
    }
    if model.endswith(".safetensors"):
        for name in ("default", "torch"):
            cmds[name] += ["--tile", str(TILE), "--overlap", str(OVERLAP), "--batch-size", str(BATCH)]
        for name in ("raw-onnx", "raw-torch"):
            cmds[name] += ["--tile", str(TILE), "--overlap", str(OVERLAP), "--batch", str(BATCH)]
    if torchgeo_size is not None:
        if subprocess.run([TORCHGEO_PYTHON[0], "-c", "import torchgeo"], capture_output=True).returncode != 0:
            print(f"torchgeo reference skipped: {TORCHGEO_PYTHON[0]} cannot import torchgeo (pip install torchgeo==0.8.1)")
        else:
            cmds["torchgeo"] = [TORCHGEO_PYTHON[0], str(REPO / "benchmarks" / "torchgeo_reference.py"), "--size", str(torchgeo_size),
                                "--tile", str(TILE), "--overlap", str(OVERLAP), "--batch-size", str(BATCH), "--side", "torchgeo"]  # fmt: skip
    return cmds


def paired(key: str, cmds: dict[str, list[str]], repeats: int) -> list[dict[str, dict]]:
    """``repeats`` rounds (at least) of every command in rotated order, each round saved (and reused) as it finishes."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rounds = []
    names = list(cmds)
    for r in range(repeats):
        path = RESULTS / f"{key}-r{r}.json"
        if path.exists() and set(json.loads(path.read_text())) >= set(names):
            rounds.append(json.loads(path.read_text()))
            continue
        if r == 0:  # warm-up: page cache, export cache
            for name in ("default", "raw-onnx"):
                measure(cmds[name])
        order = names[r % len(names):] + names[: r % len(names)]
        row = {name: measure(cmds[name]) for name in order}
        path.write_text(json.dumps(row, indent=1))
        rounds.append(row)
    while (RESULTS / f"{key}-r{len(rounds)}.json").exists():  # rounds of an earlier run with more repeats count too
        rounds.append(json.loads((RESULTS / f"{key}-r{len(rounds)}.json").read_text()))
    return rounds


def seconds(run: dict, name: str) -> float:
    """The time that counts for a command: the model calls for ``raw-*``, the whole process otherwise."""
    return run["forward_s"] if name.startswith("raw") else run["wall_s"]


def ratio_table(key: str, rounds: list[dict[str, dict]]) -> list[dict]:
    """Per pair of commands: the median and range of the within-round ratio."""
    pairs = [("torch", "default"), ("torchgeo", "default"), ("default", "raw-onnx"), ("torch", "raw-torch"),
             ("raw-torch", "raw-onnx")]  # fmt: skip
    rows = []
    print(f"\n{key}: {len(rounds)} paired rounds")
    print(f"{'command':>10} {'median s':>9} {'peak RSS MB':>11}")
    for name in rounds[0]:
        print(f"{name:>10} {statistics.median(seconds(r[name], name) for r in rounds):>9.2f} "
              f"{statistics.median(r[name]['peak_rss_mb'] for r in rounds):>11.0f}")  # fmt: skip
    print(f"{'ratio':>22} {'median':>7} {'range':>13}")
    for a, b in pairs:
        if a not in rounds[0] or b not in rounds[0]:
            continue
        values = [seconds(r[a], a) / seconds(r[b], b) for r in rounds]
        print(f"{a + ' / ' + b:>22} {statistics.median(values):>7.2f} {min(values):>6.2f}-{max(values):.2f}")
        rows.append({"scene": key, "ratio": f"{a} / {b}", "median": statistics.median(values), "min": min(values), "max": max(values)})
    return rows


def rss_rows(sizes: list[int]) -> list[dict]:
    """One default detect per scene size: wall, peak RSS, throughput. One checkpoint for every size,
    its export cached first by an unmeasured run on the smallest scene (a first run on a new
    checkpoint also imports torch to export it: that is the cold start, not the steady state)."""
    rows = []
    print(f"\n{'size':>6} {'Mpx':>6} {'wall s':>8} {'peak RSS MB':>11} {'Mpx/s':>6}   (default detect, fc-siam-diff, 4 bands, export cached)")
    checkpoint, warmed = scene(min(sizes))[1] if sizes else None, False
    for size in sizes:
        path = RESULTS / f"rss-{size}.json"
        if not path.exists():
            pair, out = scene(size)[0], WORK / "speed_out" / f"rss_{size}"
            shutil.rmtree(out, ignore_errors=True)  # a tile store left by an interrupted run would be resumed
            cmd = detect_cmd(pair.t1, pair.t2, str(checkpoint), out, "--tile", str(TILE),
                             "--overlap", str(OVERLAP), "--batch-size", str(BATCH))  # fmt: skip
            if not warmed:
                small = scene(min(sizes))[0]
                measure(detect_cmd(small.t1, small.t2, str(checkpoint), WORK / "speed_out" / "rss_warm", "--tile", str(TILE),
                                   "--overlap", str(OVERLAP), "--batch-size", str(BATCH)))  # fmt: skip
                warmed = True
            path.write_text(json.dumps({"size": size, **measure(cmd)}))
            shutil.rmtree(out, ignore_errors=True)  # a 32768² run's outputs take tens of GB
        row = json.loads(path.read_text())
        mpx = size * size / 1e6
        print(f"{size:>6} {mpx:>6.1f} {row['wall_s']:>8.1f} {row['peak_rss_mb']:>11.0f} {mpx / row['wall_s']:>6.2f}")
        rows.append(row)
    return rows


def worker_rows(size: int, repeats: int) -> list[dict]:
    """The detect flow on an embedded LocalCluster of 1 and of 2 worker processes, one thread each:
    tiles per second of the predict phase, per core."""
    pair, checkpoint = scene(size)
    rounds = []
    for r in range(repeats):
        path = RESULTS / f"workers-{size}-r{r}.json"
        if not path.exists():
            row = {}
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                out = WORK / "speed_out" / f"flow_{size}_{workers}"
                shutil.rmtree(out, ignore_errors=True)  # an up-to-date folder is skipped by the flow
                measure([sys.executable, "flows/detect.py", "run", "--t1", str(pair.t1), "--t2", str(pair.t2), "--model", str(checkpoint),
                         "--out", str(out), "--overwrite", "--workers", str(workers), "--threads", "1", "--tile", str(TILE),
                         "--overlap", str(OVERLAP), "--batch-size", str(BATCH)], {"PREFECT_LOGGING_LEVEL": "WARNING"})  # fmt: skip
                summary = json.loads((out / "run.json").read_text())
                row[str(workers)] = {"predict_s": summary["timings"]["predict_total_s"], "tiles": summary["counts"]["tiles"]}
            path.write_text(json.dumps(row))
        rounds.append(json.loads(path.read_text()))
    speedups = [r["1"]["predict_s"] / r["2"]["predict_s"] for r in rounds]
    one = statistics.median(r["1"]["tiles"] / r["1"]["predict_s"] for r in rounds)
    two = statistics.median(r["2"]["tiles"] / r["2"]["predict_s"] for r in rounds)
    print(f"\nDask flow, {size}², predict phase: 1 worker x 1 thread {one:.2f} tiles/s; 2 workers x 1 thread {two:.2f} tiles/s "
          f"({two / 2:.2f} per core); 2 / 1 = {statistics.median(speedups):.2f} ({min(speedups):.2f}-{max(speedups):.2f})")  # fmt: skip
    return [{"size": size, "speedup_2_over_1": statistics.median(speedups), "min": min(speedups), "max": max(speedups),
             "tiles_per_s_1": one, "tiles_per_s_2": two}]  # fmt: skip


def child_rate(kind: str, seconds: float, checkpoint: str) -> dict[str, float]:
    """This process's work rate over ``seconds`` (child of :func:`machine_rows`; threads from ``OMP_NUM_THREADS``):
    ``sgemm``: GFLOP/s of float32 2048² matrix products (numpy's BLAS); ``forward``: tiles/s of the
    ONNX Runtime model of ``checkpoint`` on batches of 4 random 512² tiles; ``flops``: its FLOPs per tile (torch)."""
    import numpy as np

    if kind == "flops":
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from changedet.checkpoint import load_state_dict, read_metadata
        from changedet.models import create_model

        meta = read_metadata(checkpoint)
        model = create_model(meta["model"], in_channels=4, **meta["config"]).eval()
        model.load_state_dict(load_state_dict(checkpoint))
        x = torch.zeros(1, 4, TILE, TILE)
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(x, x)
        return {"flops_per_tile": float(flops.get_total_flops())}
    rng = np.random.default_rng(0)
    if kind == "sgemm":
        a, b = (rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(2))
        step, work = (lambda: a @ b), 2 * 2048**3
    else:
        from changedet.pipeline.detect import DetectParams, plan_run

        pair = scene(4096)[0]
        plan = plan_run(pair.t1, pair.t2, DetectParams(model=checkpoint, runtime="onnx", tile=TILE, batch_size=BATCH,
                                                       threads=int(os.environ["OMP_NUM_THREADS"])))  # fmt: skip
        z1, z2 = (rng.standard_normal((BATCH, 4, TILE, TILE)).astype(np.float32) for _ in range(2))
        step, work = (lambda: plan.predictor.model.run(z1, z2)), BATCH
    step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += 1
    rate = done * work / (time.perf_counter() - start)
    return {"gflops": rate / 1e9} if kind == "sgemm" else {"tiles_per_s": rate}


def _rates(kind: str, threads: int, processes: int, seconds: float, checkpoint: str) -> list[dict]:
    """``processes`` children measuring ``kind`` at the same time, ``threads`` threads each."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--rate", kind, "--seconds", str(seconds), "--model", checkpoint]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True) for _ in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"error: {' '.join(cmd)} failed")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def machine_rows(repeats: int, seconds: float = 10.0) -> dict:
    """The machine's own limits beside the pipeline's: the model forward's GFLOP/s against a 2048² sgemm
    on the same 2 threads, and what 2 single-thread processes at once get of one alone (sgemm and the
    model forward), the ceiling of 2 Dask workers × 1 thread."""
    checkpoint = str(scene(4096)[1])
    flops = _rates("flops", 1, 1, 0, checkpoint)[0]["flops_per_tile"]
    rounds = []
    for r in range(repeats):
        path = RESULTS / f"machine-r{r}.json"
        if not path.exists():
            row = {"sgemm_2t": _rates("sgemm", 2, 1, seconds, checkpoint)[0]["gflops"],
                   "sgemm_1t": _rates("sgemm", 1, 1, seconds, checkpoint)[0]["gflops"],
                   "sgemm_2x1t": sum(x["gflops"] for x in _rates("sgemm", 1, 2, seconds, checkpoint)),
                   "forward_2t": _rates("forward", 2, 1, seconds, checkpoint)[0]["tiles_per_s"],
                   "forward_1t": _rates("forward", 1, 1, seconds, checkpoint)[0]["tiles_per_s"],
                   "forward_2x1t": sum(x["tiles_per_s"] for x in _rates("forward", 1, 2, seconds, checkpoint))}  # fmt: skip
            path.write_text(json.dumps(row))
        rounds.append(json.loads(path.read_text()))

    def stat(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    share = stat([r["forward_2t"] * flops / 1e9 / r["sgemm_2t"] for r in rounds])
    out = {"flops_per_tile": flops, "sgemm_gflops_2t": stat([r["sgemm_2t"] for r in rounds]),
           "forward_gflops_2t": stat([r["forward_2t"] * flops / 1e9 for r in rounds]), "forward_share_of_sgemm": share,
           "sgemm_2_processes_over_1": stat([r["sgemm_2x1t"] / r["sgemm_1t"] for r in rounds]),
           "forward_2_processes_over_1": stat([r["forward_2x1t"] / r["forward_1t"] for r in rounds])}  # fmt: skip
    print(f"\nmachine, {repeats} rounds of {seconds:.0f} s, median (range):")
    for key in ("sgemm_gflops_2t", "forward_gflops_2t", "forward_share_of_sgemm", "sgemm_2_processes_over_1", "forward_2_processes_over_1"):
        v = out[key]
        print(f"{key:>28} {v['median']:>8.2f} ({v['min']:.2f}-{v['max']:.2f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--city", help="an OSCD city folder (imgs_1/, imgs_2/): the ~1 Mpx row, with the bundled oscd-s2")
    parser.add_argument("--rss-sizes", type=int, nargs="*", default=[2048, 8192, 16384])
    parser.add_argument("--workers-size", type=int, default=4096, help="scene of the Dask scaling row (0: skip)")
    parser.add_argument("--torchgeo-python", default=sys.executable, help="the Python of an environment with changedet and "
                        "torchgeo, for the reference (default: this one)")
    parser.add_argument("--machine", action=argparse.BooleanOptionalAction, default=True,
                        help="the machine's limits: sgemm rate and 2-process scaling (default on)")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # child: the raw forward
    parser.add_argument("--rate", choices=["sgemm", "forward", "flops"], help=argparse.SUPPRESS)  # child: machine_rows
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--make-scene", type=int, help=argparse.SUPPRESS)  # child: write the synthetic scene
    parser.add_argument("--t1", help=argparse.SUPPRESS)
    parser.add_argument("--t2", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--overlap", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:
        given = {"tile": args.tile, "overlap": args.overlap, "batch_size": args.batch}
        print(json.dumps(raw_forward(args.t1, args.t2, args.model, args.runtime, {k: v for k, v in given.items() if v is not None})))
        return

    if args.make_scene:
        make_scene(args.make_scene)
        return
    if args.rate:
        print(json.dumps(child_rate(args.rate, args.seconds, args.model)))
        return
    TORCHGEO_PYTHON[0] = args.torchgeo_python
    ratios = []
    for size in args.sizes:
        pair, checkpoint = scene(size)
        ratios += ratio_table(f"synthetic-{size}", paired(f"synthetic-{size}", commands(pair.t1, pair.t2, str(checkpoint), f"s{size}", size), args.repeats))
    if args.city:
        city = Path(args.city)
        cmds = commands(city / "imgs_1", city / "imgs_2", "oscd-s2", city.name, None)
        ratios += ratio_table(f"city-{city.name}", paired(f"city-{city.name}", cmds, args.repeats))
    rss = rss_rows(args.rss_sizes)
    workers = worker_rows(args.workers_size, args.repeats) if args.workers_size else []
    machine = machine_rows(args.repeats) if args.machine else {}
    path = REPO / "benchmarks" / "results" / "speed.json"
    summary = json.loads(path.read_text()) if path.exists() else {}  # rows not run this time are kept
    fresh = {"ratios": ratios, "rss": rss, "workers": workers, "machine": machine}
    summary.update({k: v for k, v in fresh.items() if v}, cpu_count=os.cpu_count())
    path.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
