"""The optimiser and per-step learning-rate schedule of a :class:`~changedet.train.trainer.Trainer` (``optim`` section)."""

from __future__ import annotations

import math
from typing import Any

import torch

from changedet.errors import ChangeDetError
from changedet.train.config import OptimSection


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum, over the parameter ``groups``."""
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSection, epochs: int, steps_per_epoch: int | None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up, then cosine decay to 0 (or constant); groups with ``fixed_lr`` stay constant.

    ``steps_per_epoch`` None (data of unknown length) only works with a constant schedule.
    """
    if steps_per_epoch is None and (optim.scheduler != "constant" or optim.warmup_epochs):
        raise ChangeDetError("a cosine or warm-up schedule needs training data of known length")
    total = epochs * (steps_per_epoch or 0)
    warmup = optim.warmup_epochs * (steps_per_epoch or 0)

    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda _step: 1.0) if group.get("fixed_lr") else schedule for group in optimizer.param_groups]
    )
