"""Supervised training loop: seeds, device/AMP, checkpoints, resume, full-scene validation, early stopping.

Files written in ``out_dir``:

* ``best.safetensors`` — the model of the best validation F1 (pooled over the validation
  scenes, at the threshold tuned on them), with JSON metadata (:func:`checkpoint_metadata`):
  model name and builder config, bands, normalisation, threshold, metrics (pooled and per
  scene), data split, training settings. ``changedet detect --model best.safetensors`` uses it.
* ``last.safetensors`` — the latest epoch (same metadata layout);
* ``last.ema.safetensors`` — with ``ema_decay``: the exponential moving average of the weights
  (updated every step, buffers included). Validation then scores the average, and
  ``best.safetensors`` holds the average of the best epoch;
* ``last.optim.pt`` — optimizer / LR scheduler / AMP scaler state (plain tensors and numbers,
  read back with ``torch.load(weights_only=True)``);
* ``trainer_state.json`` — epoch, best score, early-stopping counter and the history.

With ``resume=True`` a new :class:`Trainer` on the same ``out_dir`` continues after the last
completed epoch. Patches of epoch ``e`` and the torch RNG are seeded from ``(seed, e)``, so a
resumed run draws the same patches as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from changedet.allocator import keep_freed_memory
from changedet.checkpoint import load_state_dict, read_metadata, save_checkpoint
from changedet.data.datasets import PatchDataset, collate_patches
from changedet.data.scenes import ChangeScene
from changedet.data.stats import checkpoint_normalization
from changedet.errors import ChangeDetError, ModelError
from changedet.io.writers import write_text
from changedet.losses import ChangeLoss, CompositeLoss
from changedet.models import ChangeModel
from changedet.train.evaluation import ValidationResult, evaluate_scenes

log = logging.getLogger(__name__)

BEST = "best.safetensors"
LAST = "last.safetensors"
OPTIM = "last.optim.pt"
EMA = "last.ema.safetensors"
STATE = "trainer_state.json"


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


@dataclass
class TrainSettings:
    """Knobs of :class:`Trainer` (the ``TrainConfig`` fields that are not data or model)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    grad_clip: float | None = None
    ema_decay: float | None = None
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    patience: int | None = 10
    val_every: int = 1
    val_tile: int = 256
    val_overlap: int = 32
    val_batch_size: int = 8
    tune_threshold: bool = True
    num_workers: int = 0
    progress: bool = True
    resume: bool = True


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    threshold: float
    best_epoch: int
    best_score: float | None
    metrics: dict[str, Any] | None
    history: list[dict[str, Any]]
    epochs_completed: int
    stopped_early: bool
    resumed_from: int | None = None
    pretraining: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None
    split: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        out = asdict(self)
        for key in ("out_dir", "best_checkpoint", "last_checkpoint"):
            out[key] = str(out[key])
        return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def checkpoint_metadata(
    model_name: str,
    model_config: dict[str, Any],
    bands: tuple[Sequence[str], Sequence[str]] | None,
    normalization: dict[str, Any],
    threshold: float,
    metrics: dict[str, Any] | None = None,
    split: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata in the layout :mod:`changedet.predictor` reads, plus provenance.

    ``model``/``config``/``bands``/``normalization``/``threshold`` drive inference; ``stats``
    (pixel counts, scenes, pooled or per date), ``metrics``, ``split`` and ``training`` document
    the run. ``bands`` None (sources with different band names, per-scene statistics): the model
    takes any scene with ``input_channels`` bands, in the order the user selects.
    """
    meta = {
        "model": model_name,
        "config": {k: v for k, v in model_config.items() if k != "in_channels"},
        "bands": None if bands is None else {"t1": list(bands[0]), "t2": list(bands[1])},
        "normalization": checkpoint_normalization(normalization),
        "stats": {k: list(v) if k == "scenes" else v for k, v in normalization.items() if k in ("pixels", "scenes", "shared")},
        "threshold": float(threshold),
        "metrics": metrics,
        "split": split,
        "training": training,
        **extra,
    }
    return _json_safe(meta)


class Trainer:
    """Trains a :class:`ChangeModel` on a :class:`PatchDataset` and validates on whole scenes.

    Args:
        model: the model (moved to the chosen device).
        model_name, model_config: registry name and builder kwargs (stored in checkpoints).
        loss: a :class:`~changedet.losses.ChangeLoss` (see :func:`~changedet.losses.build_loss`).
        train_data: training patches (``set_epoch`` is called every epoch).
        val_scenes: labelled validation scenes, predicted whole every ``val_every`` epochs; empty:
            no validation (the last epoch is "best", threshold 0.5).
        normalization: statistics of the training scenes (checkpoint format).
        out_dir: where checkpoints go.
        settings: :class:`TrainSettings`.
        split, extra_metadata: stored in checkpoint metadata.
    """

    def __init__(
        self,
        model: ChangeModel,
        model_name: str,
        model_config: dict[str, Any],
        loss: ChangeLoss,
        train_data: PatchDataset,
        val_scenes: Sequence[ChangeScene],
        normalization: dict[str, Any],
        out_dir: str | Path,
        settings: TrainSettings | None = None,
        split: dict[str, Any] | None = None,
        extra_metadata: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings or TrainSettings()
        self.model = model
        self.model_name = model_name
        self.model_config = {k: v for k, v in model_config.items() if k != "in_channels"}
        self.loss = loss
        self.train_data = train_data
        self.val_scenes = list(val_scenes)
        self.normalization = normalization
        self.out_dir = Path(out_dir)
        self.split = split
        self.extra_metadata = dict(extra_metadata or {})
        self.device = pick_device(self.settings.device)
        self.amp = bool(self.settings.amp and self.device.type == "cuda")
        self.model.to(self.device)  # before the optimizer, so resumed optimizer state lands on the device
        if self.device.type == "cpu":
            keep_freed_memory()
        scenes = train_data.scenes + self.val_scenes
        self.bands = scenes[0].bands if all(s.bands == scenes[0].bands for s in scenes) else None
        self.extra_metadata.setdefault("input_channels", list(scenes[0].channels))
        s = self.settings
        self.steps_per_epoch = max(1, len(train_data) // s.batch_size)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ModelError(f"model {model_name!r} has no trainable parameter")
        self.optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        total = s.epochs * self.steps_per_epoch
        warmup = s.warmup_epochs * self.steps_per_epoch

        def schedule(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if s.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if s.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(s.ema_decay), use_buffers=True
            )
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

    # -- metadata / checkpoints -----------------------------------------------------------------
    def training_info(self) -> dict[str, Any]:
        """Training settings stored in checkpoints."""
        s = self.settings
        loss_name = getattr(self.loss, "name", type(self.loss).__name__)
        if isinstance(self.loss, CompositeLoss):
            loss_name = "+".join(f"{w:g}*{k}" if w != 1 else k for k, w in self.loss.weights.items())
        return {
            "epoch": self.epoch,
            "epochs": s.epochs,
            "best_epoch": self.best_epoch,
            "loss": loss_name,
            "lr": s.lr,
            "weight_decay": s.weight_decay,
            "ema_decay": s.ema_decay,
            "batch_size": s.batch_size,
            "patch_size": self.train_data.patch_size,
            "samples_per_epoch": len(self.train_data),
            "change_fraction": self.train_data.sampler.change_fraction,
            "seed": s.seed,
            "device": str(self.device),
            "amp": self.amp,
            "validation": {"tile": s.val_tile, "overlap": s.val_overlap},
        }

    def metadata(self, metrics: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
        """Checkpoint metadata for the current state."""
        return checkpoint_metadata(
            self.model_name, self.model_config, self.bands, self.normalization, threshold,
            metrics, self.split, self.training_info(), **self.extra_metadata,
        )  # fmt: skip

    def _save_state(self) -> None:
        state = {
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
        tmp = self.out_dir / f"{STATE}.tmp"
        write_text(tmp, json.dumps(_json_safe(state), indent=2))
        tmp.replace(self.out_dir / STATE)

    def _save_last(self, metrics: dict[str, Any] | None, threshold: float) -> None:
        save_checkpoint(self.out_dir / LAST, self.model, self.metadata(metrics, threshold))
        if self.ema is not None:
            save_checkpoint(self.out_dir / EMA, self.ema.module, self.metadata(metrics, threshold))
        optim = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.out_dir / f"{OPTIM}.tmp"
        torch.save(optim, tmp)
        tmp.replace(self.out_dir / OPTIM)
        self._save_state()

    def try_resume(self) -> bool:
        """Restore model, optimizer and counters from ``out_dir`` if a previous run left them."""
        state_path, last, optim = self.out_dir / STATE, self.out_dir / LAST, self.out_dir / OPTIM
        if not (state_path.is_file() and last.is_file() and optim.is_file()):
            return False
        if self.ema is not None and not (self.out_dir / EMA).is_file():
            raise ModelError(f"{self.out_dir} has no {EMA} to resume the weight average from: use resume: false")
        state = json.loads(state_path.read_text())
        meta = read_metadata(last)
        if meta.get("model") != self.model_name or meta.get("config") != _json_safe(self.model_config):
            raise ModelError(
                f"{last} was trained as {meta.get('model')} {meta.get('config')}, not {self.model_name} "
                f"{self.model_config}: use another output_dir or resume: false"
            )
        try:
            self.model.load_state_dict(load_state_dict(last))
            if self.ema is not None:
                self.ema.module.load_state_dict(load_state_dict(self.out_dir / EMA))
                self.ema.n_averaged.fill_(1)  # > 0: the next update averages instead of copying
        except RuntimeError as exc:
            raise ModelError(f"cannot resume from {last}: {str(exc).splitlines()[0]}") from None
        saved = torch.load(optim, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler") and self.scaler.is_enabled():  # a CPU run saves an empty scaler state
            self.scaler.load_state_dict(saved["scaler"])
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

    def train_epoch(self) -> dict[str, Any]:
        """One epoch over ``train_data``; returns mean loss (and parts), lr and timing."""
        s = self.settings
        epoch = self.epoch
        torch.manual_seed(s.seed * 100_003 + epoch)
        self.train_data.set_epoch(epoch)
        loader = DataLoader(
            self.train_data,
            batch_size=s.batch_size,
            shuffle=False,  # keys are already random per (seed, epoch, index)
            drop_last=True,
            num_workers=s.num_workers,
            collate_fn=collate_patches,
            pin_memory=self.device.type == "cuda",
        )
        self.model.to(self.device).train()
        total, count, skipped = 0.0, 0, 0
        parts: dict[str, float] = {}
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False, disable=not s.progress)
        for batch in bar:
            t1 = batch["t1"].to(self.device, non_blocking=True)
            t2 = batch["t2"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            valid = batch["valid"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, enabled=self.amp):
                output = self.model(t1, t2)
            loss = self.loss(output, target, valid)
            if not torch.isfinite(loss):
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if s.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            value = float(loss.detach())
            total += value
            count += 1
            for k, v in getattr(self.loss, "last", {}).items():
                parts[k] = parts.get(k, 0.0) + v
            bar.set_postfix(loss=f"{value:.4f}")
        if skipped:
            log.warning("epoch %d: skipped %d batches with a non-finite loss", epoch + 1, skipped)
        return {
            "train_loss": total / count if count else None,
            "loss_parts": {k: v / count for k, v in parts.items()} if count else {},
            "lr": self.optimizer.param_groups[0]["lr"],
            "steps": count,
            "skipped_steps": skipped,
            "train_seconds": time.perf_counter() - start,
        }

    def validate(self) -> tuple[ValidationResult, float, dict[str, Any]]:
        """Full-scene validation; returns the histograms, the chosen threshold and its metrics."""
        s = self.settings
        bar = tqdm(total=len(self.val_scenes), desc="validation", leave=False, disable=not s.progress)
        try:
            result = evaluate_scenes(
                self.scored_model, self.val_scenes, self.normalization, s.val_tile, s.val_overlap, s.val_batch_size,
                self.device, self.amp, progress=lambda _name: bar.update(1),
            )  # fmt: skip
        finally:
            bar.close()
        threshold = result.tune_threshold() if s.tune_threshold else 0.5
        metrics = result.metrics(threshold)
        metrics["pooled_at_0.5"] = result.metrics(0.5)["pooled"]
        return result, threshold, metrics

    def fit(self) -> TrainResult:
        """Train until ``epochs`` or early stopping; returns the :class:`TrainResult`."""
        s = self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(s.seed)
        if s.resume and self.try_resume():
            self._say(f"resuming {self.out_dir} after epoch {self.epoch} (best F1 {self.best_score})")
        while self.epoch < s.epochs and not self.stopped_early:
            entry: dict[str, Any] = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            metrics, threshold = None, self.threshold
            validate = self.val_scenes and (self.epoch % s.val_every == 0 or self.epoch == s.epochs)
            if validate:
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
                    save_checkpoint(self.out_dir / BEST, self.scored_model, self.metadata(metrics, threshold))
                    entry["best"] = True
                else:
                    self.bad_epochs += 1
                    if s.patience is not None and self.bad_epochs >= s.patience:
                        self.stopped_early = True
            elif not self.val_scenes:
                self.best_epoch = self.epoch
                save_checkpoint(self.out_dir / BEST, self.scored_model, self.metadata(None, self.threshold))
            self.history.append(_json_safe(entry))
            self._save_last(metrics, threshold)
            self._say(self._summary(entry))
        if self.stopped_early:
            self._say(f"early stopping: no F1 improvement for {self.bad_epochs} validations (best epoch {self.best_epoch})")
        self.model.cpu()
        return TrainResult(
            out_dir=self.out_dir,
            best_checkpoint=self.out_dir / BEST,
            last_checkpoint=self.out_dir / LAST,
            threshold=self.threshold,
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            metrics=self.best_metrics,
            history=self.history,
            epochs_completed=self.epoch,
            stopped_early=self.stopped_early,
            resumed_from=self.resumed_from,
            normalization=checkpoint_normalization(self.normalization),
            split=self.split,
        )

    def _summary(self, entry: dict[str, Any]) -> str:
        loss = entry.get("train_loss")
        line = f"epoch {entry['epoch']}/{self.settings.epochs}: loss {loss:.4f}" if loss is not None else f"epoch {entry['epoch']}: no step"
        if entry.get("loss_parts"):
            line += " (" + ", ".join(f"{k} {v:.4f}" for k, v in entry["loss_parts"].items()) + ")"
        line += f", lr {entry['lr']:.2e}, {entry['train_seconds']:.1f}s"
        val = entry.get("val")
        if val:
            f1 = val["f1"] if val["f1"] is not None else float("nan")
            f05 = val["f1_at_0.5"] if val["f1_at_0.5"] is not None else float("nan")
            line += (
                f" | val F1 {f1:.4f} @ {val['threshold']:.3f} (F1@0.5 {f05:.4f}), IoU {val['iou'] or 0:.4f}, "
                f"kappa {val['kappa'] or 0:.4f}, {val['seconds']:.1f}s" + (" *best*" if entry.get("best") else "")
            )
        return line
