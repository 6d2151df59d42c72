"""Structure consistency: unsupervised change detection for heterogeneous pairs, registered as
``hetero-unsupervised`` (no training; fitted on the pair itself at detect time).

Idea (nonlocal self-similarity graphs, Sun et al., "Nonlocal patch similarity based heterogeneous
remote sensing change detection", Pattern Recognition 2021, and "Structure consistency based graph
for unsupervised change detection", IEEE TGRS 2021): each date is only ever compared with itself, so
the two dates may come from any two sensors (optical, SAR, 1 or 3 bands). Where nothing changed, pixels
that look alike in one date also look alike in the other; a change breaks that structure.

1. Features: every band box-filtered over ``smoothing`` × ``smoothing`` pixels (speckle and noise
   suppression), per date standardised by the scene normalisation. The scene fit sees the same
   filtered values (:meth:`StructureConsistency.fit_view`).
2. Graph: ``anchors`` pixels sampled from the scene; each pixel's ``neighbours`` nearest anchors in
   date 1 (``N1``) and in date 2 (``N2``), each in its own date's feature space.
3. Score: ``s12 = mean_{j in N1} d2(i, j) - mean_{j in N2} d2(i, j)`` (date-1 neighbours measured in
   date 2, against date 2's own nearest) plus the symmetric ``s21``, each divided by the scene's mean
   own-neighbour distance of its date; both terms are >= 0. It is computed on every ``stride``-th
   pixel of each axis, interpolated bilinearly back to every pixel, and box-filtered over
   ``score_smoothing`` pixels.
4. Iterative refinement: anchors whose own score is above Otsu's threshold (probably changed) are
   dropped and the graph is rebuilt, ``iterations`` times in all.
5. ``logits = (score - otsu) / (std / 4)`` as for CVA: probability 0.5 at Otsu's threshold of the
   scene's scores (not a calibrated probability); ``difference`` is the score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from changedet.errors import InputError
from changedet.models.base import ChangeModel
from changedet.models.bitemporal import band_pair, check_pair, crop_to, pad_to_multiple
from changedet.models.cva import otsu_threshold
from changedet.models.decoders import SegmentationHead
from changedet.models.fc_siam import FCDecoder, FCEncoder
from changedet.models.fusion import Fusion
from changedet.models.output import ChangeOutput
from changedet.models.registry import register_model

CHUNK = 16384  # pixels scored per distance matrix (CHUNK x anchors floats per date)
FIT_PIXELS = 50_000  # scene-fit samples used (a seeded subset of the planner's)


def box_mean(x: np.ndarray, valid: np.ndarray, size: int) -> np.ndarray:
    """``x (C, H, W)`` averaged over ``size`` × ``size`` windows of valid pixels (edges: the window's
    valid part); invalid pixels stay as they are."""
    if size <= 1:
        return x
    from scipy import ndimage

    weight = ndimage.uniform_filter(valid.astype(np.float64), size, mode="nearest")
    out = x.astype(np.float32, copy=True)
    for b in range(x.shape[0]):
        total = ndimage.uniform_filter(np.where(valid, x[b], 0).astype(np.float64), size, mode="nearest")
        out[b] = np.where(valid, total / np.maximum(weight, 1e-12), x[b])
    return out


def _box_mean_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 1:
        return x
    pad = size // 2
    return F.avg_pool2d(F.pad(x, (pad, size - 1 - pad, pad, size - 1 - pad), mode="replicate"), size, stride=1)


class StructureConsistency(ChangeModel):
    """Structure-consistency change score of two dates from any sensors (see the module docstring)."""

    needs_scene_fit = True
    weights_shared = False

    def __init__(self, in_channels: tuple[int, int] = (3, 3), anchors: int = 1500, neighbours: int = 20,
                 smoothing: int = 5, score_smoothing: int = 9, iterations: int = 2, stride: int = 2) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.anchors, self.neighbours, self.iterations = int(anchors), int(neighbours), int(iterations)
        self.smoothing, self.score_smoothing, self.stride = int(smoothing), int(score_smoothing), int(stride)
        self.register_buffer("anchors_t1", torch.zeros(0, in_channels[0]))
        self.register_buffer("anchors_t2", torch.zeros(0, in_channels[1]))
        self.register_buffer("scales", torch.ones(2))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Anchors have the size of the scene fit that produced them: take the incoming shapes."""
        for name in ("anchors_t1", "anchors_t2"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit_view(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw tile values ``(C, h, w)`` the scene fit samples: box-filtered like the model's inputs."""
        return box_mean(x1, valid, self.smoothing), box_mean(x2, valid, self.smoothing)

    def _terms(self, f1: torch.Tensor, f2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled ``(s12, s21)`` of pixel features ``(N, C)`` against anchors ``(M, C)``; the mean own-neighbour distances."""
        k = min(self.neighbours, len(a1))
        out = []
        for start in range(0, len(f1), CHUNK):
            d1, d2 = torch.cdist(f1[start : start + CHUNK], a1), torch.cdist(f2[start : start + CHUNK], a2)
            n1, n2 = d1.topk(k, largest=False).indices, d2.topk(k, largest=False).indices
            own1, own2 = d1.gather(1, n1).mean(1), d2.gather(1, n2).mean(1)
            out.append(torch.stack([d2.gather(1, n1).mean(1) - own2, d1.gather(1, n2).mean(1) - own1, own1, own2], 1))
        parts = torch.cat(out)
        return parts[:, :2], parts[:, 2:]

    def _fit(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(anchors_t1, anchors_t2, scales, threshold, scale)`` fitted on pixel features ``(N, C)`` of each date."""
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(f1), generator=g)[: self.anchors]
        keep = torch.ones(len(pick), dtype=torch.bool)
        for _ in range(max(1, self.iterations)):
            if int(keep.sum()) <= self.neighbours:  # (almost) every anchor looks changed: keep the last graph
                break
            a1, a2 = f1[pick[keep]], f2[pick[keep]]
            terms, own = self._terms(f1, f2, a1, a2)
            scales = own.mean(0).clamp_min(1e-6)
            score = _combine(terms, scales)
            threshold = otsu_threshold(score.numpy())
            keep = score[pick] < threshold
        if float(score.max() - score.min()) <= 1e-9:  # nothing to split: no change
            threshold = float(score.max()) + 1.0
        return a1, a2, scales, torch.tensor(threshold), torch.tensor(max(float(score.std()) / 4, 1e-6))

    def fit_scene(self, t1: torch.Tensor, t2: torch.Tensor, valid: torch.Tensor) -> None:
        """Anchors, scales and Otsu's threshold from filtered, normalised pixel samples ``(N, C)`` of each date."""
        f1, f2 = t1[valid].float(), t2[valid].float()
        if len(f1) > FIT_PIXELS:
            keep = torch.randperm(len(f1), generator=torch.Generator().manual_seed(1))[:FIT_PIXELS].sort().values
            f1, f2 = f1[keep], f2[keep]
        if len(f1) < 2 * self.neighbours:
            raise InputError(f"hetero-unsupervised needs at least {2 * self.neighbours} valid pixels, got {len(f1)}")
        self.anchors_t1, self.anchors_t2, self.scales, self.threshold, self.scale = self._fit(f1, f2)

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        check_pair(self, t1, t2)
        b, _, h, w = t1.shape
        s = self.stride
        grids = [_box_mean_tensor(t.float(), self.smoothing)[:, :, s // 2 :: s, s // 2 :: s] for t in (t1, t2)]
        gh, gw = grids[0].shape[-2:]
        f1, f2 = (g.movedim(1, -1).reshape(-1, g.shape[1]) for g in grids)
        if len(self.anchors_t1):
            state = (self.anchors_t1, self.anchors_t2, self.scales, self.threshold, self.scale)
        else:  # not fitted: the graph of this batch alone (as CVA's stateless fallback)
            state = self._fit(f1.detach(), f2.detach())
        a1, a2, scales, threshold, scale = state
        terms, _ = self._terms(f1, f2, a1, a2)
        score = _combine(terms, scales).reshape(b, 1, gh, gw)
        if s > 1:
            score = F.interpolate(score, size=(h, w), mode="bilinear", align_corners=False)
        score = _box_mean_tensor(score, self.score_smoothing)
        return ChangeOutput(logits=(score - threshold.to(score)) / scale.to(score), difference=score.clamp_min(0))


def _combine(terms: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``s12 / scale_t2 + s21 / scale_t1``."""
    return terms[:, 0] / scales[1] + terms[:, 1] / scales[0]


@register_model("hetero-unsupervised", family="classical", heterogeneous=True)
def hetero_unsupervised(in_channels: int | tuple[int, int] = 3, anchors: int = 1500, neighbours: int = 20, smoothing: int = 5,
                        score_smoothing: int = 9, iterations: int = 2, stride: int = 2) -> StructureConsistency:
    """Structure consistency of self-similarity graphs (no training; any two sensors, 1 or more bands each)."""
    return StructureConsistency(band_pair(in_channels, shared=False), anchors, neighbours, smoothing, score_smoothing, iterations, stride)


PRIOR_CLAMP = 8.0  # structure logits beyond +-8 (probability 0.9997) carry no more information


def _three_bands(x: torch.Tensor) -> torch.Tensor:
    """A 1-band date repeated to 3 bands (a grey or SAR image in every channel); 3-band dates as they are."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class StructureRefined(ChangeModel):
    """Structure-consistency logits (:class:`StructureConsistency`, fitted on the pair at detect time)
    refined by a small trained network, registered as ``structure-refined`` (bundled as ``hetero``).

    Each date (1 or 3 bands, any sensor; 1-band dates repeated to 3) is stacked with the scaled
    structure logit and passed through one weight-shared FC encoder; the levels are fused
    order-invariantly (``[|a - b|, a + b]``), decoded, and the head's output is added to
    ``gain * structure_logit + bias`` (``gain`` 1, ``bias`` 0 at initialisation: an untrained model is
    ``hetero-unsupervised``). Swapping the dates gives the same output, so optical/SAR and SAR/optical
    pairs are one case. ``use_images=False`` is the ablation that sees only the structure logit.
    """

    needs_scene_fit = True
    weights_shared = True
    swap_invariant = True

    def __init__(self, in_channels: tuple[int, int] = (3, 3), base_channels: int = 8, use_images: bool = True,
                 **structure: int) -> None:
        super().__init__()
        bad = [c for c in in_channels if c not in (1, 3)]
        if bad:
            raise ValueError(f"structure-refined takes 1- or 3-band dates (optical or SAR), got {tuple(in_channels)} bands")
        self.in_channels = tuple(in_channels)
        self.use_images = bool(use_images)
        self.structure = StructureConsistency(self.in_channels, **structure)
        self.encoder = FCEncoder(4 if self.use_images else 1, base_channels, dropout=0.0)
        self.fusion = Fusion("symmetric")
        self.decoder = FCDecoder([self.fusion.out_channels(c) for c in self.encoder.out_channels], base_channels, dropout=0.0)
        self.head = SegmentationHead(self.decoder.out_channels)
        self.gain = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def fit_view(self, x1: np.ndarray, x2: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The structure model's view (box-filtered inputs)."""
        return self.structure.fit_view(x1, x2, valid)

    def fit_scene(self, t1: torch.Tensor, t2: torch.Tensor, valid: torch.Tensor) -> None:
        """The structure model's scene fit (anchors, scales, Otsu threshold)."""
        self.structure.fit_scene(t1, t2, valid)

    def refine(self, t1: torch.Tensor, t2: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Change logits ``(B, 1, H, W)`` from normalised dates and the structure logit ``prior (B, 1, H, W)``."""
        size = tuple(t1.shape[-2:])
        p = prior.float().clamp(-PRIOR_CLAMP, PRIOR_CLAMP)
        inputs = [torch.cat([_three_bands(t), p / 4], 1) if self.use_images else p / 4 for t in (t1, t2)]
        x1, x2 = (pad_to_multiple(x, self.encoder.output_stride) for x in inputs)
        padded = tuple(x1.shape[-2:])
        fused = [self.fusion(a, b) for a, b in zip(self.encoder(x1), self.encoder(x2))]
        residual = crop_to(self.head(self.decoder(fused, padded), padded), size)
        return self.gain * p + self.bias + residual

    def forward(self, t1: torch.Tensor, t2: torch.Tensor) -> ChangeOutput:
        check_pair(self, t1, t2)
        prior = self.structure(t1, t2)
        return ChangeOutput(logits=self.refine(t1, t2, prior.logits.detach()), difference=prior.difference)


@register_model("structure-refined", family="structure", heterogeneous=True)
def structure_refined(in_channels: int | tuple[int, int] = 3, base_channels: int = 8, use_images: bool = True,
                      anchors: int = 1500, neighbours: int = 20, smoothing: int = 5, score_smoothing: int = 9,
                      iterations: int = 2, stride: int = 2) -> StructureRefined:
    """Structure consistency refined by a trained weight-shared network (bundled as ``hetero``: 1- or 3-band dates, any order)."""
    return StructureRefined(band_pair(in_channels, shared=False), base_channels, use_images, anchors=anchors, neighbours=neighbours, smoothing=smoothing,
                            score_smoothing=score_smoothing, iterations=iterations, stride=stride)
