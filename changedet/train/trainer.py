"""The training loop of every objective: seeds, device/AMP, optimiser and schedule, EMA, checkpoints,
resume, full-scene validation, early stopping, history and progress bars.

What a step minimises is an :class:`~changedet.train.objectives.Objective` (supervised change
detection, SimSiam pretraining, cross-modal learning, adversarial fine-tuning); the files a run
keeps in ``out_dir`` are listed in :mod:`changedet.train.checkpointing`.

With ``resume=True`` a new :class:`Trainer` on the same ``out_dir`` continues after the last
completed epoch. Patches of epoch ``e`` and the torch RNG are seeded from ``(seed, e)``, so a
resumed run draws the same patches as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from changedet.data.datasets import PatchDataset, collate_patches
from changedet.data.scenes import ChangeScene
from changedet.data.stats import checkpoint_normalization
from changedet.errors import ChangeDetError, ModelError
from changedet.losses import ChangeLoss
from changedet.models import ChangeModel
from changedet.normalization import Normalization
from changedet.runtime.memory import keep_freed_memory
from changedet.train.checkpointing import BEST, LAST, checkpoint_metadata, json_safe, load_run, save_best, save_last
from changedet.train.config import TrainSettings
from changedet.metrics import ValidationResult
from changedet.pipeline.validation import evaluate_scenes
from changedet.train.objectives import Batch, Objective, StepContext, as_objective
from changedet.train.optim import build_optimizer, build_scheduler
from changedet.train.results import TrainResult, epoch_summary

log = logging.getLogger(__name__)

#: ``on_step(step, loss, parts)`` after every optimiser step (``step`` counts from 1 over the whole run)
StepCallback = Callable[[int, float, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ChangeDetError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


class Trainer:
    """Trains a :class:`ChangeModel` with an objective and validates it on whole scenes.

    Args:
        model: the model (moved to the chosen device).
        model_name, model_config: registry name and builder kwargs (stored in checkpoints, checked on resume).
        objective: what each step minimises: an :class:`~changedet.train.objectives.Objective`, or a
            :class:`~changedet.losses.ChangeLoss` (supervised, see :func:`~changedet.losses.build_loss`).
        train_data: a :class:`PatchDataset` (``set_epoch`` and a fresh loader every epoch), or an
            iterable of ready batches (traversed once per epoch).
        val_scenes: labelled validation scenes, predicted whole every ``validation.every`` epochs;
            empty: no validation (the last epoch is "best", threshold 0.5).
        normalization: statistics of the training scenes, for validation and checkpoint metadata.
        out_dir: where checkpoints go; None: nothing is written and nothing resumed.
        settings: :class:`~changedet.train.config.TrainSettings`
            (:meth:`~changedet.train.config.TrainSettings.from_config` of a training config).
        split, extra_metadata: stored in checkpoint metadata.
        on_step: called after every optimiser step (see :data:`StepCallback`).
    """

    def __init__(
        self,
        model: ChangeModel,
        model_name: str,
        model_config: dict[str, Any],
        objective: Objective | ChangeLoss,
        train_data: PatchDataset | Iterable[Batch],
        val_scenes: Sequence[ChangeScene] = (),
        normalization: Normalization | dict[str, Any] | None = None,
        out_dir: str | Path | None = None,
        settings: TrainSettings | None = None,
        split: dict[str, Any] | None = None,
        extra_metadata: dict[str, Any] | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        self.settings = s = settings or TrainSettings()
        self.model = model
        self.model_name = model_name
        self.model_config = {k: v for k, v in model_config.items() if k != "in_channels"}
        self.objective = as_objective(objective)
        self.train_data = train_data
        self.val_scenes = list(val_scenes)
        self.normalization = normalization
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.split = split
        self.extra_metadata = dict(extra_metadata or {})
        self.on_step = on_step
        self.device = pick_device(s.device)
        self.context = StepContext(self.device, bool(s.amp and self.device.type == "cuda"))
        self.model.to(self.device)  # before the optimizer, so resumed optimizer state lands on the device
        self.objective.setup(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        scenes = list(getattr(train_data, "scenes", [])) + self.val_scenes
        self.bands = scenes[0].bands if scenes and all(sc.bands == scenes[0].bands for sc in scenes) else None
        if scenes:
            self.extra_metadata.setdefault("input_channels", list(scenes[0].channels))
        groups = self.objective.param_groups(model)
        self.params = [p for group in groups for p in group["params"]]
        if not self.params:
            raise ModelError(f"model {model_name!r} has no trainable parameter")
        self.optimizer = build_optimizer(groups, s.optim)
        if isinstance(train_data, PatchDataset):
            steps_per_epoch: int | None = max(1, len(train_data) // s.batch_size)
        else:
            steps_per_epoch = len(train_data) if isinstance(train_data, Sized) else None
        self.scheduler = build_scheduler(self.optimizer, s.optim, s.epochs, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.context.amp)
        decay = s.optim.ema_decay
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None
        self.epoch = 0  # completed epochs
        self.best_score: float | None = None
        self.best_epoch = 0
        self.best_metrics: dict[str, Any] | None = None
        self.threshold = 0.5
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None

    @property
    def scored_model(self) -> torch.nn.Module:
        """The model validation scores and ``best.safetensors`` stores: the EMA of the weights if kept."""
        return self.model if self.ema is None else self.ema.module

    @property
    def steps_done(self) -> int:
        """Optimiser steps of the whole run (resumed ones included)."""
        return self.scheduler.last_epoch

    # -- metadata / checkpoints -----------------------------------------------------------------
    def training_info(self) -> dict[str, Any]:
        """Training settings stored in checkpoints."""
        s, data = self.settings, self.train_data
        sampling = {}
        if isinstance(data, PatchDataset):
            sampling = {"patch_size": data.patch_size, "samples_per_epoch": len(data), "change_fraction": data.sampler.change_fraction}
        return {
            "epoch": self.epoch,
            "epochs": s.epochs,
            "best_epoch": self.best_epoch,
            **self.objective.describe(),
            "lr": s.optim.lr,
            "weight_decay": s.optim.weight_decay,
            "ema_decay": s.optim.ema_decay,
            "batch_size": s.batch_size,
            **sampling,
            "seed": s.seed,
            "device": str(self.device),
            "amp": self.context.amp,
            "validation": {"tile": s.validation.tile, "overlap": s.validation.overlap},
        }

    def metadata(self, metrics: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
        """Checkpoint metadata for the current state."""
        return checkpoint_metadata(
            self.model_name, self.model_config, self.bands, self.normalization, threshold,
            metrics, self.split, self.training_info(), **self.extra_metadata,
        )  # fmt: skip

    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "threshold": self.threshold,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "model": self.model_name,
            "config": self.model_config,
        }

    def _save_best(self, metrics: dict[str, Any] | None, threshold: float) -> None:
        if self.out_dir is not None:
            save_best(self.out_dir, self.scored_model, self.metadata(metrics, threshold))

    def _save_last(self, metrics: dict[str, Any] | None, threshold: float) -> None:
        if self.out_dir is None:
            return
        optim = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if objective_state := self.objective.state_dict():
            optim["objective"] = objective_state
        save_last(self.out_dir, self.model, self.ema, self.metadata(metrics, threshold), optim, self._state())

    def try_resume(self) -> bool:
        """Restore model, optimizer, objective and counters from ``out_dir`` if a previous run left them."""
        saved = None if self.out_dir is None else load_run(self.out_dir, self.ema is not None)
        if saved is None:
            return False
        meta = saved.metadata
        if meta.get("model") != self.model_name or meta.get("config") != json_safe(self.model_config):
            raise ModelError(
                f"{saved.out_dir / LAST} was trained as {meta.get('model')} {meta.get('config')}, not {self.model_name} "
                f"{self.model_config}: use another output_dir or resume: false"
            )
        saved.load_weights(self.model, self.ema)
        self.optimizer.load_state_dict(saved.optim["optimizer"])
        self.scheduler.load_state_dict(saved.optim["scheduler"])
        if saved.optim.get("scaler") and self.scaler.is_enabled():  # a CPU run saves an empty scaler state
            self.scaler.load_state_dict(saved.optim["scaler"])
        if "objective" in saved.optim:
            self.objective.load_state_dict(saved.optim["objective"])
        state = saved.state
        self.epoch = int(state["epoch"])
        self.best_score = state["best_score"]
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = state["best_metrics"]
        self.threshold = float(state["threshold"])
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped_early = bool(state["stopped_early"])
        self.history = list(state["history"])
        self.resumed_from = self.epoch
        return True

    # -- loop -------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        log.info(line)
        if self.settings.progress:
            tqdm.write(line)

    def _budget_spent(self) -> bool:
        return self.settings.max_steps is not None and self.steps_done >= self.settings.max_steps

    def _batches(self) -> Iterable[Batch]:
        data = self.train_data
        if not isinstance(data, PatchDataset):
            return data
        data.set_epoch(self.epoch)
        return DataLoader(
            data,
            batch_size=self.settings.batch_size,
            shuffle=False,  # keys are already random per (seed, epoch, index)
            drop_last=True,
            num_workers=self.settings.num_workers,
            collate_fn=collate_patches,
            pin_memory=self.device.type == "cuda",
        )

    def train_epoch(self) -> dict[str, Any]:
        """One epoch over ``train_data``; returns mean loss (and parts), lr, timing and the objective's metrics."""
        s = self.settings
        torch.manual_seed(s.seed * 100_003 + self.epoch)
        batches = self._batches()
        self.model.to(self.device).train()
        total, count, skipped = 0.0, 0, 0
        parts: dict[str, float] = {}
        start = time.perf_counter()
        bar = tqdm(batches, desc=f"{self.objective.name} {self.epoch + 1}/{s.epochs}", leave=False, disable=not s.progress)
        for batch in bar:
            batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss, step_parts = self.objective.step(self.model, batch, self.context)
            self.optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                skipped += 1
                continue
            self.scaler.scale(loss).backward()
            if s.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, s.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            value = float(loss.detach())
            total += value
            count += 1
            for k, v in step_parts.items():
                parts[k] = parts.get(k, 0.0) + v
            bar.set_postfix(loss=f"{value:.4f}")
            if self.on_step is not None:
                self.on_step(self.steps_done, value, step_parts)
            if self._budget_spent():
                break
        bar.close()
        if skipped:
            log.warning("epoch %d: skipped %d batches with a non-finite loss", self.epoch + 1, skipped)
        return {
            "train_loss": total / count if count else None,
            "loss_parts": {k: v / count for k, v in parts.items()} if count else {},
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": count,
            "skipped_steps": skipped,
            "train_seconds": time.perf_counter() - start,
            **self.objective.epoch_metrics(),
        }

    def validate(self) -> tuple[ValidationResult, float, dict[str, Any]]:
        """Full-scene validation; returns the histograms, the chosen threshold and its metrics."""
        v = self.settings.validation
        bar = tqdm(total=len(self.val_scenes), desc="validation", leave=False, disable=not self.settings.progress)
        try:
            result = evaluate_scenes(
                self.scored_model, self.val_scenes, self.normalization, v.tile, v.overlap, v.batch_size,
                self.device, self.context.amp, progress=lambda _name: bar.update(1),
            )  # fmt: skip
        finally:
            bar.close()
        threshold = result.tune_threshold() if v.tune_threshold else 0.5
        metrics = result.metrics(threshold)
        metrics["pooled_at_0.5"] = result.metrics(0.5)["pooled"]
        return result, threshold, metrics

    def _validate_epoch(self, entry: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Validate, record it in ``entry``, keep the best checkpoint and count epochs without improvement."""
        start = time.perf_counter()
        _, threshold, metrics = self.validate()
        pooled = metrics["pooled"]
        score = pooled["f1"] if pooled["f1"] is not None else 0.0
        entry["val"] = {
            "threshold": threshold,
            **{k: pooled[k] for k in ("f1", "precision", "recall", "iou", "oa", "kappa")},
            "f1_at_0.5": metrics["pooled_at_0.5"]["f1"],
            "mean_scene_f1": metrics["mean_f1"],
            "per_scene_f1": {n: m["f1"] for n, m in metrics["per_scene"].items()},
            "seconds": time.perf_counter() - start,
        }
        if self.best_score is None or score > self.best_score + 1e-6:
            self.best_score, self.best_epoch, self.best_metrics = score, self.epoch, metrics
            self.threshold = threshold
            self.bad_epochs = 0
            self._save_best(metrics, threshold)
            entry["best"] = True
        else:
            self.bad_epochs += 1
            patience = self.settings.validation.patience
            if patience is not None and self.bad_epochs >= patience:
                self.stopped_early = True
        return metrics, threshold

    def fit(self) -> TrainResult:
        """Train until ``epochs``, ``max_steps`` or early stopping; returns the :class:`TrainResult`."""
        s = self.settings
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(s.seed)
        if s.resume and self.try_resume():
            self._say(f"resuming {self.out_dir} after epoch {self.epoch} (best F1 {self.best_score})")
        while self.epoch < s.epochs and not self.stopped_early and not self._budget_spent():
            entry: dict[str, Any] = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            metrics, threshold = None, self.threshold
            if self.val_scenes and (self.epoch % s.validation.every == 0 or self.epoch == s.epochs):
                metrics, threshold = self._validate_epoch(entry)
            elif not self.val_scenes:
                self.best_epoch = self.epoch
                self._save_best(None, self.threshold)
            self.history.append(json_safe(entry))
            self._save_last(metrics, threshold)
            self._say(epoch_summary(entry, s.epochs))
        if self.stopped_early:
            self._say(f"early stopping: no F1 improvement for {self.bad_epochs} validations (best epoch {self.best_epoch})")
        self.model.cpu()
        return TrainResult(
            out_dir=self.out_dir,
            best_checkpoint=None if self.out_dir is None else self.out_dir / BEST,
            last_checkpoint=None if self.out_dir is None else self.out_dir / LAST,
            threshold=self.threshold,
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            metrics=self.best_metrics,
            history=self.history,
            epochs_completed=self.epoch,
            stopped_early=self.stopped_early,
            resumed_from=self.resumed_from,
            normalization=None if self.normalization is None else checkpoint_normalization(self.normalization),
            split=self.split,
        )
