"""The zero-shot peers' own evaluations, built from this pipeline's matching and scoring functions:

- DIFT's (Tsingularity/dift ``eval_spair.py`` + ``src/models/dift_sd.py``): the image resized to S x S with
  PIL's default (bicubic) filter; every ensemble copy has its own VAE posterior sample and noise; the copies'
  raw ``up_blocks[1]`` maps are averaged (not normalised); source and target maps are upsampled (bilinear,
  align_corners=False) to their original image sizes; the source descriptor is the upsampled map at the
  keypoint's pixel; the prediction is the argmax pixel of the cosine map over the whole upsampled target;
  PCK in the original frame with the original box, ``d / theta <= alpha``.
- sd-dino's (Junyi42/sd-dino ``pck_spair_pascal.py``): features of the padded square; the source descriptor
  is the feature of the patch holding the keypoint, ``floor(x * side / P)``; the prediction is the centre of
  the nearest-neighbour patch, ``cell * stride + patch // 2 - 0.5``; PCK in the padded frame,
  ``d < alpha * theta`` (``frames.padded_targets``).

Both match by nearest neighbour only, as their authors do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from sd4match.datasets import load_image
from sd4match.evaluation import FeatureFn, ImageKey, image_seed
from sd4match.features import SDFeaturizer, sample_latents
from sd4match.frames import original_targets, pad_geometry, padded_targets, score_targets
from sd4match.matching import cosine_maps, ieee_fp32_matmul, nearest_neighbour
from sd4match.metrics import PairScore
from sd4match.prompts import CategoryPromptEncoder, PromptSource

log = logging.getLogger(__name__)

PEER_METHODS = ("nn",)  # both peers match by nearest neighbour
NORM_CHUNK = 64  # channels upsampled at a time for the norm map of a full-resolution target
NORM_EPS = 1e-12  # F.normalize's floor on the norm


# ---------------------------------------------------------------------------------------------------------
# DIFT: raw ensemble features of the S x S image, matched on the original frame
# ---------------------------------------------------------------------------------------------------------


def dift_pixels(images: Sequence[Image.Image], image_size: int) -> Tensor:
    """Images resized to S x S with PIL's default filter for ``Image.resize`` (bicubic), in [-1, 1]."""
    if not images:
        raise ValueError("dift_pixels: empty image list")
    arrays = [
        np.asarray(image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (pixels / 255.0 - 0.5) * 2


@torch.no_grad()
def raw_ensemble_features(
    featurizer: SDFeaturizer,
    pixels: Tensor,
    encoder_hidden_states: Tensor,
    timestep: int,
    ensemble: int,
    generator: torch.Generator | None,
) -> Tensor:
    """DIFT's feature of ONE image (1, 3, S, S): ``ensemble`` copies, each with its own VAE posterior sample
    and noise, through the truncated UNet; the mean of the raw maps, NOT normalised: (1, C, s, s) float32.

    The encoder is deterministic, so the posterior is computed once and sampled ``ensemble`` times (DIFT runs
    the VAE on ``ensemble`` copies of the image: the same posterior, independent samples).
    """
    if pixels.ndim != 4 or pixels.shape[0] != 1 or ensemble < 1:
        raise ValueError(f"raw_ensemble_features: need one image (1, 3, S, S) and ensemble >= 1, got "
                         f"{tuple(pixels.shape)} and {ensemble}")  # fmt: skip
    mean, std = featurizer.latent_distribution(pixels)
    shape = (ensemble, *mean.shape[1:])
    latents = sample_latents(mean.expand(shape), std.expand(shape), featurizer.scaling_factor, generator)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noisy = featurizer.add_noise(latents, noise, timestep)
    context = encoder_hidden_states.expand(ensemble, -1, -1)
    step = featurizer.max_batch
    maps = [
        featurizer.truncated_unet(noisy[i : i + step], timestep, context[i : i + step])
        for i in range(0, ensemble, step)
    ]
    return torch.cat(maps).mean(dim=0, keepdim=True)


def dift_feature_fn(
    featurizer: SDFeaturizer,
    prompt: PromptSource,
    root: str | Path,
    image_size: int,
    timestep: int,
    ensemble: int,
    seed: int,
) -> FeatureFn:
    """A FeatureFn of DIFT's raw features (``raw_ensemble_features``) on the featurizer's device; the noise of
    each image is seeded per image (``evaluation.image_seed``), the prompt encoded once per category."""
    conditioning = CategoryPromptEncoder(featurizer.text_encoder, prompt)

    def features_for(keys: Sequence[ImageKey]) -> Tensor:
        out = []
        for key in keys:
            pixels = dift_pixels([load_image(root, key.path, flip=key.flip)], image_size)
            with torch.no_grad(), featurizer.autocast():
                hidden = conditioning([key.category])
            generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, key))
            out.append(raw_ensemble_features(featurizer, pixels, hidden, timestep, ensemble, generator)[0])
        return torch.stack(out)

    return features_for


