"""Keypoint matching on dense feature maps: frames, descriptor sampling, cosine correlation and the
localisers (nearest neighbour, soft-argmax and the Kernel-Softmax of Lee et al. used by SD4Match).

Frames (docs/ARCHITECTURE.md): points live in the squashed ``S x S`` image frame (``S = image_size``);
feature grids have ``s`` cells per side and image <-> grid is the align-corners map ``x * (s - 1) / (S - 1)``.
Grid coordinates are ``(x, y)`` = (column, row) in cell units.

Batching: ``sample_descriptors``, ``correlation``, ``match_all`` and ``match_keypoints`` take a batch
dimension ``B`` and the same number ``K`` of keypoints for every item (no padding mask): callers batch pairs
with equal ``K`` or pad the keypoints and drop the padded predictions. The localisers accept any leading
dimensions. ``match_all`` computes each pair's correlation once and applies every localiser to it, on the
features' device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

MATCHING_METHODS: tuple[str, ...] = ("nn", "soft_argmax", "kernel_softmax")

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)
Points = torch.Tensor | np.ndarray | list


def _check_sizes(image_size: int, grid_size: int) -> None:
    """Reject sizes for which the align-corners map is undefined (a side of one pixel/cell)."""
    if image_size < 2 or grid_size < 2:
        raise ValueError(
            f"image_size and grid_size must be >= 2, got image_size={image_size}, grid_size={grid_size}"
        )


def image_to_grid(xy: ArrayT, image_size: int, grid_size: int) -> ArrayT:
    """Map ``S x S`` image-frame points to feature-grid cells, ``x * (s - 1) / (S - 1)`` (align corners)."""
    _check_sizes(image_size, grid_size)
    return xy * ((grid_size - 1) / (image_size - 1))


def grid_to_image(xy: ArrayT, grid_size: int, image_size: int) -> ArrayT:
    """Map feature-grid cells back to the ``S x S`` image frame, the inverse of ``image_to_grid``."""
    _check_sizes(image_size, grid_size)
    return xy * ((image_size - 1) / (grid_size - 1))


def _as_float_array(values: Points, last_dim: int, name: str) -> torch.Tensor | np.ndarray:
    """Return a float tensor (tensors stay tensors) or float64 array whose last axis has ``last_dim``."""
    if isinstance(values, torch.Tensor):
        arr = values if values.is_floating_point() else values.to(torch.float32)
    else:
        arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != last_dim:
        raise ValueError(f"{name}: expected shape (..., {last_dim}), got {tuple(arr.shape)}")
    return arr


def _scale_like(arr: torch.Tensor | np.ndarray, factors: list[float]) -> torch.Tensor | np.ndarray:
    """Multiply the last axis of ``arr`` by ``factors``, keeping the array type, dtype and device."""
    if isinstance(arr, torch.Tensor):
        return arr * torch.tensor(factors, dtype=arr.dtype, device=arr.device)
    return arr * np.asarray(factors, dtype=arr.dtype)


def _check_image_dims(width: float, height: float, image_size: int) -> None:
    """Reject non-positive image sizes, which would make the squash factors meaningless."""
    if width <= 0 or height <= 0 or image_size <= 0:
        raise ValueError(
            f"image sizes must be positive, got width={width}, height={height}, image_size={image_size}"
        )


def to_squashed_frame(kps: Points, width: float, height: float, image_size: int) -> torch.Tensor | np.ndarray:
    """Scale ``(..., 2)`` keypoints of a ``W x H`` image to the squashed ``S x S`` frame, clamped to [0, S-1].

    Tensors stay tensors; anything else becomes a float64 numpy array.
    """
    _check_image_dims(width, height, image_size)
    arr = _as_float_array(kps, 2, "kps")
    scaled = _scale_like(arr, [image_size / width, image_size / height])
    return scaled.clip(0, image_size - 1)


def bbox_to_squashed_frame(
    bbox: Points, width: float, height: float, image_size: int
) -> torch.Tensor | np.ndarray:
    """Scale ``(..., 4)`` boxes ``[x1, y1, x2, y2]`` of a ``W x H`` image to the squashed frame (no clamp)."""
    _check_image_dims(width, height, image_size)
    arr = _as_float_array(bbox, 4, "bbox")
    sx, sy = image_size / width, image_size / height
    return _scale_like(arr, [sx, sy, sx, sy])


def sample_descriptors(feat: torch.Tensor, kps_img: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinearly sample ``(B, C, h, w)`` features at ``(B, K, 2)`` S-frame keypoints -> L2-normalised
    ``(B, K, C)``; ``grid_sample`` with align_corners=True after ``x_norm = 2 x / (S - 1) - 1``.
    """
    if feat.ndim != 4 or kps_img.ndim != 3 or kps_img.shape[-1] != 2 or kps_img.shape[0] != feat.shape[0]:
        raise ValueError(
            f"sample_descriptors: expected feat (B, C, h, w) and kps (B, K, 2), "
            f"got {tuple(feat.shape)} and {tuple(kps_img.shape)}"
        )
    if image_size < 2:
        raise ValueError(f"sample_descriptors: image_size must be >= 2, got {image_size}")
    norm = kps_img.to(feat.dtype) * (2.0 / (image_size - 1)) - 1.0
    sampled = F.grid_sample(
        feat, norm[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=True
    )
    return F.normalize(sampled[..., 0].transpose(1, 2), dim=-1)


def correlation(desc: torch.Tensor, trg_feat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``(B, K, C)`` descriptors with each ``(B, C, h, w)`` cell -> ``(B, K, h, w)``."""
    if (
        desc.ndim != 3
        or trg_feat.ndim != 4
        or desc.shape[0] != trg_feat.shape[0]
        or desc.shape[2] != trg_feat.shape[1]
    ):
        raise ValueError(
            f"correlation: expected desc (B, K, C) and trg_feat (B, C, h, w), "
            f"got {tuple(desc.shape)} and {tuple(trg_feat.shape)}"
        )
    return cosine_maps(desc, F.normalize(trg_feat, dim=1))


def cosine_maps(desc: torch.Tensor, trg_unit: torch.Tensor) -> torch.Tensor:
    """``correlation`` with target maps already L2-normalised along channels (normalised once per image)."""
    with ieee_fp32_matmul(desc.device):
        return torch.einsum("bkc,bchw->bkhw", F.normalize(desc, dim=-1), trg_unit)


def sample_bank_descriptors(
    bank: torch.Tensor, index: torch.Tensor, kps_img: torch.Tensor, image_size: int
) -> torch.Tensor:
    """``sample_descriptors`` of ``bank[index]`` without copying the maps: ``(N, C, h, w)`` feature bank,
    ``(B,)`` image index and ``(B, K, 2)`` S-frame points -> L2-normalised ``(B, K, C)``.

    One ``grid_sample`` over the bank, each image sampled at the points of every pair that uses it.
    """
    if bank.ndim != 4 or index.ndim != 1 or kps_img.ndim != 3 or kps_img.shape[0] != index.shape[0]:
        raise ValueError(
            f"sample_bank_descriptors: expected bank (N, C, h, w), index (B,) and kps (B, K, 2), got "
            f"{tuple(bank.shape)}, {tuple(index.shape)} and {tuple(kps_img.shape)}"
        )
    if image_size < 2:
        raise ValueError(f"sample_bank_descriptors: image_size must be >= 2, got {image_size}")
    batch, k = kps_img.shape[:2]
    slot = torch.zeros(batch, dtype=torch.long)  # rank of each pair among the pairs of its image
    seen: dict[int, int] = {}
    for b, image in enumerate(index.tolist()):
        slot[b] = seen.get(image, 0)
        seen[image] = int(slot[b]) + 1
    rows = index.to(bank.device).repeat_interleave(k)
    cols = (slot[:, None] * k + torch.arange(k)).reshape(-1).to(bank.device)
    norm = kps_img.to(bank.device, bank.dtype) * (2.0 / (image_size - 1)) - 1.0
    grid = torch.zeros(
        bank.shape[0], max(seen.values(), default=0) * k, 2, dtype=bank.dtype, device=bank.device
    )
    grid[rows, cols] = norm.reshape(-1, 2)
    sampled = F.grid_sample(
        bank, grid[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=True
    )
    # (B, C, K) in memory like ``sample_descriptors``' output, so every later op sees the same layout
    desc = sampled[..., 0][rows, :, cols].reshape(batch, k, -1).transpose(1, 2).contiguous()
    return F.normalize(desc.transpose(1, 2), dim=-1)


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Full-precision fp32 matmuls on CUDA within the block (TF32 off), restoring the previous setting.

    The evaluation enables TF32 for the networks that stay fp32; the cosine correlation keeps fp32 so that
    nearest-neighbour ties and the T = 0.04 softmax see the same numbers as on the CPU.
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _grid_coords(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened column (x) and row (y) coordinates of the cells of ``corr``'s last two axes."""
    h, w = corr.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=corr.dtype, device=corr.device),
        torch.arange(w, dtype=corr.dtype, device=corr.device),
        indexing="ij",
    )
    return xs.reshape(-1), ys.reshape(-1)


