"""Cross-modal representation learning for pseudo-Siamese encoders, and how to measure it.

The two unshared branches of a pseudo-Siamese model embed two modalities (hyperspectral vs LiDAR,
optical vs SAR) of the same locations. :func:`train_cross_modal` trains them with a
:class:`~changedet.losses.ChangeLoss` on their per-date embeddings (a supervised step of the one
:class:`~changedet.train.trainer.Trainer`), by default
:class:`~changedet.losses.CrossModalLoss`: the two embeddings of one unchanged location are a
positive pair, other locations are negatives (hard-negative mining; changed locations of a change
pair are negatives of themselves). Batches are the :class:`~changedet.data.PatchDataset` dicts
(``t1``, ``t2``, ``target``, ``valid``); :func:`pixel_batches` makes them from paired pixel
vectors ``(N, C)`` as ``(B, C, 1, 1)`` tiles (for per-pixel encoders such as
``pseudo-siamese-pixel``).

Measures: :func:`embed_pixels` (embeddings of paired vectors), :func:`retrieval_topk`
(modality-1 query -> its own location among ``N`` modality-2 candidates), :func:`matching_distances`
(mean distance of matching vs non-matching locations) and :func:`linear_probe` (a softmax
classifier on frozen, e.g. fused, embeddings).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from changedet.losses import ChangeLoss, CrossModalLoss
from changedet.models import ChangeModel
from changedet.train.config import TrainSettings
from changedet.train.objectives import SupervisedObjective
from changedet.train.trainer import Trainer


def pixel_batches(x1: np.ndarray, x2: np.ndarray, batch_size: int, steps: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` random batches of paired vectors ``x1 (N, C1)``, ``x2 (N, C2)`` as ``(B, C, 1, 1)`` tiles
    (every pair an unchanged, valid location)."""
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(x1))
    for _ in range(steps):
        idx = rng.choice(len(x1), size, replace=False)
        yield {
            "t1": torch.from_numpy(np.ascontiguousarray(x1[idx], np.float32))[..., None, None],
            "t2": torch.from_numpy(np.ascontiguousarray(x2[idx], np.float32))[..., None, None],
            "target": torch.zeros(size, 1, 1),
            "valid": torch.ones(size, 1, 1, dtype=torch.bool),
        }


def train_cross_modal(model: ChangeModel, batches: Iterable[dict[str, Any]], loss: ChangeLoss | None = None, **options: Any) -> list[float]:
    """Train ``model``'s branches on every batch of ``batches``; returns the loss per step.

    One :class:`~changedet.train.trainer.Trainer` epoch of a
    :class:`~changedet.train.objectives.SupervisedObjective` with ``loss`` (default
    :class:`~changedet.losses.CrossModalLoss`: hard-negative contrastive pairs + triplet): AdamW at a
    constant learning rate, on the model's device, without AMP, checkpoints or progress bars.
    ``options`` are :class:`~changedet.train.config.TrainSettings` keywords overriding that
    (``lr=3e-3``, ``weight_decay=...``). Steps with a non-finite loss are skipped.
    """
    device = next(model.parameters()).device
    settings = TrainSettings(**{"epochs": 1, "scheduler": "constant", "device": str(device), "amp": False, "progress": False, **options})
    history: list[float] = []
    objective = SupervisedObjective(loss or CrossModalLoss())
    Trainer(model, type(model).__name__, {}, objective, batches, settings=settings, on_step=lambda _, value, __: history.append(value)).fit()
    model.to(device).eval()
    return history


@torch.inference_mode()
def embed_pixels(model: ChangeModel, x1: np.ndarray, x2: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised per-date embeddings ``(N, D)`` of paired vectors ``x1 (N, C1)``, ``x2 (N, C2)`` (eval mode)."""
    was_training = model.training
    model.eval()
    out1, out2 = [], []
    try:
        for start in range(0, len(x1), batch_size):
            t1 = torch.from_numpy(np.ascontiguousarray(x1[start : start + batch_size], np.float32))[..., None, None]
            t2 = torch.from_numpy(np.ascontiguousarray(x2[start : start + batch_size], np.float32))[..., None, None]
            out = model(t1, t2)
            out1.append(F.normalize(out.embeddings_t1.flatten(1), dim=1))
            out2.append(F.normalize(out.embeddings_t2.flatten(1), dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out1).numpy(), torch.cat(out2).numpy()


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(N, M)`` between the rows of ``a`` and ``b``."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def retrieval_topk(
    queries: np.ndarray,
    candidates: np.ndarray,
    ks: tuple[int, ...] = (1, 5),
    n_candidates: int | None = None,
    seed: int = 0,
) -> dict[int, float]:
    """Top-k accuracy of cross-modal retrieval: ``queries[i]`` should find ``candidates[i]``.

    Each query ranks its own candidate among ``n_candidates`` (itself plus ``n_candidates - 1``
    other locations drawn at random per query; ``None``: all candidates) by Euclidean distance;
    ties count against the query. Returns ``{k: fraction of queries whose match is in the top k}``.
    """
    dist = _distances(queries, candidates)
    own = np.diag(dist)
    n = len(queries)
    if n_candidates is None or n_candidates >= n:
        closer = (dist <= own[:, None]).sum(1) - 1
    else:
        rng = np.random.default_rng(seed)
        closer = np.empty(n, np.int64)
        for i in range(n):
            others = rng.choice(n - 1, n_candidates - 1, replace=False)
            others += others >= i  # skip the query's own location
            closer[i] = int((dist[i, others] <= own[i]).sum())
    return {k: float(np.mean(closer < k)) for k in ks}


def matching_distances(e1: np.ndarray, e2: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Mean distance between the two embeddings of the same location and of two random different locations."""
    rng = np.random.default_rng(seed)
    n = len(e1)
    other = (np.arange(n) + rng.integers(1, n, n)) % n
    matching = np.linalg.norm(e1 - e2, axis=1).mean()
    non_matching = np.linalg.norm(e1 - e2[other], axis=1).mean()
    return float(matching), float(non_matching)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> np.ndarray:
    """A softmax classifier on frozen features (standardised with the training statistics), trained
    full-batch with Adam; returns the predicted classes of ``test_x``."""
    mean, std = train_x.mean(0), np.maximum(train_x.std(0), 1e-6)
    xs = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    xt = torch.from_numpy(((test_x - mean) / std).astype(np.float32))
    classes, y = np.unique(train_y, return_inverse=True)
    torch.manual_seed(seed)
    head = nn.Linear(xs.shape[1], len(classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    target = torch.from_numpy(y)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(xs), target).backward()
        optimizer.step()
    with torch.no_grad():
        pred = head(xt).argmax(1).numpy()
    return classes[pred]
