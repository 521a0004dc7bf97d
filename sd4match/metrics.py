"""PCK (percentage of correct keypoints, paper Eq. 8) in the squashed ``S x S`` frame, its per-dataset
thresholds and the per-pair / per-category aggregation ("per image" as in the paper, and per keypoint)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

THRESHOLD_KINDS: tuple[str, ...] = ("bbox", "img", "kps")
DEFAULT_ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.15)
ALL_CATEGORY = "All"
PER_PAIR_COLUMNS: tuple[str, ...] = (
    "pair_id",
    "category",
    "method",
    "alpha",
    "n_kps",
    "n_correct",
    "threshold",
    "pck",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "category",
    "method",
    "alpha",
    "n_pairs",
    "n_kps",
    "pck_per_image",
    "pck_per_keypoint",
)
_GROUP_KEYS = ["category", "method", "alpha"]


def _points(values: object, name: str) -> np.ndarray:
    """Return ``values`` as a float64 ``(K, 2)`` array, raising a ValueError naming ``name`` otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected shape (K, 2), got {arr.shape}")
    return arr


def pck_threshold(
    kind: str,
    *,
    trg_bbox: Sequence[float] | np.ndarray | None = None,
    trg_kps: Sequence[Sequence[float]] | np.ndarray | None = None,
    image_size: int | None = None,
) -> float:
    """PCK threshold theta in the squashed frame: ``bbox`` max(w, h) of the squashed target box (SPair),
    ``img`` the image size S (PF-Pascal), ``kps`` max extent of the squashed target keypoints (PF-Willow)."""
    if kind == "bbox":
        if trg_bbox is None:
            raise ValueError("pck_threshold: kind 'bbox' needs trg_bbox")
        box = np.asarray(trg_bbox, dtype=np.float64)
        if box.shape != (4,):
            raise ValueError(f"pck_threshold: trg_bbox must be [x1, y1, x2, y2], got shape {box.shape}")
        return float(max(box[2] - box[0], box[3] - box[1]))
    if kind == "img":
        if image_size is None:
            raise ValueError("pck_threshold: kind 'img' needs image_size")
        return float(image_size)
    if kind == "kps":
        if trg_kps is None:
            raise ValueError("pck_threshold: kind 'kps' needs trg_kps")
        kps = _points(trg_kps, "pck_threshold trg_kps")
        if len(kps) == 0:
            raise ValueError("pck_threshold: kind 'kps' needs at least one target keypoint")
        return float(np.ptp(kps, axis=0).max())
    raise ValueError(f"pck_threshold: unknown threshold kind {kind!r}; expected one of {THRESHOLD_KINDS}")


def pck(
    pred: np.ndarray | Sequence[Sequence[float]],
    gt: np.ndarray | Sequence[Sequence[float]],
    threshold: float,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
) -> dict[float, int]:
    """Number of correct predictions per alpha: ``||pred - gt|| <= alpha * threshold`` (inclusive, Eq. 8)."""
    pred_arr, gt_arr = _points(pred, "pck pred"), _points(gt, "pck gt")
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(f"pck: pred {pred_arr.shape} and gt {gt_arr.shape} differ in shape")
    if len(gt_arr) == 0:
        raise ValueError("pck: a pair without keypoints has no PCK")
    if threshold <= 0:
        raise ValueError(f"pck: threshold must be > 0, got {threshold}")
    dist = np.linalg.norm(pred_arr - gt_arr, axis=1)
    return {float(a): int((dist <= a * threshold).sum()) for a in alphas}


def pck_fraction(
    pred: np.ndarray | Sequence[Sequence[float]],
    gt: np.ndarray | Sequence[Sequence[float]],
    threshold: float,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
) -> dict[float, float]:
    """Fraction of correct predictions per alpha (``pck`` divided by the number of keypoints)."""
    n_kps = len(np.asarray(gt))
    return {a: n / n_kps for a, n in pck(pred, gt, threshold, alphas).items()}