def nearest_neighbour(corr: torch.Tensor) -> torch.Tensor:
    """Grid ``(x, y)`` of the argmax of each ``(..., h, w)`` correlation map -> ``(..., 2)`` float."""
    if corr.ndim < 2:
        raise ValueError(f"nearest_neighbour: expected (..., h, w), got {tuple(corr.shape)}")
    w = corr.shape[-1]
    idx = corr.flatten(-2).argmax(dim=-1)
    dtype = corr.dtype if corr.is_floating_point() else torch.float32
    return torch.stack([idx % w, idx // w], dim=-1).to(dtype)


def soft_argmax(corr: torch.Tensor, temperature: float = 0.04) -> torch.Tensor:
    """Expected grid ``(x, y)`` under ``softmax(corr / T)`` over each ``(..., h, w)`` map (max subtracted)."""
    if corr.ndim < 2:
        raise ValueError(f"soft_argmax: expected (..., h, w), got {tuple(corr.shape)}")
    if temperature <= 0:
        raise ValueError(f"soft_argmax: temperature must be > 0, got {temperature}")
    flat = corr.flatten(-2)
    prob = torch.softmax((flat - flat.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    xs, ys = _grid_coords(corr)
    return torch.stack([(prob * xs).sum(dim=-1), (prob * ys).sum(dim=-1)], dim=-1)


def kernel_soft_argmax(
    corr: torch.Tensor, sigma: float = 7.0, temperature: float = 0.04, peak: torch.Tensor | None = None
) -> torch.Tensor:
    """Kernel-Softmax (Lee et al., SFNet): multiply each map by a Gaussian (``sigma`` cells) centred on its
    argmax, then soft-argmax with temperature ``T``; suppresses far-away secondary peaks.

    ``peak``: the maps' ``nearest_neighbour`` if already computed (it is recomputed otherwise).
    """
    if sigma <= 0:
        raise ValueError(f"kernel_soft_argmax: sigma must be > 0, got {sigma}")
    peak = nearest_neighbour(corr) if peak is None else peak
    xs, ys = _grid_coords(corr)
    sq_dist = (xs - peak[..., :1]) ** 2 + (ys - peak[..., 1:]) ** 2
    gauss = torch.exp(-sq_dist / (2.0 * sigma**2)).reshape(corr.shape)
    return soft_argmax(corr * gauss, temperature)


def _check_methods(methods: Sequence[str], caller: str) -> None:
    """Reject an empty method list and unknown method names."""
    unknown = [m for m in methods if m not in MATCHING_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"{caller}: unknown method(s) {unknown or list(methods)!r}; expected some of {MATCHING_METHODS}"
        )


def localise(
    corr: torch.Tensor, methods: Sequence[str], *, temperature: float = 0.04, sigma: float = 7.0
) -> dict[str, torch.Tensor]:
    """Grid ``(x, y)`` of every method in ``methods`` from one ``(..., h, w)`` correlation.

    Half-precision maps are promoted to fp32 first (softmax at T = 0.04 needs the range); the argmax is
    shared by ``nn`` and ``kernel_softmax``.
    """
    _check_methods(methods, "localise")
    if corr.dtype in (torch.float16, torch.bfloat16):
        corr = corr.float()
    peak = nearest_neighbour(corr) if {"nn", "kernel_softmax"} & set(methods) else None
    out: dict[str, torch.Tensor] = {}
    for method in methods:
        if method == "nn":
            out[method] = peak
        elif method == "soft_argmax":
            out[method] = soft_argmax(corr, temperature)
        else:
            out[method] = kernel_soft_argmax(corr, sigma, temperature, peak=peak)
    return out


def match_all(
    src_feat: torch.Tensor,
    trg_feat: torch.Tensor,
    src_kps_img: torch.Tensor,
    image_size: int,
    methods: Sequence[str] = MATCHING_METHODS,
    *,
    temperature: float = 0.04,
    sigma: float = 7.0,
) -> dict[str, torch.Tensor]:
    """Predicted target points ``(B, K, 2)`` (S frame) of every method, from one correlation per pair.

    Runs on the features' device; ``src_kps_img`` is moved there. Feature maps must be square.
    """
    _check_methods(methods, "match_all")
    h, w = trg_feat.shape[-2:]
    if h != w:
        raise ValueError(f"match_all: target feature map must be square, got {h}x{w}")
    corr = correlation(sample_descriptors(src_feat, src_kps_img.to(src_feat.device), image_size), trg_feat)
    grids = localise(corr, methods, temperature=temperature, sigma=sigma)
    return {method: grid_to_image(grid_xy, w, image_size) for method, grid_xy in grids.items()}


def match_in_bank(
    bank: torch.Tensor,
    unit_bank: torch.Tensor,
    src_index: torch.Tensor,
    trg_index: torch.Tensor,
    src_kps_img: torch.Tensor,
    image_size: int,
    methods: Sequence[str] = MATCHING_METHODS,
    *,
    temperature: float = 0.04,
    sigma: float = 7.0,
) -> dict[str, torch.Tensor]:
    """``match_all`` for pairs of images of one ``(N, C, h, w)`` feature bank: pair b matches
    ``bank[src_index[b]]`` to ``bank[trg_index[b]]``. ``unit_bank`` is ``F.normalize(bank, dim=1)``,
    computed once per bank; only the target maps are gathered."""
    _check_methods(methods, "match_in_bank")
    h, w = bank.shape[-2:]
    if h != w or unit_bank.shape != bank.shape:
        raise ValueError(
            f"match_in_bank: need square maps and unit_bank of the bank's shape, got {tuple(bank.shape)} "
            f"and {tuple(unit_bank.shape)}"
        )
    desc = sample_bank_descriptors(bank, src_index, src_kps_img, image_size)
    corr = cosine_maps(desc, unit_bank[trg_index.to(bank.device)])
    grids = localise(corr, methods, temperature=temperature, sigma=sigma)
    return {method: grid_to_image(grid_xy, w, image_size) for method, grid_xy in grids.items()}


def match_keypoints(
    src_feat: torch.Tensor,
    trg_feat: torch.Tensor,
    src_kps_img: torch.Tensor,
    image_size: int,
    method: str,
    *,
    temperature: float = 0.04,
    sigma: float = 7.0,
) -> torch.Tensor:
    """Predict target points ``(B, K, 2)`` in the S frame for ``(B, K, 2)`` S-frame source keypoints.

    ``method`` is one of ``MATCHING_METHODS``; ``temperature``/``sigma`` apply to the soft localisers.
    Feature maps must be square (the images are squashed to ``S x S``).
    """
    if method not in MATCHING_METHODS:
        raise ValueError(f"match_keypoints: unknown method {method!r}; expected one of {MATCHING_METHODS}")
    return match_all(
        src_feat, trg_feat, src_kps_img, image_size, (method,), temperature=temperature, sigma=sigma
    )[method]
