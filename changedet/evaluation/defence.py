"""Adversarial fine-tuning (PGD-AT) of a trained change model.

Each step attacks the batch with :func:`~changedet.evaluation.adversarial.perturb` (model in eval
mode, parameters frozen: the attacker of the evaluation), then trains on
``clean_weight * L(clean) + (1 - clean_weight) * L(adversarial)`` (Madry et al. 2018 with a clean
term, which keeps clean accuracy). Patches are raw values from a
:class:`~changedet.data.datasets.PatchDataset` built with ``normalization=None`` and normalised
inside the differentiable path, as in the evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from changedet.checkpoint import save_checkpoint
from changedet.data.augment import PairedAugment
from changedet.data.datasets import PatchDataset, collate_patches
from changedet.data.scenes import IGNORE
from changedet.errors import ChangeDetError
from changedet.evaluation.adversarial import (
    Attack,
    frozen,
    normalization_tensors,
    normalize,
    perturb,
)
from changedet.evaluation.loading import load_model, open_labelled_scenes
from changedet.evaluation.sensor import Sensor, scene_sensor
from changedet.losses import ChangeLoss, build_loss
from changedet.models import ChangeModel
from changedet.train.evaluation import evaluate_scenes


def adversarial_finetune(
    model: ChangeModel,
    data: PatchDataset,
    normalization: dict[str, Any],
    sensor: Sensor,
    attack: Attack,
    loss: ChangeLoss,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    clean_weight: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place for ``steps`` optimiser steps; returns the per-step losses."""
    if data.normalization is not None:
        raise ChangeDetError("adversarial fine-tuning needs raw patches: build the PatchDataset with normalization=None")
    stats = normalization_tensors(normalization, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(seed)
    history: list[dict[str, float]] = []
    epoch = 0
    while len(history) < steps:
        data.set_epoch(epoch)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True, collate_fn=collate_patches)
        for batch in loader:
            x1, x2, target, valid = (batch[k].to(device) for k in ("t1", "t2", "target", "valid"))
            label = torch.where(valid, target.long(), IGNORE)
            model.eval()
            with frozen(model):
                a1, a2 = perturb(model, x1, x2, valid, label, stats, sensor, attack)
            model.train()
            clean = loss(model(normalize(x1, valid, stats[0]), normalize(x2, valid, stats[1])), target, valid)
            adv = loss(model(normalize(a1, valid, stats[0]), normalize(a2, valid, stats[1])), target, valid)
            total = clean_weight * clean + (1 - clean_weight) * adv
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            history.append({"loss": float(total.detach()), "clean": float(clean.detach()), "adversarial": float(adv.detach())})
            if progress:
                progress(len(history), float(total))
            if len(history) >= steps:
                break
        epoch += 1
    model.eval()
    return history


def finetune_checkpoint(
    source: str,
    out: str | Path,
    data_root: str | Path,
    train_scenes: Sequence[str] | None = None,
    attack: Attack | None = None,
    steps: int = 200,
    lr: float = 1e-4,
    patch_size: int = 96,
    batch_size: int = 8,
    clean_weight: float = 0.5,
    loss: str = "bce+dice",
    loss_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """PGD-AT from checkpoint ``source`` on its training scenes (``split.train`` unless given); writes ``out``.

    The new threshold is tuned on the *training* scenes (clean), never on validation scenes.
    Returns the ``adversarial_training`` block stored in the new checkpoint's metadata.
    """
    start = time.perf_counter()
    loaded = load_model(source, device)
    names = list(train_scenes or (loaded.spec.metadata.get("split") or {}).get("train") or [])
    if not names:
        raise ChangeDetError(f"{source} records no training scenes: pass train_scenes")
    scenes = open_labelled_scenes(data_root, names, loaded.bands)
    attack = attack or Attack("pgd", 4 / 255, "both", steps=3)
    augment = PairedAugment(gain=0.0, offset=0.0, noise=0.0, swap=0.5 if loaded.bands[0] == loaded.bands[1] else 0.0)
    data = PatchDataset(scenes, patch_size, None, augment, length=steps * batch_size, change_fraction=0.5, seed=seed)
    criterion = build_loss(loss, **({"pos_weight": 5.0} if loss_kwargs is None else loss_kwargs))
    model = loaded.model
    history = adversarial_finetune(
        model, data, loaded.normalization, scene_sensor(scenes[0]), attack, criterion, steps, lr, batch_size,
        clean_weight, seed, device, progress,
    )  # fmt: skip
    threshold = evaluate_scenes(model, scenes, loaded.normalization, device=device).tune_threshold()
    block = {
        "method": "pgd-at",
        "source": str(loaded.spec.checkpoint),
        "attack": attack.to_dict(),
        "steps": steps, "lr": lr, "patch_size": patch_size, "batch_size": batch_size, "clean_weight": clean_weight,
        "loss": loss, "train_scenes": names, "threshold_tuned_on": "training scenes (clean)",
        "final_loss": history[-1] if history else None, "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    meta = {**loaded.spec.metadata, "threshold": threshold, "metrics": None, "adversarial_training": block}
    save_checkpoint(out, model, meta)
    return block
