"""Trained checkpoints and labelled scenes for the evaluation stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from changedet.data.discovery import discover_scenes
from changedet.data.scenes import ChangeScene, open_scenes
from changedet.errors import InputError, ModelError
from changedet.models import ChangeModel
from changedet.pipeline.predictor import ModelSpec, TilePredictor, resolve_model


@dataclass
class LoadedModel:
    """A trained model with what evaluation needs from its checkpoint metadata."""

    spec: ModelSpec
    model: ChangeModel
    normalization: dict[str, Any]
    threshold: float

    @property
    def bands(self) -> tuple[list[str], list[str]]:
        """Bands of each date the model was trained on."""
        assert self.spec.bands is not None
        return self.spec.bands

    @property
    def threshold_rule(self) -> str:
        """The threshold rule the checkpoint recommends (``test_time.threshold_rule``): ``fixed`` or ``otsu``."""
        return str((self.spec.metadata.get("test_time") or {}).get("threshold_rule", "fixed"))

    @property
    def label(self) -> str:
        """Short name for reports (the checkpoint's file stem)."""
        return Path(str(self.spec.checkpoint)).stem

    @property
    def validation_scenes(self) -> list[str]:
        """Scenes the checkpoint was validated on (its ``split.val``), empty if unknown."""
        return list((self.spec.metadata.get("split") or {}).get("val") or [])


def load_model(name: str, device: str = "cpu") -> LoadedModel:
    """A trained checkpoint (bundled name or path) in eval mode; refuses untrained registry models."""
    spec = resolve_model(name)
    if not spec.trained or spec.bands is None or "normalization" not in spec.metadata:
        raise ModelError(f"{name}: evaluation needs a trained checkpoint with bands and normalisation statistics")
    model = TilePredictor(spec, (len(spec.bands[0]), len(spec.bands[1])), device).model.eval()
    return LoadedModel(spec, model, spec.metadata["normalization"], float(spec.metadata.get("threshold", 0.5)))


@lru_cache(maxsize=4)
def cached_model(name: str, device: str = "cpu") -> LoadedModel:
    """:func:`load_model`, once per process (evaluation tasks reuse it)."""
    return load_model(name, device)


def open_labelled_scenes(
    root: str | Path, names: Sequence[str], bands: tuple[Sequence[str], Sequence[str]], layout: str = "auto"
) -> list[ChangeScene]:
    """The labelled scenes ``names`` under ``root`` with the model's ``bands``, held in memory."""
    records = {r.name: r for r in discover_scenes(root, layout, labelled_only=True)}
    missing = [n for n in names if n not in records]
    if missing:
        raise InputError(f"no labelled scene {', '.join(missing)} under {root}; available: {', '.join(sorted(records))}")
    b1, b2 = list(bands[0]), list(bands[1])
    scenes = open_scenes([records[n] for n in names], b1, b2, allow_different_bands=b1 != b2)
    return [s.cache() for s in scenes]


@lru_cache(maxsize=16)
def cached_scene(root: str, name: str, bands: tuple[tuple[str, ...], tuple[str, ...]], layout: str = "auto") -> ChangeScene:
    """:func:`open_labelled_scenes` of one scene, once per process."""
    return open_labelled_scenes(root, [name], bands, layout)[0]
