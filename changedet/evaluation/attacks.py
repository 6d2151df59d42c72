"""Attack algorithms on the perturbations of a batch of tiles: PGD, APGD and the Square attack.

Every algorithm works on ``deltas`` — one tensor ``(B, C, h, w)`` per attacked date, in reflectance
units — inside per-pixel ``bounds`` (the ε-ball intersected with the sensor range, 0 on invalid
pixels; :meth:`~changedet.evaluation.sensor.Sensor.delta_bounds`), and maximises a per-tile
objective ``score(deltas) -> (B,)`` (:func:`~changedet.evaluation.adversarial.attack_objective`).
Step sizes, acceptance and restarts are decided per tile.

* :func:`pgd` — Madry et al. 2018: ``steps`` signed-gradient steps of a fixed size, projected.
* :func:`apgd` — Croce & Hein 2020 (AutoAttack's APGD): a step size that starts at ``2 ε`` and is
  halved at checkpoints ``w_j`` when too few of the steps since the last checkpoint increased the
  objective (fraction < ``rho``) or when neither step size nor best objective moved; momentum
  ``0.75`` on the iterates; the best point is kept and the search restarts there after a halving.
* :func:`square` — Andriushchenko et al. 2020: a score-based black-box attack that never looks at
  a gradient. From vertical stripes of ``± ε`` it proposes, per query, one random square window
  whose every channel is set to ``± ε`` (a fresh sign per channel and date), keeping the proposal
  when the objective grows. The window's area follows the paper's schedule (``p_init`` of the tile,
  halved at fixed fractions of the query budget). It exposes gradient masking: a defence that only
  breaks gradients falls to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Deltas = list[torch.Tensor]
Bounds = Sequence[tuple[torch.Tensor, torch.Tensor]]
Score = Callable[[Deltas], torch.Tensor]

#: Square attack: fractions of the query budget (of 10000) after which the window area is halved
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def project(deltas: Sequence[torch.Tensor], bounds: Bounds) -> Deltas:
    """Each delta clamped into its per-pixel ``(low, high)``."""
    return [torch.minimum(torch.maximum(d, low), high) for d, (low, high) in zip(deltas, bounds)]


def _per_tile(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def pick(take: torch.Tensor, new: Sequence[torch.Tensor], old: Sequence[torch.Tensor]) -> Deltas:
    """Per tile, ``new`` where ``take`` else ``old``."""
    return [torch.where(_per_tile(take, n), n, o) for n, o in zip(new, old)]


def value_and_grad(score: Score, deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Deltas]:
    """The per-tile objective at ``deltas`` and its gradient with respect to each delta."""
    live = [d.detach().requires_grad_(True) for d in deltas]
    values = score(live)
    grads = torch.autograd.grad(values.sum(), live)
    return values.detach(), [g.detach() for g in grads]


def pgd(score: Score, start: Sequence[torch.Tensor], bounds: Bounds, steps: int, step_size: float) -> Deltas:
    """``steps`` projected signed-gradient ascent steps of ``step_size`` from ``start``; the last iterate."""
    deltas = list(start)
    for _ in range(steps):
        _, grads = value_and_grad(score, deltas)
        deltas = project([d + step_size * g.sign() for d, g in zip(deltas, grads)], bounds)
    return deltas


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints ``w_j = ceil(p_j * steps)``: ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:]} - {0})


def apgd(
    score: Score, start: Sequence[torch.Tensor], bounds: Bounds, eps: float, steps: int, rho: float = 0.75, momentum: float = 0.75
) -> Deltas:
    """APGD from ``start``: ``steps`` steps (``steps + 1`` objective and gradient evaluations); the best
    point found, per tile."""
    x = list(start)
    f, g = value_and_grad(score, x)
    eta = torch.full_like(f, 2 * eps)
    best_x, best_f, best_g = x, f.clone(), g
    x_new = project([d + _per_tile(eta, d) * s.sign() for d, s in zip(x, g)], bounds)
    checkpoints = set(apgd_checkpoints(steps))
    last, successes = 0, torch.zeros_like(f)
    eta_then, best_then = eta.clone(), best_f.clone()
    for k in range(1, steps + 1):
        f_new, g_new = value_and_grad(score, x_new)
        successes += (f_new > f).to(successes)
        better = f_new > best_f
        best_x, best_g = pick(better, x_new, best_x), pick(better, g_new, best_g)
        best_f = torch.where(better, f_new, best_f)
        if k == steps:
            break
        x_prev, x, f, g = x, x_new, f_new, g_new
        if k in checkpoints:
            halve = (successes < rho * (k - last)) | ((eta_then == eta) & (best_then == best_f))
            eta = torch.where(halve, eta / 2, eta)
            x, g, f = pick(halve, best_x, x), pick(halve, best_g, g), torch.where(halve, best_f, f)
            x_prev = pick(halve, x, x_prev)  # no momentum out of a restart
            last, successes = k, torch.zeros_like(successes)
            eta_then, best_then = eta.clone(), best_f.clone()
        z = project([d + _per_tile(eta, d) * s.sign() for d, s in zip(x, g)], bounds)
        x_new = project([d + momentum * (zz - d) + (1 - momentum) * (d - p) for d, zz, p in zip(x, z, x_prev)], bounds)
    return best_x


def square_window_fraction(p_init: float, query: int, queries: int) -> float:
    """The share of the tile a Square-attack window covers at ``query`` of ``queries``."""
    at = int(query / max(queries, 1) * 10000)
    return p_init / 2 ** sum(at > h for h in _SQUARE_HALVINGS)


@torch.no_grad()
def square(score: Score, bounds: Bounds, eps: float, queries: int, generator: torch.Generator, p_init: float = 0.05) -> Deltas:
    """The Square attack with ``queries`` model evaluations after the stripe initialisation."""
    low0 = bounds[0][0]
    b, _, h, w = low0.shape
    device = low0.device

    def signs(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=low0.dtype) * eps

    x = project([signs((b, low.shape[1], 1, w)).expand_as(low) for low, _ in bounds], bounds)
    best = score(x)
    for q in range(queries):
        side = max(1, min(h, w, round(math.sqrt(square_window_fraction(p_init, q, queries) * h * w))))
        proposal = [d.clone() for d in x]
        corners = torch.stack([torch.randint(0, h - side + 1, (b,), generator=generator),
                               torch.randint(0, w - side + 1, (b,), generator=generator)], 1).tolist()  # fmt: skip
        for i, (r, c) in enumerate(corners):
            for d in proposal:
                d[i, :, r : r + side, c : c + side] = signs((d.shape[1], 1, 1))
        proposal = project(proposal, bounds)
        value = score(proposal)
        better = value > best
        x, best = pick(better, proposal, x), torch.where(better, value, best)
    return x
