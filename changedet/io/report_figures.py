"""Figures of a run's report (``report.html``, ``quicklook.png``) and of the notebooks: the same
functions everywhere, so a figure looks the same wherever it is seen.

* :func:`shared_stretch` + :func:`composite` — true-colour (or grey) images of both dates with one
  robust percentile stretch, so equal reflectance looks equal on both;
* :func:`change_figure` — t1, t2 and t2 with the change mask overlaid, side by side at one scale, with a
  legend, the threshold, a scale bar and a north arrow;
* :func:`histogram_figure` — the change-probability histogram with the threshold marked;
* :func:`png_bytes` — a figure as PNG bytes (to inline or write).

Matplotlib's object API only (no pyplot): the caller's backend and open figures are left alone.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrow, Patch, Rectangle

CHANGE_RGB = (0.89, 0.10, 0.11)
INVALID_RGB = (0.62, 0.62, 0.62)


def shared_stretch(dates: Sequence[np.ndarray], valids: Sequence[np.ndarray], low: float = 2.0,
                   high: float = 98.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-channel ``(lo, hi)`` percentiles of the valid pixels of all ``dates`` (``(C, h, w)`` each)
    together; a channel without spread gets ``hi = lo + 1``."""
    channels = dates[0].shape[0]
    pooled = [np.concatenate([d[c][v] for d, v in zip(dates, valids)]) for c in range(channels)]
    lo = np.array([np.percentile(p, low) if p.size else 0.0 for p in pooled], np.float64)
    hi = np.array([np.percentile(p, high) if p.size else 1.0 for p in pooled], np.float64)
    return lo, np.where(hi > lo, hi, lo + 1.0)


def composite(values: np.ndarray, valid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` float image in [0, 1] of 3 (red, green, blue) or 1 (grey) channels, stretched to
    ``lo``–``hi``; invalid pixels grey."""
    scaled = np.clip((values - lo[:, None, None]) / (hi - lo)[:, None, None], 0.0, 1.0)
    rgb = np.repeat(scaled, 3, axis=0) if scaled.shape[0] == 1 else scaled[:3]
    image = np.moveaxis(rgb, 0, -1).astype(np.float32)
    image[~valid] = INVALID_RGB
    return image


def nice_length(span_m: float) -> float:
    """A round length (1, 2 or 5 × 10^k metres) of about a quarter of ``span_m``."""
    target = max(span_m / 4.0, 1e-9)
    power = 10 ** math.floor(math.log10(target))
    return max(m * power for m in (1, 2, 5) if m * power <= target)


def _length_label(metres: float) -> str:
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def add_scale_and_north(ax, width_px: int, height_px: int, pixel_m: float | None) -> None:
    """A scale bar (bottom left, when the pixel size in metres is known) and a north arrow (top right)
    on an image axis of ``width_px`` × ``height_px`` (the grid is north-up)."""
    if pixel_m:
        length = nice_length(width_px * pixel_m)
        bar = length / pixel_m
        x0, y0 = 0.05 * width_px, 0.93 * height_px
        ax.add_patch(Rectangle((x0, y0), bar, 0.015 * height_px, facecolor="black", edgecolor="white", linewidth=0.8))
        ax.text(x0, y0 - 0.02 * height_px, _length_label(length), fontsize=7, color="black",
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})  # fmt: skip
    x, y = 0.92 * width_px, 0.16 * height_px
    ax.add_patch(FancyArrow(x, y, 0, -0.09 * height_px, width=0.012 * width_px, head_width=0.04 * width_px,
                            head_length=0.04 * height_px, color="black", length_includes_head=True))  # fmt: skip
    ax.text(x, y + 0.05 * height_px, "N", ha="center", fontsize=8, fontweight="bold",
            bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})  # fmt: skip


def overlay(image: np.ndarray, mask: np.ndarray, nodata: int, alpha: float = 0.65) -> np.ndarray:
    """``image`` with change pixels (``mask == 1``) blended towards red, ``nodata`` pixels grey."""
    out = image.copy()
    change = mask == 1
    out[change] = (1 - alpha) * out[change] + alpha * np.array(CHANGE_RGB, np.float32)
    out[mask == nodata] = INVALID_RGB
    return out


def change_figure(t1: np.ndarray, t2: np.ndarray, mask: np.ndarray, nodata: int, threshold: float | None,
                  pixel_m: float | None, labels: tuple[str, str] = ("t1", "t2"), panel_inches: float = 3.6) -> Figure:  # fmt: skip
    """Three panels at one scale: ``t1``, ``t2`` (``(h, w, 3)`` images from :func:`composite`) and t2
    with ``mask`` (1 change, 0 no change, ``nodata`` invalid) overlaid, a legend under them."""
    height, width = mask.shape
    aspect = height / max(width, 1)
    left, right, gap, top, bottom = 0.1, 0.1, 0.15, 0.35, 0.45  # inches: margins, panel gap, title, legend
    figure_height = panel_inches * aspect + top + bottom
    fig = Figure(figsize=(3 * panel_inches + left + right + 2 * gap, figure_height))
    axes = fig.subplots(1, 3)
    rule = "" if threshold is None else f" (probability ≥ {threshold:.2f})"
    for ax, image, title in zip(axes, (t1, t2, overlay(t2, mask, nodata)), (*labels, f"{labels[1]} + change{rule}")):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        add_scale_and_north(ax, width, height, pixel_m)
    handles = [Patch(color=CHANGE_RGB, label="change" + rule), Patch(facecolor="white", edgecolor="0.5", label="no change"),
               Patch(color=INVALID_RGB, label="no data (nodata, clouds, outside a footprint)")]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    width_in = 3 * panel_inches + left + right + 2 * gap
    fig.subplots_adjust(left=left / width_in, right=1 - right / width_in, top=1 - top / figure_height,
                        bottom=bottom / figure_height, wspace=gap / panel_inches)  # fmt: skip
    return fig


def histogram_figure(probability: np.ndarray, threshold: float | None, bins: int = 50) -> Figure:
    """Histogram (log count) of the valid change probabilities, the threshold as a vertical line."""
    fig = Figure(figsize=(5.0, 2.6))
    ax = fig.subplots()
    ax.hist(probability, bins=bins, range=(0.0, 1.0), color="0.35", log=True)
    if threshold is not None:
        ax.axvline(threshold, color=CHANGE_RGB, linewidth=1.5, label=f"threshold {threshold:.2f}")
        ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel("change probability")
    ax.set_ylabel("pixels")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure, dpi: int = 100, colours: int | None = 256) -> bytes:
    """``fig`` rendered as PNG; ``colours``: reduced to an adaptive palette of that many colours (imagery
    PNGs shrink ~3x; octree keeps small saturated areas such as the change red), None keeps true colour."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    if colours is None:
        return buffer.getvalue()
    from PIL import Image

    buffer.seek(0)
    small = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(small, format="png")
    return small.getvalue()
