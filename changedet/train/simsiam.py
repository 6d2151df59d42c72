"""SimSiam self-supervised pretraining of a change model's encoder (Chen & He, CVPR 2021).

Two augmented views ``x_a, x_b`` of one single-date tile go through the encoder ``f`` (global
average pooling of its deepest level), a projection MLP ``g`` and a prediction MLP ``h``:
``z = g(f(x))``, ``p = h(z)``, and the loss is the symmetric negative cosine similarity with a
**stop-gradient** on the target branch::

    L = D(p_a, stopgrad(z_b)) / 2 + D(p_b, stopgrad(z_a)) / 2,   D(p, z) = -cos(p, z)

Views come from the *same date* (random resized crop, dihedral flips/rotations, per-band
gain/offset, noise, blur): using the other date as a positive would teach the encoder to ignore
exactly the changes it has to detect.

**Collapse tracking.** SimSiam can collapse to a constant output, where the loss reaches -1
while the features carry no information. :func:`embedding_std` (the per-dimension standard
deviation of the L2-normalised projections over a batch, averaged over dimensions) is about
``1/sqrt(d)`` for healthy, spread-out embeddings and goes to 0 on collapse; it is logged every
epoch next to that reference value.

After pretraining, the whole model is saved with :func:`changedet.checkpoint.save_checkpoint`
(decoder still random); :func:`load_encoder_weights` copies only the encoder weights of such a
checkpoint into a fresh model for fine-tuning.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from changedet.checkpoint import load_state_dict, read_metadata, save_checkpoint
from changedet.data.datasets import PatchDataset, collate_patches
from changedet.errors import ModelError
from changedet.models import ChangeModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# encoders of a change model
# --------------------------------------------------------------------------------------------


def find_encoders(model: ChangeModel) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """The per-date encoders of ``model``: ``{attribute: (encoder, dates it encodes)}``.

    Weight-shared models have one ``encoder`` for both dates (0 and 1); pseudo-Siamese models have
    ``encoder_t1`` (date 0) and ``encoder_t2`` (date 1). Encoders must map one date's bands to a
    list of feature levels. Raises :class:`ModelError` for models without such an encoder
    (``cva``, or ``fc-ef`` whose encoder sees both dates stacked).
    """
    found: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    if isinstance(getattr(model, "encoder_t1", None), nn.Module) and isinstance(getattr(model, "encoder_t2", None), nn.Module):
        found = {"encoder_t1": (model.encoder_t1, (0,)), "encoder_t2": (model.encoder_t2, (1,))}
    elif isinstance(getattr(model, "encoder", None), nn.Module):
        found = {"encoder": (model.encoder, (0, 1))}
    for name, (encoder, dates) in found.items():
        bands = getattr(encoder, "in_channels", None)
        if any(bands != model.in_channels[d] for d in dates):
            raise ModelError(f"{type(model).__name__}.{name} takes {bands} bands, not one date's bands: cannot pretrain it alone")
    if not found:
        raise ModelError(f"{type(model).__name__} has no per-date encoder to pretrain")
    return found


def _deepest_channels(encoder: nn.Module) -> int:
    channels = [c for c in getattr(encoder, "out_channels", ()) if c > 0]
    if not channels:
        raise ModelError("the encoder does not declare out_channels")
    return channels[-1]


def encoder_prefixes(model: ChangeModel) -> list[str]:
    """State-dict prefixes of the model's encoders (``"encoder."`` ...)."""
    return [f"{name}." for name in find_encoders(model)]


