"""SD4Match training loss (paper Eq. 3-5, label smoothing of SimSC): cross-entropy between the softmax
matching probability of each source keypoint over the target grid and a Gaussian window around the
ground-truth target point.

Keypoints live in the squashed ``S x S`` frame (docs/ARCHITECTURE.md). For each valid keypoint the source
descriptor is sampled bilinearly (align corners) and L2-normalised, correlated with every L2-normalised target
cell, and turned into a probability map by a softmax with temperature ``beta``. The ground truth is a
``k x k`` window of integer offsets around the target point in grid coordinates; the probability map is
sampled bilinearly at each window position (border padding), positions outside the map are masked out,
and the log-probabilities are weighted by the unnormalised 2-D Gaussian
``exp(-r^2 / 2 sigma^2) / (2 pi sigma^2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sd4match.matching import image_to_grid, sample_descriptors

DEFAULT_TEMPERATURE = 0.04
DEFAULT_WINDOW = 7
DEFAULT_SIGMA = 1.5
# Smallest positive normal float32: log of a probability clamped here is about -87.3, never -inf.
PROB_FLOOR = torch.finfo(torch.float32).tiny


def gaussian_window_weights(
    window: int, sigma: float, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Integer offsets ``(-k//2 .. k//2)`` and the ``(k, k)`` unnormalised Gaussian weights indexed [dy, dx].

    Weight ``exp(-(dx^2 + dy^2) / (2 sigma^2)) / (2 pi sigma^2)``; the centre weight is
    ``1 / (2 pi sigma^2)``.
    """
    if window < 1 or window % 2 != 1:
        raise ValueError(f"gaussian_window_weights: window must be a positive odd integer, got {window}")
    if sigma <= 0:
        raise ValueError(f"gaussian_window_weights: sigma must be > 0, got {sigma}")
    radius = window // 2
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    sq_dist = offsets[:, None] ** 2 + offsets[None, :] ** 2
    weights = torch.exp(-sq_dist / (2.0 * sigma**2)) / (2.0 * math.pi * sigma**2)
    return offsets, weights


