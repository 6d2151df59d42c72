"""From a model name or checkpoint to a tile predictor: normalisation, batching, device, timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from changedet.allocator import keep_freed_memory
from changedet.checkpoint import load_state_dict, read_metadata
from changedet.data.stats import PER_SCENE
from changedet.edge import to_runtime
from changedet.errors import ModelError
from changedet.io.bands import COLOUR_ROLES
from changedet.models import ChangeModel, create_model, model_entry
from changedet.weights import bundled_checkpoint

DEFAULT_MODEL = "auto"
CPU_PIXELS_PER_CALL = 1 << 17  # see TilePredictor._calls
AUTO_BUNDLED = "oscd-s2"
AUTO_RGB = "rgb"


@dataclass(frozen=True)
class SceneFit:
    """Scene statistics fitted once per run and shipped to every worker.

    ``normalization``: per date ``(mean, std)`` per band; ``buffers``: fitted model buffers
    (e.g. CVA's statistics and Otsu threshold), empty for trained models.
    """

    normalization: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    buffers: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model``: a registry name, or a checkpoint with its metadata."""

    name: str
    checkpoint: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def bands(self) -> tuple[list[str], list[str]] | None:
        """Band names the checkpoint was trained on, per date (None for untrained registry models)."""
        bands = self.metadata.get("bands")
        if bands is None:
            return None
        return (bands["t1"], bands["t2"]) if isinstance(bands, dict) else (list(bands), list(bands))

    @property
    def per_scene_normalization(self) -> bool:
        """True when the model standardises every scene with the scene's own statistics."""
        return self.metadata.get("normalization") == PER_SCENE

    @property
    def input_channels(self) -> tuple[int, int] | None:
        """Band counts per date the checkpoint takes (None when unknown or chosen by band name)."""
        channels = self.metadata.get("input_channels")
        return None if channels is None else (int(channels[0]), int(channels[1]))

    def check_band_counts(self, counts: tuple[int, int], sources: tuple[str, str]) -> None:
        """Refuse scenes whose band counts the checkpoint cannot take, saying what it expects."""
        expected = self.input_channels
        if self.bands is not None or expected is None:
            return
        for date, (count, want, source) in enumerate(zip(counts, expected, sources), start=1):
            if count != want:
                names = self.metadata.get("channel_names")
                what = f" ({', '.join(names)}, in that order)" if names else ""
                hint = (f"choose them with --bands (names or 1-based indices, e.g. --bands {','.join(map(str, range(1, want + 1)))})"
                        if count > want else "give a scene with those bands")
                raise ModelError(f"model {self.checkpoint.name if self.checkpoint else self.name} takes {want} bands{what}; "
                                 f"t{date} {source} has {count}: {hint}")

    @property
    def heterogeneous(self) -> bool:
        """True when the two dates may have different bands (pseudo-Siamese, or per-date checkpoint bands)."""
        bands = self.bands
        return model_entry(self.name).family == "pseudo-siamese" or (bands is not None and bands[0] != bands[1])

    @property
    def trained(self) -> bool:
        """True for checkpoints; registry models start from scratch (CVA needs no training)."""
        return self.checkpoint is not None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for ``run.json``."""
        meta = {k: v for k, v in self.metadata.items() if k not in ("normalization",)}
        return {"name": self.name, "checkpoint": str(self.checkpoint) if self.checkpoint else None, **meta}


def resolve_model(spec: str) -> ModelSpec:
    """Interpret ``--model``: a bundled model name (``oscd-s2``), a checkpoint file, or a registry name."""
    bundled = bundled_checkpoint(spec)
    path = bundled or Path(spec)
    if path.suffix in (".safetensors", ".pt", ".pth") or path.exists():
        metadata = read_metadata(path)
        model_entry(metadata["model"])
        return ModelSpec(metadata["model"], path, metadata)
    model_entry(spec)
    return ModelSpec(spec)


def auto_model(band_names: Sequence[str], roles: Sequence[str | None] | None = None) -> ModelSpec:
    """For ``--model auto``: the bundled Sentinel-2 model when the scene has its bands, the bundled
    RGB model for 3-band scenes whose declared roles (:mod:`changedet.io.bands`) are red, green and
    blue in any order or unknown, else CVA."""
    if bundled_checkpoint(AUTO_BUNDLED) is not None:
        spec = resolve_model(AUTO_BUNDLED)
        if spec.bands is not None and set(spec.bands[0]) <= set(band_names):
            return spec
    known = [r for r in (roles or []) if r is not None]
    rgb_roles = len(set(known)) == len(known) and set(known) <= set(COLOUR_ROLES)
    if len(band_names) == 3 and rgb_roles and bundled_checkpoint(AUTO_RGB) is not None:
        return resolve_model(AUTO_RGB)
    return resolve_model("cva")


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; :class:`ModelError` for anything else or a CUDA device that is absent."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ModelError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device} requested but no CUDA device is available")
        if index and int(index) >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(device)


class TilePredictor:
    """Runs a :class:`ChangeModel` on batches of aligned tiles and returns probability and difference."""

    def __init__(self, spec: ModelSpec, in_channels: tuple[int, int], device: str = "cpu", runtime: str = "torch") -> None:
        self.spec = spec
        self.device = resolve_device(device)
        config = {**spec.metadata.get("config", {}), "in_channels": in_channels[0] if in_channels[0] == in_channels[1] else in_channels}
        with torch.random.fork_rng(devices=[]):  # untrained registry models: the same weights in every process
            torch.manual_seed(0)
            try:
                self.model: ChangeModel = create_model(spec.name, **config)
            except (TypeError, ValueError) as exc:
                raise ModelError(f"model {spec.name} cannot be built from config {spec.metadata.get('config', {})}: "
                                 f"{str(exc).splitlines()[0]}") from None
        if spec.checkpoint is not None:
            state = load_state_dict(spec.checkpoint)
            try:
                self.model.load_state_dict(state)
            except RuntimeError as exc:
                raise ModelError(f"checkpoint {spec.checkpoint} does not fit model {spec.name}: {str(exc).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self.min_input_size = self.model.min_input_size
        if self.device.type == "cpu":
            keep_freed_memory()
        if runtime != "torch":
            if self.device.type != "cpu":
                raise ModelError(f"--runtime {runtime} runs on the CPU; drop --device {device}")
            self.model = to_runtime(self.model, runtime)
        self.normalization: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
        norm = spec.metadata.get("normalization")
        if norm is not None and not spec.per_scene_normalization:
            self.set_scene_statistics(norm)
        self.model_seconds = 0.0

    @property
    def needs_samples(self) -> bool:
        """True when the scene must be sampled first (scene-adaptive model or no stored statistics);
        per-scene models get exact statistics from :meth:`set_scene_statistics` instead."""
        return self.model.needs_scene_fit or (self.normalization is None and not self.spec.per_scene_normalization)

    def set_scene_statistics(self, stats: dict[str, Any]) -> None:
        """Adopt ``{"t1": {"mean", "std"}, "t2": ...}``: the checkpoint's statistics, or a scene's own
        (:func:`changedet.data.stats.date_statistics`) for per-scene models."""
        self.normalization = tuple(
            (np.asarray(stats[d]["mean"], np.float32), np.asarray(stats[d]["std"], np.float32)) for d in ("t1", "t2")
        )

    def fit_scene(self, x1: np.ndarray, x2: np.ndarray) -> None:
        """Scene statistics from valid pixel samples ``(N, C)`` of each date."""
        if self.normalization is None:
            self.normalization = tuple(
                (x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-6).astype(np.float32)) for x in (x1, x2)
            )
        if self.model.needs_scene_fit:
            t1, t2 = (torch.from_numpy(self._normalize(x[..., None, None], d))[..., 0, 0] for d, x in enumerate((x1, x2)))
            self.model.fit_scene(t1, t2, torch.ones(len(x1), dtype=torch.bool))

    def scene_fit(self) -> SceneFit:
        """The fitted scene state, to rebuild an identical predictor elsewhere (:meth:`load_scene_fit`)."""
        if self.normalization is None:
            raise ModelError("the scene has not been fitted yet")
        buffers = {k: v.cpu().numpy() for k, v in self.model.named_buffers()} if self.model.needs_scene_fit else {}
        return SceneFit(self.normalization, buffers)

    def load_scene_fit(self, fit: SceneFit) -> None:
        """Adopt a scene state produced by :meth:`scene_fit` (possibly in another process)."""
        self.normalization = fit.normalization
        own = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, value in fit.buffers.items():
                own[name].copy_(torch.from_numpy(np.asarray(value)))

    def _normalize(self, x: np.ndarray, date: int) -> np.ndarray:
        mean, std = self.normalization[date]
        return (x - mean[:, None, None]) / std[:, None, None]

    def predict(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x1, x2 (B, C, h, w)``, ``valid (B, h, w)`` -> probability and difference ``(B, h, w)``."""
        if self.normalization is None:
            raise ModelError("TilePredictor.fit_scene (or set_scene_statistics) must run before predict for a model without statistics")
        z1 = np.where(valid[:, None], self._normalize(x1, 0), 0).astype(np.float32)
        z2 = np.where(valid[:, None], self._normalize(x2, 1), 0).astype(np.float32)
        t1 = torch.from_numpy(z1).to(self.device)
        t2 = torch.from_numpy(z2).to(self.device)
        start = time.perf_counter()
        outs = [self.model.predict(t1[part], t2[part]) for part in self._calls(t1.shape[0], t1.shape[2] * t1.shape[3])]
        prob = torch.cat([o.probability[:, 0] for o in outs]).float().cpu().numpy()
        diff = torch.cat([o.difference[:, 0] for o in outs]).float().cpu().numpy()
        self.model_seconds += time.perf_counter() - start
        return prob, diff

    def _calls(self, tiles: int, pixels_per_tile: int) -> list[slice]:
        """Model calls of at most :data:`CPU_PIXELS_PER_CALL` pixels on the CPU (one call on a GPU).

        Activations of a large CPU batch outgrow glibc's mmap threshold (32 MiB at most), so every
        forward maps and zero-fills fresh pages: with 4 tiles of 512² about 40 % of the time went to
        page faults. Calls of ~128 k pixels stay in heap memory that :func:`keep_freed_memory` keeps
        for the next call (1.7x faster for FC-Siam-diff).
        """
        step = tiles if self.device.type != "cpu" else max(1, CPU_PIXELS_PER_CALL // pixels_per_tile)
        return [slice(i, i + step) for i in range(0, tiles, step)]
