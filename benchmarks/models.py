"""Size and CPU speed of every registered change model.

Prints one row per model: parameters, multiply-accumulates (MACs) of one forward pass on a pair of
13-band 256x256 tiles, and the median CPU forward time per tile pair (batch 1, 2 threads), each
also relative to the smallest model (fewest parameters, parameter-free models aside).

Run: ``python benchmarks/models.py [--runs 5] [--size 256] [--bands 13] [--threads 2] [--models PATTERN]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from changedet.models import ChangeModel, create_model, list_models


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``scaled_dot_product_attention`` (not in torch's CPU flop registry)."""
    return sdpa_flop_count(query, key, value)


@dataclass
class Row:
    name: str
    params: int
    macs: int
    ms: float


def count_macs(model: ChangeModel, t1: torch.Tensor, t2: torch.Tensor) -> int:
    """MACs (FLOPs / 2) of convolutions, matmuls and attention in one forward pass.

    Counted in train mode under ``no_grad``: eval-mode transformer layers take fused fast paths
    that the flop counter does not see; normalisation and dropout cost no MACs either way.
    """
    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.scaled_dot_product_attention: _sdpa_flops}
        ) as counter:
            model(t1, t2)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def time_forward(model: ChangeModel, t1: torch.Tensor, t2: torch.Tensor, runs: int) -> float:
    """Median wall time of ``model.predict`` in milliseconds, after one warm-up call."""
    model.predict(t1, t2)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.predict(t1, t2)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(name: str, bands: int, size: int, runs: int) -> Row:
    """Build ``name`` for ``bands`` bands and measure it on one ``size`` x ``size`` tile pair."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=bands).eval()
    t1, t2 = torch.randn(1, bands, size, size), torch.randn(1, bands, size, size)
    if model.needs_scene_fit:  # fitted once per scene, not per tile
        flat1, flat2 = (t.movedim(1, -1).reshape(-1, bands) for t in (t1, t2))
        model.fit_scene(flat1, flat2, torch.ones(flat1.shape[0], dtype=torch.bool))
    params = sum(p.numel() for p in model.parameters())
    return Row(name, params, count_macs(model, t1, t2), time_forward(model, t1, t2, runs))


def table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table with ratios to the smallest model."""
    neural = [r for r in rows if r.params > 0] or rows
    ref = min(neural, key=lambda r: r.params)
    width = max(len(r.name) for r in rows)
    lines = [
        f"{'model':<{width}}  {'params':>8} {'x':>6}  {'GMACs':>7} {'x':>6}  {'ms/tile':>8} {'x':>6}",
        "-" * (width + 52),
    ]
    for r in sorted(rows, key=lambda r: (r.params, r.macs)):
        lines.append(
            f"{r.name:<{width}}  {r.params / 1e6:7.2f}M {r.params / ref.params:5.2f}x"
            f"  {r.macs / 1e9:7.2f} {r.macs / max(ref.macs, 1):5.2f}x"
            f"  {r.ms:8.1f} {r.ms / ref.ms:5.2f}x"
        )
    lines.append(f"(x: relative to {ref.name}, the smallest model with parameters)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed forward passes per model (median)")
    parser.add_argument("--size", type=int, default=256, help="tile height and width")
    parser.add_argument("--bands", type=int, default=13, help="input bands per date")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", default="*", help="glob over registered model names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads, batch 1, "
        f"{args.bands} bands x {args.size}x{args.size} per date, median of {args.runs} runs\n"
    )
    rows = [measure(name, args.bands, args.size, args.runs) for name in list_models(args.models)]
    print(table(rows))


if __name__ == "__main__":
    main()
