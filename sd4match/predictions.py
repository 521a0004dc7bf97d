"""Per-keypoint predictions of an evaluation, in the original image frames (``predictions.parquet``).

Every evaluation writes, beside ``per_pair.csv``, one row per (pair, matching method, keypoint): the source
keypoint and the ground-truth target keypoint as the pairs table holds them, and the predicted target point
mapped back from the squashed ``S x S`` frame to the original target frame by :func:`from_squashed_frame`
(``x * W / S``, ``y * H / S``, float64). ``sd4match match`` returns the same numbers for the same pair. A
peer's own protocol records its points already in the original frame (``PredictionLog.add_original``):
DIFT's are original-frame pixels, sd-dino's padded-square points are mapped back by ``PadGeometry``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sd4match.io import write_table_atomic

PREDICTION_COLUMNS: tuple[str, ...] = (
    "pair_id",
    "category",
    "method",
    "kp",
    "src_x",
    "src_y",
    "pred_x",
    "pred_y",
    "trg_x",
    "trg_y",
)


def from_squashed_frame(points: Any, width: float, height: float, image_size: int) -> np.ndarray:
    """``(..., 2)`` points of the squashed ``S x S`` frame in the original ``W x H`` frame: ``x * W / S``,
    ``y * H / S`` in float64 (the inverse of ``matching.to_squashed_frame``, whose clamp it cannot undo)."""
    if width <= 0 or height <= 0 or image_size <= 0:
        raise ValueError(
            f"from_squashed_frame: sizes must be positive, got width={width}, height={height}, "
            f"image_size={image_size}"
        )
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != 2:
        raise ValueError(f"from_squashed_frame: expected shape (..., 2), got {arr.shape}")
    return arr * np.array([width / image_size, height / image_size], dtype=np.float64)


def _float64(points: Any) -> np.ndarray:
    """``(K, 2)`` points as a float64 array (tensors leave their device)."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


class PredictionLog:
    """Collects the predictions of an evaluation batch by batch (``add``) and gives them as one frame in the
    pairs table's order (``frame``), whatever order the evaluation visited the pairs in."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._parts: list[tuple[int, dict[str, np.ndarray]]] = []

    def add(self, rows: Sequence[Any], predictions: Sequence[dict[str, torch.Tensor]]) -> None:
        """Record the (K, 2) S-frame predictions of each pairs-table row (``itertuples`` rows), per method."""
        for row, per_method in zip(rows, predictions, strict=True):
            self._check(row, per_method)
            self._record(
                row,
                {
                    method: from_squashed_frame(pred, row.trg_width, row.trg_height, self.image_size)
                    for method, pred in per_method.items()
                },
            )

    def add_original(self, row: Any, per_method: dict[str, Any]) -> None:
        """Record one row's (K, 2) predictions already in the original target frame, per method: a peer's own
        protocol (``peer_protocols``) predicts in its frame and maps the points back itself."""
        self._check(row, per_method)
        self._record(row, {method: _float64(pred) for method, pred in per_method.items()})

    @staticmethod
    def _check(row: Any, per_method: dict[str, Any]) -> None:
        k = len(np.asarray(row.src_kps, dtype=np.float64).reshape(-1, 2))
        for method, pred in per_method.items():
            if len(pred) != k:
                raise ValueError(f"pair {row.pair_id!r}: {len(pred)} {method} predictions for {k} keypoints")

    def _record(self, row: Any, per_method: dict[str, np.ndarray]) -> None:
        """One row's original-frame (K, 2) float64 predictions, per method, with its keypoints."""
        src = np.asarray(row.src_kps, dtype=np.float64).reshape(-1, 2)
        trg = np.asarray(row.trg_kps, dtype=np.float64).reshape(-1, 2)
        k = len(src)
        for method, orig in per_method.items():
            columns = {
                "pair_id": np.full(k, str(row.pair_id), dtype=object),
                "category": np.full(k, row.category, dtype=object),
                "method": np.full(k, method, dtype=object),
                "kp": np.arange(k, dtype=np.int64),
                "src_x": src[:, 0],
                "src_y": src[:, 1],
                "pred_x": orig[:, 0],
                "pred_y": orig[:, 1],
                "trg_x": trg[:, 0],
                "trg_y": trg[:, 1],
            }
            self._parts.append((int(row.Index), columns))

    def frame(self) -> pd.DataFrame:
        """All predictions: pairs in table order, then methods in their computed order, then keypoints."""
        ordered = [columns for _, columns in sorted(self._parts, key=lambda part: part[0])]  # stable sort
        return pd.DataFrame(
            {
                name: np.concatenate([part[name] for part in ordered]) if ordered else np.array([])
                for name in PREDICTION_COLUMNS
            }
        )

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the predictions as parquet, atomically."""
        write_table_atomic(self.frame(), path)


def read_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a ``predictions.parquet``; a missing file or column is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    frame = pd.read_parquet(path)
    missing = [column for column in PREDICTION_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"predictions file {path}: missing columns {missing}")
    return frame
