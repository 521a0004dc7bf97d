"""The frames a pair is scored in besides this pipeline's squashed S x S frame (``evaluation``): DIFT's
original image frame and sd-dino's aspect-preserving padded square, with the PCK comparison rule each peer
uses.

Peer code followed (facts, re-implemented here):
- Junyi42/sd-dino ``utils/utils_correspondence.py`` ``resize(..., edge=False)``: the long side is resized to
  the square's size P (Lanczos), the short side to ``round(P * short / long)`` (numpy's half-to-even), and the
  image is pasted on a black P x P canvas, centred: offset ``(P - short') // 2``.
- sd-dino ``pck_spair_pascal.py`` ``preprocess_kps_pad``: keypoints ``x * P / max(W, H)`` plus that offset;
  ``load_spair_data``: threshold = max side of the target box times the target's scale; ``compute_pck``:
  correct if ``error < alpha * threshold`` (strict), and on PF-Pascal ``threshold = P``.
- Tsingularity/dift ``eval_spair.py``: PCK in the original frame, correct if ``dist / threshold <= alpha``
  with the threshold = max side of the original target box.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor

from sd4match.evaluation import FeatureFn, ImageKey
from sd4match.metrics import PairScore, pck, pck_threshold, per_pair_frame

PCK_RULES = ("le", "ratio_le", "lt")
"""``le``: ``d <= alpha * theta`` (this pipeline, ``metrics.pck``); ``ratio_le``: ``d / theta <= alpha``
(DIFT); ``lt``: ``d < alpha * theta`` (sd-dino)."""

PairTargets = tuple[Tensor, Tensor, float]
"""(source keypoints, target keypoints, PCK threshold) of one pair in a frame (as ``evaluation``'s)."""

PairScorer = Callable[[Any, Tensor, Tensor], list[PairScore]]
"""Scores one pairs-table row from its source and target feature maps ``(C, h, w)``."""


# ---------------------------------------------------------------------------------------------------------
# sd-dino's padded square
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PadGeometry:
    """Where a ``W x H`` image lands in sd-dino's ``size x size`` square: keypoints scale by ``scale`` and
    shift by ``(offset_x, offset_y)``; the resized image is ``width x height`` pixels."""

    size: int
    scale: float
    offset_x: int
    offset_y: int
    width: int
    height: int

    def to_padded(self, xy: Tensor) -> Tensor:
        """``(..., 2)`` original-frame points -> the padded square: ``x * scale + offset`` (in xy's dtype)."""
        offset = torch.tensor([self.offset_x, self.offset_y], dtype=xy.dtype, device=xy.device)
        return xy * self.scale + offset

    def from_padded(self, xy: Tensor) -> Tensor:
        """``(..., 2)`` padded-square points -> the original frame, the inverse of ``to_padded``."""
        offset = torch.tensor([self.offset_x, self.offset_y], dtype=xy.dtype, device=xy.device)
        return (xy - offset) / self.scale


def pad_geometry(width: float, height: float, size: int) -> PadGeometry:
    """sd-dino's aspect-preserving resize of a ``width x height`` image into a ``size x size`` square."""
    if width <= 0 or height <= 0 or size < 1:
        raise ValueError(
            f"pad_geometry: need positive sizes, got width={width}, height={height}, size={size}"
        )
    scale = size / max(width, height)
    if height < width:
        short = round(size * height / width)  # Python's round is half-to-even, as numpy's around
        return PadGeometry(size, scale, 0, (size - short) // 2, size, short)
    if width < height:
        short = round(size * width / height)
        return PadGeometry(size, scale, (size - short) // 2, 0, short, size)
    return PadGeometry(size, scale, 0, 0, size, size)


def pad_image(image: Image.Image, size: int) -> Image.Image:
    """The image resized (Lanczos, aspect kept) and centred on a black ``size x size`` RGB canvas."""
    geometry = pad_geometry(image.width, image.height, size)
    resized = image.convert("RGB").resize((geometry.width, geometry.height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(resized, (geometry.offset_x, geometry.offset_y))
    return canvas


# ---------------------------------------------------------------------------------------------------------
# Targets and thresholds per frame
# ---------------------------------------------------------------------------------------------------------


def _points(values: Any) -> Tensor:
    """A ``(K, 2)`` float32 tensor of keypoints from a pairs-table cell."""
    return torch.tensor(np.asarray(values, dtype=np.float32).reshape(-1, 2))


def original_targets(row: Any) -> PairTargets:
    """Keypoints and PCK threshold in the original image frame (DIFT's evaluation): the target box's max side
    (SPair), the target image's max side (PF-Pascal) or the target keypoints' max extent (PF-Willow)."""
    src, trg = _points(row.src_kps), _points(row.trg_kps)
    threshold = pck_threshold(
        row.threshold_kind,
        trg_bbox=row.trg_bbox,
        trg_kps=trg.double().numpy(),
        image_size=max(row.trg_width, row.trg_height),
    )
    return src, trg, threshold


def padded_targets(row: Any, size: int) -> PairTargets:
    """Keypoints (float32, computed as sd-dino does) and PCK threshold in the padded ``size`` square: the
    original threshold times the target's scale (box side, keypoint extent) or ``size`` itself (PF-Pascal)."""
    src_geometry = pad_geometry(row.src_width, row.src_height, size)
    trg_geometry = pad_geometry(row.trg_width, row.trg_height, size)
    src = src_geometry.to_padded(_points(row.src_kps))
    trg = trg_geometry.to_padded(_points(row.trg_kps))
    if row.threshold_kind == "img":
        return src, trg, float(size)
    original = pck_threshold(row.threshold_kind, trg_bbox=row.trg_bbox, trg_kps=np.asarray(row.trg_kps))
    return src, trg, original * trg_geometry.scale


# ---------------------------------------------------------------------------------------------------------
# PCK rules and scores
# ---------------------------------------------------------------------------------------------------------


def count_correct(
    pred: Tensor, gt: Tensor, threshold: float, alphas: Iterable[float], rule: str = "le"
) -> dict[float, int]:
    """Correct predictions per alpha under one of ``PCK_RULES`` (``le`` is ``metrics.pck``)."""
    if rule == "le":
        return pck(pred.double().numpy(), gt.double().numpy(), threshold, alphas)
    if rule not in PCK_RULES:
        raise ValueError(f"count_correct: unknown PCK rule {rule!r}; expected one of {PCK_RULES}")
    if pred.shape != gt.shape or pred.ndim != 2 or pred.shape[1] != 2 or len(gt) == 0:
        raise ValueError(f"count_correct: need equal (K, 2) shapes, K >= 1; got {pred.shape} and {gt.shape}")
    if threshold <= 0:
        raise ValueError(f"count_correct: threshold must be > 0, got {threshold}")
    if rule == "ratio_le":  # DIFT: Python floats of integer pixels
        dist = torch.linalg.vector_norm(pred.double() - gt.double(), dim=1)
        return {float(a): int((dist / threshold <= a).sum()) for a in alphas}
    dist = torch.linalg.vector_norm(pred.float() - gt.float(), dim=1).double()  # sd-dino: float32 tensors
    return {float(a): int((dist < a * threshold).sum()) for a in alphas}


def score_targets(
    row: Any,
    targets: PairTargets,
    predictions: Mapping[str, Tensor],
    alphas: Sequence[float],
    rule: str = "le",
) -> list[PairScore]:
    """PairScores of one pair's CPU predictions (one ``(K, 2)`` tensor per matching method) in its frame."""
    _, trg, threshold = targets
    scores = []
    for method, pred in predictions.items():
        correct = count_correct(pred, trg, threshold, alphas, rule)
        scores.extend(
            PairScore(
                row.pair_id, row.category, method, float(a), len(trg), correct[float(a)], float(threshold)
            )
            for a in alphas
        )
    return scores


# ---------------------------------------------------------------------------------------------------------
# Per-image features, per-pair scoring
# ---------------------------------------------------------------------------------------------------------


def row_image_keys(row: Any) -> tuple[ImageKey, ImageKey]:
    """The source and target image keys of a pairs-table row (flip per row, the pair's category)."""
    flip = bool(row.flip)
    return ImageKey(row.src_image, flip, row.category), ImageKey(row.trg_image, flip, row.category)


def evaluate_with_scorer(
    pairs: pd.DataFrame,
    features_for: FeatureFn,
    scorer: PairScorer,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Score every pair with ``scorer``: per category, the features of each distinct image are computed once
    (``features_for``) and kept on ``device``; rows come out grouped by category, as ``evaluate_pairs``."""
    scores: list[PairScore] = []
    for _, group in pairs.groupby("category", sort=False):
        rows = list(group.itertuples())
        keys = sorted({key for row in rows for key in row_image_keys(row)}, key=str)
        bank = features_for(keys)
        bank = (bank if device is None else bank.to(device)).float()
        index = {key: i for i, key in enumerate(keys)}
        for row in rows:
            src, trg = row_image_keys(row)
            scores.extend(scorer(row, bank[index[src]], bank[index[trg]]))
    return per_pair_frame(scores)
