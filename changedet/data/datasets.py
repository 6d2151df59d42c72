"""Patch datasets over bi-temporal scenes, read lazily window by window, with class-balanced sampling.

A patch is addressed by a :class:`PatchKey` ``(scene, row, col, seed)``: the scene index, the
window's upper-left pixel on the scene's common grid and the seed of its augmentation.
:class:`PatchSampler` draws keys: with probability ``change_fraction`` the window is placed so
that it contains a randomly chosen change pixel (anywhere in the window, not always at the
centre), otherwise uniformly. Changes are 0.3–4 % of OSCD pixels, so uniform patches are mostly
change-free; ``change_fraction = 0.5`` shows the model a change in about every other patch.

:class:`PatchDataset` is a map-style dataset: ``dataset[i]`` is the ``i``-th key of the current
epoch (a pure function of ``(seed, epoch, i)``, so results do not depend on DataLoader workers),
and ``dataset[key]`` reads any :class:`PatchKey` (what :class:`BalancedPatchSampler` yields).
Each item reads one window per date through the scene's :class:`~changedet.pipeline.align.PairReader`
(or its in-memory cache), never a whole scene.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from changedet.data.augment import PairedAugment
from changedet.data.scenes import IGNORE, ChangeScene
from changedet.errors import InputError
from changedet.normalization import Normalization


class PatchKey(NamedTuple):
    """One patch: scene index, window row/col offset on the common grid, augmentation seed."""

    scene: int
    row: int
    col: int
    seed: int


class PatchSampler:
    """Draws :class:`PatchKey` s over ``scenes`` with class-balanced placement.

    Args:
        scenes: the scenes (labelled unless ``change_fraction`` is 0).
        patch_size: window size in pixels.
        change_fraction: probability that a patch is placed on a change pixel. Scenes are then
            drawn in proportion to their change pixels, otherwise to their labelled area
            (their area for unlabelled scenes).
    """

    def __init__(self, scenes: Sequence[ChangeScene], patch_size: int, change_fraction: float = 0.5) -> None:
        if not scenes:
            raise InputError("a patch sampler needs at least one scene")
        if not 0.0 <= change_fraction <= 1.0:
            raise ValueError(f"change_fraction must be in [0, 1], got {change_fraction}")
        self.scenes = list(scenes)
        self.patch_size = patch_size
        self.change_fraction = change_fraction
        self._changes: list[np.ndarray] = []
        area = []
        for s in self.scenes:
            if s.labelled:
                label = s.label
                self._changes.append(np.flatnonzero(label == 1))
                area.append(float((label != IGNORE).sum()))
            else:
                self._changes.append(np.empty(0, np.int64))
                area.append(float(s.shape[0] * s.shape[1]))
        self._area_p = np.asarray(area) / max(sum(area), 1.0)
        counts = np.asarray([len(c) for c in self._changes], np.float64)
        self._change_p = counts / counts.sum() if counts.sum() > 0 else None
        if change_fraction > 0 and self._change_p is None:
            raise InputError("change_fraction > 0 but no scene has a change pixel")

    def _offset(self, centre: int | None, size: int, rng: np.random.Generator) -> int:
        p = self.patch_size
        if size <= p:
            return 0
        if centre is None:
            return int(rng.integers(0, size - p + 1))
        return int(np.clip(centre - rng.integers(0, p), 0, size - p))

    def draw(self, rng: np.random.Generator) -> PatchKey:
        """One random key."""
        on_change = self._change_p is not None and rng.random() < self.change_fraction
        if on_change:
            index = int(rng.choice(len(self.scenes), p=self._change_p))
            h, w = self.scenes[index].shape
            flat = int(self._changes[index][rng.integers(0, len(self._changes[index]))])
            row, col = self._offset(flat // w, h, rng), self._offset(flat % w, w, rng)
        else:
            index = int(rng.choice(len(self.scenes), p=self._area_p))
            h, w = self.scenes[index].shape
            row, col = self._offset(None, h, rng), self._offset(None, w, rng)
        return PatchKey(index, row, col, int(rng.integers(0, 2**31 - 1)))

    def key(self, seed: int, epoch: int, index: int) -> PatchKey:
        """The ``index``-th key of ``epoch`` (deterministic)."""
        return self.draw(np.random.default_rng([seed, epoch, index]))


class PatchDataset(Dataset):
    """Normalised, augmented bi-temporal patches read lazily from scenes.

    Args:
        scenes: opened scenes (same bands; with per-scene statistics, the same band counts).
        patch_size: side of the read window (the output side unless ``augment.crop`` is set).
        normalization: a :class:`~changedet.normalization.Normalization` or any stored form of one
            (fixed or per-scene statistics, see :meth:`Normalization.of`); None returns raw values.
        augment: paired augmentation, or None.
        length: patches per epoch (``len(dataset)``).
        change_fraction: see :class:`PatchSampler`.
        seed: base seed; keys depend on ``(seed, epoch, index)`` only (:meth:`set_epoch`).
        require_label: refuse unlabelled scenes (set False for self-supervised pretraining).
        max_tries: redraws of a patch without any valid pixel.

    Items are dicts of tensors: ``t1 (C1, P, P)``, ``t2 (C2, P, P)`` float32 (invalid pixels 0),
    ``target (P, P)`` float32 0/1, ``valid (P, P)`` bool (valid data *and* labelled), and ints
    ``scene``, ``row``, ``col``.
    """

    def __init__(
        self,
        scenes: Sequence[ChangeScene],
        patch_size: int,
        normalization: Normalization | dict[str, Any] | str | None = None,
        augment: PairedAugment | None = None,
        length: int = 1024,
        change_fraction: float = 0.5,
        seed: int = 0,
        require_label: bool = True,
        max_tries: int = 10,
    ) -> None:
        if require_label:
            missing = [s.name for s in scenes if not s.labelled]
            if missing:
                raise InputError(f"scenes without a label: {', '.join(missing)}")
        norm = None if normalization is None else Normalization.of(normalization)
        per_scene = norm is not None and norm.per_scene
        for s in scenes[1:]:
            same = s.channels == scenes[0].channels if per_scene else s.bands == scenes[0].bands
            if not same:
                raise InputError(f"scene {s.name} has bands {s.bands}, {scenes[0].name} has {scenes[0].bands}")
        if augment is not None and augment.swap and scenes and scenes[0].channels[0] != scenes[0].channels[1]:
            raise InputError("date swap needs the same bands on both dates")
        self.scenes = list(scenes)
        self.patch_size = int(patch_size)
        self.normalization = norm
        self._norms = None if norm is None else [norm.for_scene(s.read, *s.shape, s.name) for s in scenes]
        self.augment = augment
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0
        self.max_tries = max_tries
        self.sampler = PatchSampler(self.scenes, self.patch_size, change_fraction if require_label else 0.0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose keys ``dataset[i]`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def key(self, index: int) -> PatchKey:
        """The key of ``dataset[index]`` in the current epoch."""
        return self.sampler.key(self.seed, self.epoch, index)

    def read(self, key: PatchKey) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Raw ``x1, x2, input_valid, label, loss_valid`` of a key's window (before normalisation/augmentation)."""
        p = self.patch_size
        x1, x2, valid, label = self.scenes[key.scene].read_padded(key.row, key.col, p, p)
        return x1, x2, valid, label, valid & (label != IGNORE)

    def _normalise(self, x: np.ndarray, valid: np.ndarray, scene: int, date: int) -> np.ndarray:
        if self._norms is None:
            return np.where(valid[None], x, 0).astype(np.float32)
        return self._norms[scene].apply(x, valid, date)

    def __getitem__(self, item: int | PatchKey | Sequence[int]) -> dict[str, Any]:
        if isinstance(item, (int, np.integer)):
            if not 0 <= int(item) < self.length:
                raise IndexError(item)
            key = self.key(int(item))
        else:
            key = PatchKey(*item)
        x1, x2, valid, label, loss_valid = self.read(key)
        tries = 1
        while not loss_valid.any() and tries < self.max_tries:  # a patch in nodata: draw another one
            key = self.sampler.draw(np.random.default_rng([key.seed, tries]))
            x1, x2, valid, label, loss_valid = self.read(key)
            tries += 1
        z1 = self._normalise(x1, valid, key.scene, 0)
        z2 = self._normalise(x2, valid, key.scene, 1)
        target = (label == 1).astype(np.float32)
        if self.augment is not None:
            rng = np.random.default_rng(key.seed)
            z1, z2, both, input_valid = self.augment(z1, z2, np.stack([target, loss_valid.astype(np.float32)]), valid, rng)
            target, loss_valid = both[0], both[1] > 0.5
            z1 = np.where(input_valid[None], z1, 0).astype(np.float32)
            z2 = np.where(input_valid[None], z2, 0).astype(np.float32)
        return {
            "t1": torch.from_numpy(np.ascontiguousarray(z1)),
            "t2": torch.from_numpy(np.ascontiguousarray(z2)),
            "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "valid": torch.from_numpy(np.ascontiguousarray(loss_valid, dtype=bool)),
            "scene": key.scene,
            "row": key.row,
            "col": key.col,
        }


class BalancedPatchSampler(Sampler[PatchKey]):
    """A DataLoader ``sampler`` yielding :class:`PatchKey` s for a :class:`PatchDataset`.

    Lets one dataset be sampled with another ``change_fraction`` or length:
    ``DataLoader(ds, sampler=BalancedPatchSampler(ds, 512, change_fraction=0.8))``; call
    :meth:`set_epoch` each epoch for new patches.
    """

    def __init__(self, dataset: PatchDataset, num_samples: int | None = None, change_fraction: float | None = None, seed: int | None = None) -> None:
        self.dataset = dataset
        self.num_samples = int(num_samples if num_samples is not None else len(dataset))
        fraction = dataset.sampler.change_fraction if change_fraction is None else change_fraction
        self.sampler = PatchSampler(dataset.scenes, dataset.patch_size, fraction)
        self.seed = dataset.seed if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New keys for ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[PatchKey]:
        for i in range(self.num_samples):
            yield self.sampler.key(self.seed, self.epoch, i)


def collate_patches(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack patch dicts into a batch (what ``DataLoader(collate_fn=...)`` needs)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.as_tensor(values)
    return out