@dataclass(frozen=True)
class PairScore:
    """PCK counts of one image pair for one matching method and one alpha."""

    pair_id: str
    category: str
    method: str
    alpha: float
    n_kps: int
    n_correct: int
    threshold: float

    def __post_init__(self) -> None:
        if self.n_kps <= 0 or not 0 <= self.n_correct <= self.n_kps:
            raise ValueError(
                f"PairScore {self.pair_id!r}: need 0 <= n_correct <= n_kps and n_kps > 0, "
                f"got n_correct={self.n_correct}, n_kps={self.n_kps}"
            )

    @property
    def pck(self) -> float:
        """PCK of this pair in percent."""
        return 100.0 * self.n_correct / self.n_kps


def pair_scores(
    pair_id: str,
    category: str,
    method: str,
    pred: np.ndarray | Sequence[Sequence[float]],
    gt: np.ndarray | Sequence[Sequence[float]],
    threshold: float,
    alphas: Iterable[float] = DEFAULT_ALPHAS,
) -> list[PairScore]:
    """Score one pair's predictions at every alpha -> one ``PairScore`` per alpha."""
    counts = pck(pred, gt, threshold, alphas)
    n_kps = len(np.asarray(gt))
    return [PairScore(pair_id, category, method, a, n_kps, n, float(threshold)) for a, n in counts.items()]


def per_pair_frame(scores: Iterable[PairScore]) -> pd.DataFrame:
    """Long-format table of pair scores with columns ``PER_PAIR_COLUMNS`` (pck in percent)."""
    rows = [{**asdict(s), "pck": s.pck} for s in scores]
    return pd.DataFrame(rows, columns=list(PER_PAIR_COLUMNS))


def _check_per_pair(per_pair: pd.DataFrame) -> None:
    """Reject per-pair tables with missing columns, a reserved category name or duplicated rows."""
    missing = [
        c for c in ("pair_id", "category", "method", "alpha", "n_kps", "n_correct") if c not in per_pair
    ]
    if missing:
        raise ValueError(f"summarise: per-pair table lacks columns {missing}")
    if per_pair.empty:
        raise ValueError("summarise: per-pair table has no rows")
    if (per_pair["category"] == ALL_CATEGORY).any():
        raise ValueError(f"summarise: category name {ALL_CATEGORY!r} is reserved for the overall row")
    dup = per_pair.duplicated(subset=["pair_id", "category", "method", "alpha"])
    if dup.any():
        first = per_pair.loc[dup, ["pair_id", "method", "alpha"]].iloc[0].tolist()
        raise ValueError(f"summarise: duplicated per-pair rows, first (pair_id, method, alpha) = {first}")


def _aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (category, method, alpha): pair/keypoint counts, mean per-pair PCK and pooled per-keypoint PCK."""
    frame = frame.assign(_pck=100.0 * frame["n_correct"] / frame["n_kps"])
    grouped = frame.groupby(_GROUP_KEYS, sort=False)
    out = grouped.agg(
        n_pairs=("pair_id", "size"),
        n_kps=("n_kps", "sum"),
        n_correct=("n_correct", "sum"),
        pck_per_image=("_pck", "mean"),
    ).reset_index()
    out["pck_per_keypoint"] = 100.0 * out["n_correct"] / out["n_kps"]
    return out.drop(columns="n_correct")


def summarise(per_pair: pd.DataFrame) -> pd.DataFrame:
    """One row per (category, method, alpha) plus an ``All`` row per (method, alpha) over all pairs.

    ``pck_per_image`` is the mean of per-pair PCK (the paper's protocol; ``All`` averages pairs, not
    categories); ``pck_per_keypoint`` is sum(n_correct) / sum(n_kps). Both in percent.
    """
    _check_per_pair(per_pair)
    per_category = _aggregate(per_pair)
    overall = _aggregate(per_pair.assign(category=ALL_CATEGORY))
    out = pd.concat([per_category, overall], ignore_index=True)
    out["_is_all"] = out["category"] == ALL_CATEGORY
    out = out.sort_values(["_is_all", "category", "method", "alpha"], kind="stable").drop(columns="_is_all")
    out = out.astype({"n_pairs": "int64", "n_kps": "int64"})
    return out.reset_index(drop=True)[list(SUMMARY_COLUMNS)]
