"""From a model name or checkpoint to the model of a run: ModelSpec, the bundled-model choice, the device, and
TilePredictor (the model built once, with its normalisation and scene fit, predicting through the scene runner).

A CPU run of a checkpoint whose ONNX export is cached never imports torch: the spec's registry facts
and the export come from the cache (:mod:`changedet.runtime.ort`); the first run of a checkpoint
builds it in torch, exports it and records both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from changedet.checkpoint import load_state_dict, read_metadata
from changedet.harmonization import QuantileMap, harmonized_normalization
from changedet.normalization import PER_SCENE, Normalization
from changedet.pipeline.inference import InputTransform, RunnableModel, SceneRunner, TileBatch
from changedet.pipeline.smoothing import Smoothing
from changedet.pipeline.tiling import DEFAULT_BATCH_SIZE, Tiling
from changedet.runtime.memory import keep_freed_memory
from changedet.runtime.ort import (
    EXAMPLE_SIDE, RUNTIMES, OnnxArrays, cached_export, checkpoint_facts, export_key_of_checkpoint, file_digest, record_checkpoint_facts,
    record_export, traced_side,
)
from changedet.runtime.quantize import calibrated_int8
from changedet.runtime.threads import sync_torch_threads
from changedet.errors import ModelError
from changedet.io.bands import COLOUR_ROLES
from changedet.weights import bundled_checkpoint

if TYPE_CHECKING:
    from changedet.pipeline.params import DetectParams

AUTO_BUNDLED = "oscd-s2"
AUTO_RGB = "rgb"


@dataclass(frozen=True)
class SceneFit:
    """Scene statistics fitted once per run and shipped to every worker.

    ``normalization``: the statistics applied to this scene; ``buffers``: fitted model buffers
    (e.g. CVA's statistics and Otsu threshold), empty for trained models; ``harmonization``: the map of
    t2's values onto t1's (``--harmonize histogram``), None without.
    """

    normalization: Normalization
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    harmonization: QuantileMap | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model``: a registry name, or a checkpoint with its metadata."""

    name: str
    checkpoint: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the registry entry's :attr:`~changedet.models.registry.ModelEntry.takes_different_inputs`
    different_inputs: bool = False
    #: hex digest of the checkpoint's bytes (the key of its cached export), None without a checkpoint
    digest: str | None = None

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
        return self.different_inputs or (bands is not None and bands[0] != bands[1])

    @property
    def trained(self) -> bool:
        """True for checkpoints; registry models start from scratch (CVA needs no training)."""
        return self.checkpoint is not None

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description for ``run.json``."""
        meta = {k: v for k, v in self.metadata.items() if k not in ("normalization",)}
        return {"name": self.name, "checkpoint": str(self.checkpoint) if self.checkpoint else None, **meta}


def _registry_facts(name: str) -> dict[str, Any]:
    """What a run needs from the registry entry of ``name`` (:class:`ModelError` for an unknown name)."""
    from changedet.models import model_entry  # the registry imports every model family, and torch

    return {"model": name, "different_inputs": model_entry(name).takes_different_inputs}


def resolve_model(spec: str) -> ModelSpec:
    """Interpret ``--model``: a bundled model name (``oscd-s2``), a checkpoint file, or a registry name.

    A checkpoint's registry facts are recorded in the export cache keyed by its bytes, so later runs
    need not import the registry (and torch)."""
    bundled = bundled_checkpoint(spec)
    path = bundled or Path(spec)
    if path.suffix in (".safetensors", ".pt", ".pth") or path.exists():
        metadata = read_metadata(path)
        digest = file_digest(path)
        facts = checkpoint_facts(digest)
        if facts is None or facts.get("model") != metadata["model"]:
            facts = _registry_facts(metadata["model"])
            record_checkpoint_facts(digest, facts)
        return ModelSpec(metadata["model"], path, metadata, bool(facts["different_inputs"]), digest)
    return ModelSpec(spec, different_inputs=_registry_facts(spec)["different_inputs"])


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


def harmonize_t2(harmonization: QuantileMap | None) -> InputTransform | None:
    """The scene runner's input transform that maps t2 onto t1 with ``harmonization`` (None without one)."""
    if harmonization is None:
        return None

    def transform(_runner: SceneRunner, batch: TileBatch) -> tuple[np.ndarray, np.ndarray]:
        return batch.x1, harmonization.apply(batch.x2, batch.valid)

    return transform


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; :class:`ModelError` for anything else or a CUDA device that is absent."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ModelError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ModelError(f"--device {device} requested but no CUDA device is available")
        if index and int(index) >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _dihedral(arrays: OnnxArrays) -> RunnableModel:
    """Test-time augmentation over the 8 flips/rotations of an ONNX Runtime graph (in torch)."""
    from changedet.models.test_time import DihedralTTA
    from changedet.runtime.onnx import OnnxChangeModel

    return DihedralTTA(OnnxChangeModel(arrays))


class TilePredictor:
    """The model of one run, built once per process: registry model or checkpoint weights, moved to
    its device and runtime, with the normalisation (the checkpoint's statistics, the scene's own for
    per-scene checkpoints, or samples of the scene) and any scene fit (CVA). Predictions go through
    the one :class:`~changedet.pipeline.inference.SceneRunner` (:meth:`runner`)."""

    def __init__(
        self, spec: ModelSpec, in_channels: tuple[int, int], device: str = "cpu", runtime: str = "torch", tta: bool = False,
        tile: int = EXAMPLE_SIDE,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        if runtime not in RUNTIMES:
            raise ModelError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if runtime not in ("torch", "auto") and self.device != "cpu":
            raise ModelError(f"--runtime {runtime} runs on the CPU; drop --device {device}")
        if self.device == "cpu":
            keep_freed_memory()
        cached = None
        if runtime == "onnx-int8":
            cached = self._int8(in_channels)
        elif spec.digest is not None and self.device == "cpu" and runtime in ("auto", "onnx") and not tta:
            cached = cached_export(spec.digest, in_channels, tile)
        #: the runtime the model runs on: ``torch``, ``onnx`` or ``onnx-int8`` (``auto`` resolved)
        self.runtime: str = "onnx" if runtime == "auto" else runtime
        #: smallest tile side the model sees the scene on (:attr:`ChangeModel.min_input_size`)
        self.min_input_size: int = 1 if cached is None else cached.min_input_size
        self.model: RunnableModel
        if cached is None:
            self.model = self._build(in_channels, runtime, tta, tile)
        else:  # a cached float32 export (never with tta) or the int8 graph
            self.model = _dihedral(cached) if tta else cached
        norm = spec.metadata.get("normalization")
        self.normalization: Normalization | None = None
        if norm is not None and not spec.per_scene_normalization:
            self.normalization = Normalization.of(norm)
        self.harmonization: QuantileMap | None = None
        self._runner: SceneRunner | None = None
        self._runner_key: tuple = ()

    def _int8(self, in_channels: tuple[int, int]) -> OnnxArrays:
        """The checkpoint's calibrated int8 graph (``changedet quantize``), or :class:`ModelError`."""
        spec = self.spec
        if spec.checkpoint is None or spec.digest is None:
            raise ModelError(f"--runtime onnx-int8 runs the int8 graph calibrated for a checkpoint; {spec.name} has no checkpoint")
        graph = calibrated_int8(spec.checkpoint, spec.digest, in_channels, str(spec.checkpoint))
        return OnnxArrays(graph.path, in_channels, graph.min_input_size)

    def _build(self, in_channels: tuple[int, int], runtime: str, tta: bool, tile: int) -> RunnableModel:
        """The model built in torch (registry builder, checkpoint weights) and moved to its runtime; a CPU
        export of a checkpoint is recorded so that later runs load it without torch."""
        import torch

        from changedet.models import create_model
        from changedet.models.test_time import DihedralTTA
        from changedet.runtime.onnx import OnnxChangeModel, to_runtime

        sync_torch_threads()
        spec = self.spec
        config = {**spec.metadata.get("config", {}), "in_channels": in_channels[0] if in_channels[0] == in_channels[1] else in_channels}
        with torch.random.fork_rng(devices=[]):  # untrained registry models: the same weights in every process
            torch.manual_seed(0)
            try:
                eager = create_model(spec.name, **config)
            except (TypeError, ValueError) as exc:
                raise ModelError(f"model {spec.name} cannot be built from config {spec.metadata.get('config', {})}: "
                                 f"{str(exc).splitlines()[0]}") from None
        if spec.checkpoint is not None:
            state = load_state_dict(spec.checkpoint)
            try:
                eager.load_state_dict(state)
            except RuntimeError as exc:
                raise ModelError(f"checkpoint {spec.checkpoint} does not fit model {spec.name}: {str(exc).splitlines()[0]}") from None
        eager.to(self.device).eval()
        self.min_input_size = eager.min_input_size
        key = None if spec.digest is None else export_key_of_checkpoint(spec.digest, tuple(eager.in_channels), traced_side(tile))
        model = to_runtime(eager, runtime, size=tile, device=self.device, key=key)
        self.runtime = "torch" if model is eager else ("onnx" if runtime == "auto" else runtime)
        if isinstance(model, OnnxChangeModel):
            if spec.digest is not None:
                record_export(spec.digest, model.arrays, tile)
            if not tta:  # the torch adapter is only for wrappers: the runner runs the arrays themselves
                return model.arrays
        return DihedralTTA(model) if tta else model

    @property
    def needs_samples(self) -> bool:
        """True when the scene must be sampled first (scene-adaptive model or no stored statistics);
        per-scene models get exact statistics from :meth:`set_normalization` instead."""
        return self.model.needs_scene_fit or (self.normalization is None and not self.spec.per_scene_normalization)

    def set_normalization(self, normalization: Normalization) -> None:
        """Adopt the statistics to apply (a per-scene checkpoint's: the scene's own, exact)."""
        self.normalization = normalization

    @classmethod
    def of_params(cls, spec: ModelSpec, in_channels: tuple[int, int], params: "DetectParams") -> "TilePredictor":
        """The predictor a detect run with (resolved) ``params`` uses: device, runtime (exported at the run's tile
        size) and test-time augmentation."""
        return cls(spec, in_channels, params.device, params.runtime, params.tta == "dihedral", params.tile)

    def harmonize(self, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        """Fit the map of t2's values onto t1's from valid pixel samples ``(N, C)`` of each date
        (``--harmonize histogram``); returns the mapped ``x2`` samples."""
        if self.spec.heterogeneous or x1.shape[1] != x2.shape[1]:
            raise ModelError(f"--harmonize histogram maps t2's bands onto t1's one by one; model {self.spec.name} takes "
                             "different bands per date")
        self.harmonization = QuantileMap.fit(x2, x1)
        return self.harmonization.apply(x2.T[:, :, None], np.ones((len(x2), 1), bool))[:, :, 0].T

    @property
    def applied_normalization(self) -> Normalization | None:
        """The statistics applied to the model inputs: t1's for both dates once t2 is harmonised onto t1."""
        norm = self.normalization
        return harmonized_normalization(norm) if norm is not None and self.harmonization is not None else norm

    def fit_scene(self, x1: np.ndarray, x2: np.ndarray) -> None:
        """Scene statistics from valid pixel samples ``(N, C)`` of each date (``x2`` already harmonised, if it is)."""
        if self.normalization is None:
            self.normalization = Normalization.from_samples(x1, x2)
        if self.model.needs_scene_fit:
            import torch

            norm = self.applied_normalization
            t1, t2 = (torch.from_numpy(norm.apply(x[..., None, None], np.ones((len(x), 1, 1), bool), d))[..., 0, 0]
                      for d, x in enumerate((x1, x2)))
            self.model.fit_scene(t1, t2, torch.ones(len(x1), dtype=torch.bool))

    def scene_fit(self) -> SceneFit:
        """The fitted scene state, to rebuild an identical predictor elsewhere (:meth:`load_scene_fit`)."""
        if self.normalization is None:
            raise ModelError("the scene has not been fitted yet")
        buffers = {k: v.cpu().numpy() for k, v in self.model.named_buffers()} if self.model.needs_scene_fit else {}
        return SceneFit(self.normalization, buffers, self.harmonization)

    def load_scene_fit(self, fit: SceneFit) -> None:
        """Adopt a scene state produced by :meth:`scene_fit` (possibly in another process)."""
        self.normalization = fit.normalization
        self.harmonization = fit.harmonization
        if fit.buffers:
            import torch

            missing = set(fit.buffers) - dict(self.model.named_buffers()).keys()
            if missing:
                raise ModelError(f"scene fit holds buffers the model lacks: {sorted(missing)[:3]}")
            self.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in fit.buffers.items()}, strict=False)

    def runner(self, tiling: Tiling | None = None, batch_size: int = DEFAULT_BATCH_SIZE, smoothing: Smoothing | None = None) -> SceneRunner:
        """The scene-inference runner of this model and its normalisation (kept while they stay the same),
        with randomized ``smoothing`` if given."""
        if self.normalization is None:
            raise ModelError("TilePredictor.fit_scene (or set_normalization) must run before predicting with a model without statistics")
        tiling = tiling or Tiling()
        key = (id(self.normalization), id(self.harmonization), tiling, batch_size, smoothing)
        if self._runner is None or self._runner_key != key:
            self._runner = SceneRunner(self.model, self.applied_normalization, tiling, batch_size, self.device,
                                       transform=harmonize_t2(self.harmonization), smoothing=smoothing)
            self._runner_key = key
        return self._runner

    @property
    def model_seconds(self) -> float:
        """Seconds spent in the model's forward passes by the current runner."""
        return 0.0 if self._runner is None else self._runner.model_seconds

    def predict(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x1, x2 (B, C, h, w)``, ``valid (B, h, w)`` -> probability and difference ``(B, h, w)``."""
        return self.runner().predict(TileBatch([], x1, x2, valid))