def pixel_centre_descriptors(feature: Tensor, xy: Tensor, width: int, height: int) -> Tensor:
    """The ``(C, h, w)`` map upsampled (bilinear, align_corners=False) to ``height x width``, read at the
    integer pixels ``xy`` (K, 2) -> L2-normalised (K, C). Sampled directly on the small map at the pixel's
    centre, which is the upsampled map's value there (no full-size map is built); border-clamped."""
    grid = torch.stack([(2 * xy[:, 0] + 1) / width - 1, (2 * xy[:, 1] + 1) / height - 1], dim=-1)
    grid = grid.to(feature.device, feature.dtype)[None, :, None, :]
    sampled = F.grid_sample(feature[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(sampled[0, :, :, 0].T, dim=-1)


def upsampled_norms(feature: Tensor, size: tuple[int, int], chunk: int = NORM_CHUNK) -> Tensor:
    """Per-pixel L2 norm (H, W) of the ``(C, h, w)`` map upsampled to ``size`` (bilinear,
    align_corners=False), accumulated over channel chunks so the (C, H, W) map never exists whole."""
    total = torch.zeros(size, dtype=torch.float32, device=feature.device)
    for start in range(0, feature.shape[0], chunk):
        part = F.interpolate(feature[None, start : start + chunk].float(), size=size, mode="bilinear")
        total += part[0].square().sum(dim=0)
    return total.sqrt()


def original_frame_cosine(
    desc: Tensor, trg_feature: Tensor, size: tuple[int, int], norms: Tensor | None = None
) -> Tensor:
    """Cosine maps (K, H, W) of unit descriptors (K, C) with the target map upsampled to ``size``.

    Exact without the (C, H, W) map: bilinear upsampling is linear, so ``<desc, up(F)> = up(<desc, F>)``; it
    is divided by ``upsampled_norms`` (given, or computed here; floored at ``NORM_EPS``, as ``F.normalize``).
    """
    with ieee_fp32_matmul(trg_feature.device):
        dots = torch.einsum("kc,chw->khw", desc.float(), trg_feature.float())
    up = F.interpolate(dots[None], size=size, mode="bilinear")[0]
    norms = upsampled_norms(trg_feature, size) if norms is None else norms
    return up / norms.clamp_min(NORM_EPS)


@dataclass
class OriginalFrameScorer:
    """DIFT's own evaluation of one pair from its raw feature maps (C, h, w): original frame, nearest
    neighbour over every pixel of the target, ``d / theta <= alpha``.

    The target's full-resolution norm map is computed once per target image and kept while the pairs of one
    category are scored (``frames.evaluate_with_scorer`` goes category by category).
    """

    alphas: tuple[float, ...]
    predictions: Any = field(default=None, repr=False, compare=False)  # a ``predictions.PredictionLog``
    _norms: dict[tuple[str, str, bool], Tensor] = field(default_factory=dict, repr=False)

    def target_norms(self, row: Any, trg_feature: Tensor, size: tuple[int, int]) -> Tensor:
        """``upsampled_norms`` of the pair's target image, cached per category."""
        key = (row.category, row.trg_image, bool(row.flip))
        if key not in self._norms:
            if any(cached[0] != row.category for cached in self._norms):
                self._norms.clear()
            self._norms[key] = upsampled_norms(trg_feature, size)
        return self._norms[key]

    def __call__(self, row: Any, src_feature: Tensor, trg_feature: Tensor) -> list[PairScore]:
        targets = original_targets(row)
        size = (int(row.trg_height), int(row.trg_width))
        desc = pixel_centre_descriptors(src_feature.float(), targets[0], row.src_width, row.src_height)
        cosine = original_frame_cosine(desc, trg_feature, size, self.target_norms(row, trg_feature, size))
        prediction = nearest_neighbour(cosine).cpu()
        if self.predictions is not None:  # original-frame pixels already
            self.predictions.add_original(row, {"nn": prediction})
        return score_targets(row, targets, {"nn": prediction}, self.alphas, rule="ratio_le")


# ---------------------------------------------------------------------------------------------------------
# sd-dino: patch features of the padded square
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchGrid:
    """sd-dino's patch geometry: ``side`` x ``side`` cells over a ``frame`` px padded square, cells ``stride``
    px apart and ``patch`` px wide (DINOv2-B/14 at 840: 60 cells, stride = patch = 14)."""

    frame: int
    side: int
    stride: int
    patch: int

    def __post_init__(self) -> None:
        if min(self.frame, self.side, self.stride, self.patch) < 1:
            raise ValueError(f"PatchGrid: every size must be >= 1, got {self}")

    @classmethod
    def square_cells(cls, frame: int, side: int) -> PatchGrid:
        """Cells tiling the frame (SD+DINO: the SD grid on the DINO frame): stride = patch = frame / side."""
        if frame % side:
            raise ValueError(
                f"PatchGrid: the {frame} px frame is not a whole number of the {side} feature cells per side "
                "(sd-dino: dino_image_size must be a multiple of the SD grid, image_size / 16)"
            )
        return cls(frame, side, frame // side, frame // side)

    def cells(self, xy: Tensor) -> Tensor:
        """Cells ``(..., 2)`` (x, y) holding frame points: ``floor(x * side / frame)`` in float32, as
        sd-dino's ``astype(np.int32)``; clamped to the grid (a point on the far border stays in the last
        cell)."""
        scaled = xy.float() * (self.side / self.frame)
        return scaled.floor().long().clamp(0, self.side - 1)

    def centres(self, cells: Tensor) -> Tensor:
        """Frame coordinates of cell centres: ``cell * stride + patch // 2 - 0.5``."""
        return cells.float() * self.stride + (self.patch // 2 - 0.5)


@dataclass(frozen=True)
class PaddedFrameScorer:
    """sd-dino's own evaluation of one pair from its padded-square features (C, side, side): patch
    descriptors, nearest neighbour, patch-centre prediction, ``d < alpha * theta`` in the padded frame.

    ``grid=None``: cells tile the frame (``PatchGrid.square_cells``, SD+DINO); else a ViT's strided grid.
    """

    frame: int
    alphas: tuple[float, ...]
    grid: PatchGrid | None = None
    predictions: Any = field(default=None, repr=False, compare=False)  # a ``predictions.PredictionLog``

    def patch_grid(self, side: int) -> PatchGrid:
        """The grid of features with ``side`` cells per side."""
        grid = self.grid or PatchGrid.square_cells(self.frame, side)
        if grid.side != side or grid.frame != self.frame:
            raise ValueError(f"PaddedFrameScorer: features have {side} cells per side, the grid {grid}")
        return grid

    def __call__(self, row: Any, src_feature: Tensor, trg_feature: Tensor) -> list[PairScore]:
        targets = padded_targets(row, self.frame)
        grid = self.patch_grid(src_feature.shape[-1])
        cells = grid.cells(targets[0]).to(src_feature.device)
        desc = src_feature[:, cells[:, 1], cells[:, 0]].T.float()  # (K, C): the patch holding each keypoint
        cosine = cosine_maps(desc[None], F.normalize(trg_feature[None].float(), dim=1))
        prediction = grid.centres(nearest_neighbour(cosine)[0]).cpu()
        if self.predictions is not None:  # back from the padded square to the original target frame
            geometry = pad_geometry(row.trg_width, row.trg_height, self.frame)
            self.predictions.add_original(row, {"nn": geometry.from_padded(prediction.double())})
        return score_targets(row, targets, {"nn": prediction}, self.alphas, rule="lt")
