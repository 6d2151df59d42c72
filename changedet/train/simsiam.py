"""SimSiam (Chen & He, CVPR 2021) or BYOL self-supervised pretraining of a change model's encoder.

Two augmented views ``x_a, x_b`` of one single-date tile go through the encoder ``f`` (global
average pooling of its deepest level), a projection MLP ``g`` and a prediction MLP ``h``:
``z = g(f(x))``, ``p = h(z)``, and the loss is the symmetric negative cosine similarity with a
**stop-gradient** on the target branch::

    L = D(p_a, stopgrad(z_b)) / 2 + D(p_b, stopgrad(z_a)) / 2,   D(p, z) = -cos(p, z)

**BYOL** (Grill et al., NeurIPS 2020; ``method: byol``) differs in one place: the target
branch is not the online network under a stop-gradient but an exponential moving average of the
online encoder and projector (``target_decay``, updated before every step), so
``L = D(p_a, z'_b) / 2 + D(p_b, z'_a) / 2`` with ``z' = g'(f'(x))`` (``D`` as above; BYOL's
``2 - 2 cos`` is the same loss up to an affine map).

Views come from the *same date* (random resized crop, dihedral flips/rotations, per-band
gain/offset, noise, blur): using the other date as a positive would teach the encoder to ignore
exactly the changes it has to detect.

**Collapse tracking.** SimSiam can collapse to a constant output, where the loss reaches -1
while the features carry no information. :func:`embedding_std` (the per-dimension standard
deviation of the L2-normalised projections over a batch, averaged over dimensions) is about
``1/sqrt(d)`` for healthy, spread-out embeddings and goes to 0 on collapse; it is recorded every
epoch next to that reference value.

:class:`SimSiamObjective` is the step of :class:`~changedet.train.trainer.Trainer` (so pretraining
gets its checkpoints, resume, progress bars and history); :func:`pretrain_simsiam` runs it.

After pretraining, the whole model is saved with :func:`changedet.checkpoint.save_checkpoint`
(decoder still random); :func:`load_encoder_weights` copies only the encoder weights of such a
checkpoint into a fresh model for fine-tuning.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from changedet.checkpoint import save_checkpoint
from changedet.data.datasets import PatchDataset
from changedet.errors import ModelError
from changedet.models import ChangeModel
from changedet.train.checkpointing import load_weights
from changedet.train.config import OptimSection, SimSiamSection, TrainSettings
from changedet.train.objectives import Batch, Objective, StepContext
from changedet.train.trainer import Trainer

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
    return load_weights(model, checkpoint, encoder_prefixes(model), "encoder")


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
    """Encoder + projection MLP (3 layers, BN) + prediction MLP (bottleneck), as in the paper.

    With ``target_decay`` (BYOL) the targets come from an EMA copy of encoder and projector.
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 512, pred_hidden: int = 128, target_decay: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.target_decay = target_decay
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
        self.target: nn.ModuleDict | None = None
        if target_decay is not None:
            self.target = copy.deepcopy(nn.ModuleDict({"encoder": encoder, "projector": self.projector})).requires_grad_(False)

    def project(self, x: torch.Tensor, branch: nn.ModuleDict | None = None) -> torch.Tensor:
        """``z = g(avgpool(f(x)[-1]))`` of the online branch (or of ``branch``'s encoder and projector)."""
        encoder, projector = (self.encoder, self.projector) if branch is None else (branch["encoder"], branch["projector"])
        levels = [f for f in encoder(x) if f.shape[1] > 0]
        return projector(levels[-1].mean(dim=(2, 3)))

    @torch.no_grad()
    def update_target(self) -> None:
        """BYOL: ``target <- decay * target + (1 - decay) * online`` (weights; buffers copied)."""
        if self.target is None or self.target_decay is None:
            return
        online = nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})
        for t, o in zip(self.target.parameters(), online.parameters()):
            t.lerp_(o.detach(), 1 - self.target_decay)
        for t, o in zip(self.target.buffers(), online.buffers()):
            t.copy_(o)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Symmetric SimSiam (or BYOL) loss and both online projections."""
        z_a, z_b = self.project(view_a), self.project(view_b)
        p_a, p_b = self.predictor(z_a), self.predictor(z_b)
        t_a, t_b = z_a, z_b
        if self.target is not None:
            with torch.no_grad():
                t_a, t_b = self.project(view_a, self.target), self.project(view_b, self.target)
        loss = 0.5 * negative_cosine(p_a, t_b) + 0.5 * negative_cosine(p_b, t_a)
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
# the objective and its entry point
# --------------------------------------------------------------------------------------------


class SimSiamObjective(Objective):
    """SimSiam on two views of one date per encoder (both dates for a weight-shared encoder).

    Trains the encoders with their projection and prediction heads (the predictor at a fixed
    learning rate, as in the paper); the decoder is untouched. Each epoch reports the mean
    :func:`embedding_std` per encoder next to its healthy value ``1/sqrt(proj_dim)``.
    """

    name = "simsiam"

    def __init__(self, model: ChangeModel, patch_size: int, config: SimSiamSection, seed: int = 0) -> None:
        self.encoders = find_encoders(model)
        decay = config.target_decay if config.method == "byol" else None
        self.heads = nn.ModuleDict({n: SimSiam(enc, config.proj_dim, config.pred_hidden, decay) for n, (enc, _) in self.encoders.items()})
        self.name = config.method
        stride = max(getattr(enc, "output_stride", 1) for enc, _ in self.encoders.values())
        self.augment = ViewAugment(int(math.ceil(patch_size / stride) * stride), config.min_scale)
        self.generator = torch.Generator().manual_seed(seed)
        self.healthy_std = {n: 1 / math.sqrt(config.proj_dim) for n in self.heads}
        self._stds: dict[str, list[float]] = {n: [] for n in self.heads}

    def setup(self, device: torch.device) -> None:
        """Heads to ``device``, in training mode."""
        self.heads.to(device).train()

    def param_groups(self, model: ChangeModel) -> list[dict[str, Any]]:
        """Encoders and projectors, then the predictors (``fixed_lr``); never BYOL's targets."""
        predictor = [p for head in self.heads.values() for p in head.predictor.parameters()]
        ids = {id(p) for p in predictor}
        online = [p for p in self.heads.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": online}, {"params": predictor, "fixed_lr": True}]

    def step(self, model: ChangeModel, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The symmetric SimSiam loss averaged over the encoders."""
        dates = (batch["t1"], batch["t2"])
        total = torch.zeros((), device=ctx.device)
        with ctx.autocast():
            for name, (_, encodes) in self.encoders.items():
                self.heads[name].update_target()
                x = torch.cat([dates[d] for d in encodes])
                loss, z_a, _ = self.heads[name](self.augment(x, self.generator), self.augment(x, self.generator))
                total = total + loss.float() / len(self.encoders)
                self._stds[name].append(embedding_std(z_a))
        return total, {}

    def epoch_metrics(self) -> dict[str, Any]:
        """Mean embedding std per encoder over the epoch, and the healthy values (a warning on collapse)."""
        stds = {n: sum(v) / max(len(v), 1) for n, v in self._stds.items()}
        self._stds = {n: [] for n in self._stds}
        collapsed = [n for n, v in stds.items() if v < 0.1 * self.healthy_std[n]]
        if collapsed:
            log.warning("simsiam: %s collapsed (embedding std %s, healthy ~%.4f)", collapsed, stds, next(iter(self.healthy_std.values())))
        return {"embedding_std": stds, "healthy_std": self.healthy_std}

    def state_dict(self) -> dict[str, Any]:
        """Projector and predictor weights, and the view generator."""
        heads = {n: {"projector": h.projector.state_dict(), "predictor": h.predictor.state_dict()} for n, h in self.heads.items()}
        for n, h in self.heads.items():
            if h.target is not None:
                heads[n]["target"] = h.target.state_dict()
        return {"heads": heads, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for name, head in self.heads.items():
            head.projector.load_state_dict(state["heads"][name]["projector"])
            head.predictor.load_state_dict(state["heads"][name]["predictor"])
            if head.target is not None:
                head.target.load_state_dict(state["heads"][name]["target"])
        self.generator.set_state(state["generator"])


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
    config: SimSiamSection | None = None,
    settings: TrainSettings | None = None,
    out_path: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    **options: Any,
) -> SimSiamResult:
    """Pretrain ``model``'s encoder(s) in place with SimSiam on ``dataset``'s (unlabelled) patches.

    SGD (momentum 0.9) with ``lr * batch_size / 256`` and cosine decay; the predictor keeps a
    fixed learning rate (as in the paper). A pseudo-Siamese model pretrains each date's encoder on
    its own date.

    Args:
        config: the ``simsiam`` section of a training config (epochs, batch size, lr, heads).
        settings: device, AMP, seed, workers, progress and resume of the run (default: CPU, no AMP);
            its epochs, batch size and optimiser come from ``config``.
        out_path: with ``metadata`` (at least ``model`` and ``config``), saves the whole model after
            pretraining, for :func:`load_encoder_weights`.
        run_dir: where the :class:`~changedet.train.trainer.Trainer` keeps its checkpoints, so that
            an interrupted pretraining resumes; None: none kept.
        options: fields of ``config`` or ``settings`` overriding them (``epochs=2, progress=False``).
    """
    own = {k: options.pop(k) for k in list(options) if k in SimSiamSection.model_fields}
    config = SimSiamSection.model_validate({**(config or SimSiamSection()).model_dump(), **own})
    settings = (settings or TrainSettings(device="cpu", amp=False)).updated(
        **options,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optim=OptimSection(optimizer="sgd", lr=config.lr * config.batch_size / 256, weight_decay=config.weight_decay),
    )
    meta = dict(metadata or {})
    torch.manual_seed(settings.seed)
    objective = SimSiamObjective(model, dataset.patch_size, config, settings.seed)
    trainer = Trainer(
        model, str(meta.get("model", type(model).__name__)), meta.get("config", {}), objective, dataset,
        normalization=dataset.normalization, out_dir=run_dir, settings=settings,
    )  # fmt: skip
    history = [
        {"epoch": h["epoch"], "loss": h["train_loss"], "embedding_std": h["embedding_std"], "healthy_std": h["healthy_std"], "seconds": h["train_seconds"]}
        for h in trainer.fit().history
    ]  # fmt: skip
    result = SimSiamResult(None, history, objective.healthy_std)
    if out_path is not None:
        meta["pretraining"] = {
            "method": config.method,
            **({"target_decay": config.target_decay} if config.method == "byol" else {}),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "proj_dim": config.proj_dim,
            "pred_hidden": config.pred_hidden,
            "encoders": list(objective.encoders),
            "history": history,
        }
        save_checkpoint(out_path, model, meta)
        result.checkpoint = Path(out_path)
    return result
