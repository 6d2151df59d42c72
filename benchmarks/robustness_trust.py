"""Benchmark: can the robustness figures be trusted, and what does randomized smoothing certify?

    python benchmarks/robustness_trust.py sanity      [--model oscd-s2] [--scenes bercy] [--eps 1]
    python benchmarks/robustness_trust.py certified   [--model oscd-s2] [--scenes bercy] [--sigma 0.5 1 2] [--samples 100]

``sanity``: the robustness stage with PGD, APGD (CE and margin) and the Square attack, each white-box
method at 5 and 10 steps with 1 and 2 restarts, Square with 200 queries, both dates attacked; the
report's sanity table says whether F1 ever rises with more steps or restarts and whether the black-box
attack beats every white-box one (gradient masking). ``certified``: the randomized-smoothing
classifier per σ — abstentions, certified F1 at r = 0.5, 1, 2 (1/255 reflectance, L2) and seconds per
megapixel. Both through ``changedet robustness``'s own code (:func:`changedet.evaluation.runs.run_evaluation`).

The bundled ``oscd-s2`` was trained on every labelled OSCD city, so on OSCD these are training-city
figures: the sanity checks and the certificates do not depend on that, the F1 levels do. Reports go to
``benchmarks/_work/robustness_trust/<command>/``, the rows to ``benchmarks/results/robustness_<command>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from changedet.evaluation import RobustnessConfig
from changedet.evaluation.report import markdown, write_report
from changedet.evaluation.runs import run_evaluation

ROOT = Path(__file__).resolve().parents[1]
OSCD = ROOT.parent / "shared" / "data" / "oscd"
WORK = ROOT / "benchmarks" / "_work" / "robustness_trust"
RESULTS = ROOT / "benchmarks" / "results"


def config(command: str, args: argparse.Namespace) -> RobustnessConfig:
    """The stage configuration of ``command``."""
    common = {"checkpoints": [args.model], "data": str(args.data), "scenes": args.scenes, "seed": 0}
    if command == "sanity":
        return RobustnessConfig(**common, eps=[0, *args.eps], modes=["both"], methods=["pgd", "apgd-ce", "apgd-margin", "square"],
                                steps=[5, 10], restarts=[1, 2], queries=200)  # fmt: skip
    return RobustnessConfig(**common, eps=[0], methods=[], modes=["both"], smoothing_sigma=args.sigma,
                            smoothing_samples=args.samples, radii=[0.5, 1, 2])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sanity", "certified"])
    parser.add_argument("--model", default="oscd-s2")
    parser.add_argument("--data", type=Path, default=OSCD)
    parser.add_argument("--scenes", nargs="+", default=["bercy"])
    parser.add_argument("--eps", nargs="+", type=float, default=[1.0], help="sanity: budgets in 1/255 reflectance")
    parser.add_argument("--sigma", nargs="+", type=float, default=[0.5, 1.0, 2.0], help="certified: noise levels in 1/255 reflectance")
    parser.add_argument("--samples", type=int, default=100, help="certified: noisy passes per tile")
    args = parser.parse_args()
    start = time.perf_counter()
    report = run_evaluation(config(args.command, args))
    write_report(report, WORK / args.command, overwrite=True)
    print(markdown(report))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"robustness_{args.command}.json"
    path.with_suffix(".tmp").write_text(json.dumps({k: report[k] for k in ("config", "scenes", "checkpoints", "rows", "job_seconds")}, indent=1))
    path.with_suffix(".tmp").replace(path)
    print(f"total {time.perf_counter() - start:.0f} s; rows in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