def matching_probability(
    src_feat: Tensor, trg_feat: Tensor, src_kps: Tensor, image_size: int, temperature: float
) -> Tensor:
    """Softmax (temperature ``beta``, max subtracted) of the cosine similarity between each source keypoint's
    descriptor and every target cell: ``(B, K, h, w)``, at least float32 (paper Eq. 3-4)."""
    if temperature <= 0:
        raise ValueError(f"matching_probability: temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(trg_feat.dtype, torch.float32)  # half floats lack range at beta = 0.04
    desc = sample_descriptors(src_feat, src_kps, image_size).to(dtype)
    target = F.normalize(trg_feat.to(dtype), dim=1)
    corr = torch.einsum("bkc,bchw->bkhw", desc, target).flatten(-2)
    logits = (corr - corr.amax(dim=-1, keepdim=True)) / temperature
    return torch.softmax(logits, dim=-1).unflatten(-1, trg_feat.shape[-2:])


def window_positions(trg_grid: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Grid positions ``(..., k, k)`` of the window cells around ``(..., 2)`` grid points: ``(x, y)`` with
    ``x = g_x + offsets[j]`` and ``y = g_y + offsets[i]`` at index ``[i, j]``."""
    xs = trg_grid[..., 0, None, None] + offsets[None, :]
    ys = trg_grid[..., 1, None, None] + offsets[:, None]
    return torch.broadcast_tensors(xs, ys)


def window_log_probability(prob: Tensor, trg_grid: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Log of the probability map ``(B, K, h, w)`` sampled bilinearly (border padding) at the ``k x k`` window
    around each ``(B, K, 2)`` grid point, and the mask of window cells inside ``[0, w-1] x [0, h-1]``."""
    batch, n_kps, h, w = prob.shape
    offsets = torch.arange(-(window // 2), window // 2 + 1, dtype=prob.dtype, device=prob.device)
    xs, ys = window_positions(trg_grid.to(prob.dtype), offsets)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    grid = torch.stack([xs * (2.0 / (w - 1)) - 1.0, ys * (2.0 / (h - 1)) - 1.0], dim=-1)
    sampled = F.grid_sample(
        prob.reshape(batch * n_kps, 1, h, w),
        grid.reshape(batch * n_kps, window, window, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )
    log_prob = torch.log(sampled.clamp_min(PROB_FLOOR)).reshape(batch, n_kps, window, window)
    return log_prob, inside


def _check_loss_inputs(
    src_feat: Tensor, trg_feat: Tensor, src_kps: Tensor, trg_kps: Tensor, valid: Tensor, image_size: int
) -> None:
    """Reject shapes that do not describe B pairs of (C, h, w) maps with K keypoints each."""
    batch, n_kps = valid.shape[:2] if valid.ndim == 2 else (-1, -1)
    ok = (
        src_feat.ndim == 4
        and src_feat.shape == trg_feat.shape
        and src_kps.shape == (batch, n_kps, 2)
        and trg_kps.shape == (batch, n_kps, 2)
        and src_feat.shape[0] == batch
    )
    if not ok:
        raise ValueError(
            "matching_loss: expected src_feat and trg_feat (B, C, h, w), src_kps and trg_kps (B, K, 2), "
            f"valid (B, K); got {tuple(src_feat.shape)}, {tuple(trg_feat.shape)}, {tuple(src_kps.shape)}, "
            f"{tuple(trg_kps.shape)}, {tuple(valid.shape)}"
        )
    if valid.dtype != torch.bool:
        raise ValueError(f"matching_loss: valid must be a bool tensor, got {valid.dtype}")
    if min(src_feat.shape[-2:]) < 2 or image_size < 2:
        raise ValueError(
            f"matching_loss: feature maps and image_size must be >= 2, got "
            f"{tuple(src_feat.shape[-2:])} and image_size={image_size}"
        )


def _valid_counts(valid: Tensor) -> Tensor:
    """Valid keypoints per pair; a pair without any is an error naming its batch index.

    On the meta device (shape-only runs of the real architectures) there is no data to check.
    """
    counts = valid.sum(dim=1)
    if counts.is_meta:
        return counts
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"matching_loss: pair(s) at batch index {empty} have no valid keypoint")
    return counts


def matching_loss(
    src_feat: Tensor,
    trg_feat: Tensor,
    src_kps: Tensor,
    trg_kps: Tensor,
    valid: Tensor,
    image_size: int,
    temperature: float = DEFAULT_TEMPERATURE,
    window: int = DEFAULT_WINDOW,
    sigma: float = DEFAULT_SIGMA,
) -> Tensor:
    """Gaussian-window cross-entropy (paper Eq. 5): per pair, minus the Gaussian-weighted log-probabilities
    of the in-map window cells summed over valid keypoints, divided by their number; mean over pairs.

    Features ``(B, C, h, w)``, S-frame keypoints ``(B, K, 2)``, ``valid`` ``(B, K)`` bool (invalid rows
    may hold any value, NaN included). Returns a scalar of at least float32 precision.
    """
    _check_loss_inputs(src_feat, trg_feat, src_kps, trg_kps, valid, image_size)
    counts = _valid_counts(valid)
    keep = valid[..., None]
    src_kps = torch.where(keep, src_kps, torch.zeros_like(src_kps))
    trg_kps = torch.where(keep, trg_kps, torch.zeros_like(trg_kps))
    prob = matching_probability(src_feat, trg_feat, src_kps, image_size, temperature)
    h, w = prob.shape[-2:]
    trg_grid = torch.stack(
        [image_to_grid(trg_kps[..., 0], image_size, w), image_to_grid(trg_kps[..., 1], image_size, h)], dim=-1
    )
    log_prob, inside = window_log_probability(prob, trg_grid, window)
    _, weights = gaussian_window_weights(window, sigma, dtype=prob.dtype, device=prob.device)
    mask = inside & valid[..., None, None]
    weighted = torch.where(mask, weights * log_prob, torch.zeros_like(log_prob))
    per_pair = -weighted.sum(dim=(1, 2, 3)) / counts.to(prob.dtype)
    return per_pair.mean()


def check_finite(loss: Tensor, step: int) -> None:
    """Stop training on a NaN/inf loss: raise FloatingPointError naming the step."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}: training stopped (non-finite loss)")