def load_encoder_weights(model: ChangeModel, checkpoint: str | Path) -> list[str]:
    """Copy the encoder weights of ``checkpoint`` into ``model`` (other weights untouched).

    Returns the loaded keys. Raises :class:`ModelError` when the checkpoint lacks the encoder or
    the shapes differ (another encoder or band count).
    """
    prefixes = encoder_prefixes(model)
    state = load_state_dict(checkpoint)
    own = model.state_dict()
    wanted = [k for k in own if any(k.startswith(p) for p in prefixes)]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ModelError(f"checkpoint {checkpoint} lacks encoder weights ({len(missing)} missing, e.g. {missing[0]})")
    bad = [k for k in wanted if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(
            f"checkpoint {checkpoint} has an incompatible encoder: {bad[0]} is {tuple(state[bad[0]].shape)}, "
            f"the model expects {tuple(own[bad[0]].shape)}"
        )
    with torch.no_grad():
        for k in wanted:
            own[k].copy_(state[k])
    return wanted


# --------------------------------------------------------------------------------------------
# the SimSiam network
# --------------------------------------------------------------------------------------------


def embedding_std(z: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised ``z (B, d)``: ~1/sqrt(d) healthy, ~0 collapsed."""
    return float(F.normalize(z.detach().float(), dim=1).std(dim=0).mean())


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, z) = -cos(p, stopgrad(z))`` averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


class SimSiam(nn.Module):
    """Encoder + projection MLP (3 layers, BN) + prediction MLP (bottleneck), as in the paper."""

    def __init__(self, encoder: nn.Module, proj_dim: int = 512, pred_hidden: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        c = _deepest_channels(encoder)
        self.proj_dim = proj_dim
        self.projector = nn.Sequential(
            nn.Linear(c, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False), nn.BatchNorm1d(proj_dim, affine=False),
        )  # fmt: skip
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_hidden, bias=False), nn.BatchNorm1d(pred_hidden), nn.ReLU(inplace=True),
            nn.Linear(pred_hidden, proj_dim),
        )  # fmt: skip

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``z = g(avgpool(f(x)[-1]))``."""
        levels = [f for f in self.encoder(x) if f.shape[1] > 0]
        return self.projector(levels[-1].mean(dim=(2, 3)))

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Symmetric SimSiam loss and both projections."""
        z_a, z_b = self.project(view_a), self.project(view_b)
        p_a, p_b = self.predictor(z_a), self.predictor(z_b)
        loss = 0.5 * negative_cosine(p_a, z_b) + 0.5 * negative_cosine(p_b, z_a)
        return loss, z_a, z_b


# --------------------------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewAugment:
    """Random views of single-date tiles ``(B, C, H, W)`` (normalised values), on tensors.

    Random resized crop (area ``[min_scale, 1]``, aspect ``[3/4, 4/3]``) back to ``size``,
    dihedral flips/rotations, per-band gain ``U(1 ± gain)`` and offset ``U(± offset)``, Gaussian
    noise, and a 3x3 blur with probability ``blur``.
    """

    size: int
    min_scale: float = 0.4
    gain: float = 0.2
    offset: float = 0.2
    noise: float = 0.05
    blur: float = 0.3

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        views = []
        for i in range(b):
            u = torch.rand(6, generator=generator).tolist()
            area = (self.min_scale + (1 - self.min_scale) * u[0]) * h * w
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
            ch = max(4, min(h, int(round(math.sqrt(area / ratio)))))
            cw = max(4, min(w, int(round(math.sqrt(area * ratio)))))
            r = int(u[2] * (h - ch + 1))
            q = int(u[3] * (w - cw + 1))
            view = x[i : i + 1, :, r : r + ch, q : q + cw]
            view = F.interpolate(view, size=(self.size, self.size), mode="bilinear", align_corners=False)
            k = int(u[4] * 4) % 4
            if k:
                view = torch.rot90(view, k, dims=(2, 3))
            if u[5] < 0.5:
                view = view.flip(3)
            views.append(view)
        out = torch.cat(views)
        gain = 1 + self.gain * (2 * torch.rand(b, c, 1, 1, generator=generator) - 1)
        offset = self.offset * (2 * torch.rand(b, c, 1, 1, generator=generator) - 1)
        out = out * gain.to(out) + offset.to(out)
        if self.noise:
            out = out + self.noise * torch.randn(out.shape, generator=generator).to(out)
        if self.blur:
            blur = (torch.rand(b, generator=generator) < self.blur).to(out.device)
            kernel = torch.tensor([1.0, 2.0, 1.0])
            kernel = (kernel[:, None] * kernel[None, :] / 16).to(out).expand(c, 1, 3, 3)
            blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
            out = torch.where(blur[:, None, None, None], blurred, out)
        return out


# --------------------------------------------------------------------------------------------
# pretraining loop
# --------------------------------------------------------------------------------------------


@dataclass
class SimSiamResult:
    """Outcome of :func:`pretrain_simsiam`."""

    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    healthy_std: dict[str, float] = field(default_factory=dict)

    @property
    def final_std(self) -> dict[str, float]:
        """Embedding std per encoder after the last epoch."""
        return self.history[-1]["embedding_std"] if self.history else {}


def pretrain_simsiam(
    model: ChangeModel,
    dataset: PatchDataset,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    proj_dim: int = 512,
    pred_hidden: int = 128,
    min_scale: float = 0.4,
    device: str | torch.device = "cpu",
    amp: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    out_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
) -> SimSiamResult:
    """Pretrain ``model``'s encoder(s) in place with SimSiam on ``dataset``'s (unlabelled) patches.

    SGD (momentum 0.9) with ``lr * batch_size / 256`` and cosine decay; the predictor keeps a
    fixed learning rate (as in the paper). A pseudo-Siamese model pretrains each date's encoder on
    its own date. ``out_path`` (with ``metadata``: at least ``model`` and ``config``) saves the
    whole model after pretraining, for :func:`load_encoder_weights`.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    encoders = find_encoders(model)
    heads = nn.ModuleDict({name: SimSiam(enc, proj_dim, pred_hidden) for name, (enc, _) in encoders.items()}).to(device)
    model.to(device)
    size = dataset.patch_size
    stride = max(getattr(enc, "output_stride", 1) for enc, _ in encoders.values())
    size = int(math.ceil(size / stride) * stride)
    augment = ViewAugment(size, min_scale)
    base_lr = lr * batch_size / 256
    predictor_params = [p for h in heads.values() for p in h.predictor.parameters()]
    predictor_ids = {id(p) for p in predictor_params}
    other = [p for p in heads.parameters() if id(p) not in predictor_ids]
    optimizer = torch.optim.SGD(
        [{"params": other}, {"params": predictor_params}], lr=base_lr, momentum=0.9, weight_decay=weight_decay
    )
    steps_per_epoch = max(1, len(dataset) // batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)), lambda s: 1.0]
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    generator = torch.Generator().manual_seed(seed)
    healthy = {name: 1 / math.sqrt(proj_dim) for name in heads}
    result = SimSiamResult(None, [], healthy)
    heads.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True, num_workers=num_workers, collate_fn=collate_patches)
        losses: list[float] = []
        stds: dict[str, list[float]] = {name: [] for name in heads}
        bar = tqdm(loader, desc=f"simsiam {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for batch in bar:
            loss_total = torch.zeros((), device=device)
            dates = (batch["t1"], batch["t2"])
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                for name, (_, encodes) in encoders.items():
                    x = torch.cat([dates[d] for d in encodes]).to(device)
                    view_a, view_b = augment(x, generator), augment(x, generator)
                    loss, z_a, _ = heads[name](view_a, view_b)
                    loss_total = loss_total + loss.float() / len(encoders)
                    stds[name].append(embedding_std(z_a))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss_total).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss_total.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", std=f"{stds[next(iter(stds))][-1]:.3f}")
        entry = {
            "epoch": epoch + 1,
            "loss": sum(losses) / max(len(losses), 1),
            "embedding_std": {n: sum(v) / max(len(v), 1) for n, v in stds.items()},
            "healthy_std": healthy,
            "seconds": time.perf_counter() - start,
        }
        result.history.append(entry)
        collapsed = [n for n, v in entry["embedding_std"].items() if v < 0.1 * healthy[n]]
        line = (
            f"simsiam epoch {epoch + 1}/{epochs}: loss {entry['loss']:.4f}, embedding std "
            + ", ".join(f"{n} {v:.4f}" for n, v in entry["embedding_std"].items())
            + f" (healthy ~{next(iter(healthy.values())):.4f})"
            + (" COLLAPSED" if collapsed else "")
        )
        log.info(line)
        if progress:
            tqdm.write(line)
    model.cpu()
    if out_path is not None:
        meta = dict(metadata or {})
        meta["pretraining"] = {
            "method": "simsiam",
            "epochs": epochs,
            "batch_size": batch_size,
            "proj_dim": proj_dim,
            "pred_hidden": pred_hidden,
            "encoders": list(encoders),
            "history": result.history,
        }
        save_checkpoint(out_path, model, meta)
        result.checkpoint = Path(out_path)
    return result


def checkpoint_model_name(path: str | Path) -> str:
    """The registry name stored in a checkpoint (to check an encoder checkpoint matches)."""
    return str(read_metadata(path).get("model"))
