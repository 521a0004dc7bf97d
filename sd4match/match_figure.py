"""The picture of ``sd4match match --out match.png``: source and target side by side in their original
frames, one line per point coloured by its confidence, ground truth drawn when given."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.cm import ScalarMappable
from matplotlib.lines import Line2D
from PIL import Image

from sd4match.figures import DPI, GT_COLOR, OUTLINE, PAIR_GAP_FRACTION, PNG_METADATA, decorate, new_figure
from sd4match.io import atomic_path
from sd4match.match_points import MatchResult

COLORMAP = "viridis"
IMAGE_INCHES = 4.0  # height of the two images
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpeg", ".jpeg": "jpeg"}
MATCH_GID, GT_GID = "match", "gt"


def _canvas(source: Image.Image, target: Image.Image) -> tuple[np.ndarray, float, float, float]:
    """Both images scaled to one height, side by side with a white gap: the array, the source's and the
    target's scale factors, and the target's x offset."""
    height = max(source.height, target.height)
    s_scale, t_scale = height / source.height, height / target.height
    src = np.asarray(source.resize((round(source.width * s_scale), height), Image.Resampling.BILINEAR))
    trg = np.asarray(target.resize((round(target.width * t_scale), height), Image.Resampling.BILINEAR))
    gap = max(1, round(src.shape[1] * PAIR_GAP_FRACTION))
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    return np.concatenate([src, spacer, trg], axis=1), s_scale, t_scale, float(src.shape[1] + gap)


def _caption(result: MatchResult) -> str:
    """Prompt, models and settings of the match, one line."""
    s = result.settings
    prompt = s["prompt"].get("filled")
    prompt = (
        f"text prompt {prompt!r}"
        if prompt is not None
        else f"{s['prompt']['variant']} prompt {s['prompt']['file']}"
    )
    sd = s["sd_model"]
    return (
        f"{prompt}; SD {sd['id']} @ {sd['revision']}; t = {s['timestep']}, ensemble {s['ensemble']}, "
        f"S = {s['image_size']}; points in the original image frames; colour = confidence "
        "(kernel-softmax peak probability)"
    )


def draw_matches(result: MatchResult, out: str | os.PathLike[str]) -> Path:
    """Write the picture of ``result`` to ``out`` (format from its suffix: png, pdf, svg, jpg)."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"argument --out: {out} must end with one of {sorted(FORMATS)}")
    with Image.open(result.source.path) as src, Image.open(result.target.path) as trg:
        canvas, s_scale, t_scale, offset = _canvas(src.convert("RGB"), trg.convert("RGB"))
    aspect = canvas.shape[1] / canvas.shape[0]
    fig = new_figure((IMAGE_INCHES * aspect + 1.2, IMAGE_INCHES + 1.4))
    ax = fig.subplots()
    ax.imshow(canvas)
    norm, cmap = colors.Normalize(0.0, 1.0), colormaps[COLORMAP]
    for (sx, sy), (tx, ty), conf in zip(
        result.source_points, result.target_points, result.confidence, strict=True
    ):
        ax.plot(
            [sx * s_scale, tx * t_scale + offset],
            [sy * s_scale, ty * t_scale],
            color=cmap(norm(conf)),
            linewidth=1.5,
            marker="o",
            markersize=3,
            gid=MATCH_GID,
            path_effects=OUTLINE,
        )
    handles = [
        Line2D([], [], color=cmap(0.8), marker="o", markersize=3, label="source point → predicted target")
    ]
    if result.ground_truth is not None:
        for (tx, ty), (gx, gy) in zip(result.target_points, result.ground_truth, strict=True):
            gx, gy, tx = gx * t_scale + offset, gy * t_scale, tx * t_scale + offset
            ax.plot([tx, gx], [ty * t_scale, gy], color=GT_COLOR, linewidth=0.8, linestyle="--", gid=GT_GID)
            ax.plot(
                gx, gy, marker="o", markersize=7, markerfacecolor="none", markeredgecolor=GT_COLOR, gid=GT_GID
            )
        handles.append(
            Line2D(
                [],
                [],
                color=GT_COLOR,
                marker="o",
                markerfacecolor="none",
                linestyle="--",
                label="ground truth (dashed: prediction → ground truth)",
            )
        )
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"source {result.source.key}  |  target {result.target.key}", fontsize=8)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, fontsize=8)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.03)
    bar.set_label("confidence", fontsize=8)
    title = f"{len(result.source_points)} points matched ({result.method})"
    decorate(fig, title, textwrap.fill(_caption(result), 110), bool(result.settings.get("demo")))
    kind = FORMATS[out.suffix.lower()]
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=kind, dpi=DPI, metadata=PNG_METADATA if kind == "png" else None)
    return out
