"""How each table row's numbers were obtained: the ``protocol`` and ``pck`` cells of a row and the summary
estimator its numbers come from, for our rows (from the method's config) and the paper's rows (what is known
of how the quoted number was measured).

The evaluation protocols are those of ``sd4match.zero_shot`` (``squashed``, ``original``, ``padded``). sd-dino
reports per-keypoint PCK per category and, as "All", the mean of the categories weighted by their number of
pairs (``pck_spair_pascal.py``: ``np.average(pcks, weights=<test pairs per category>)``); that estimator is
``pck_category_weighted`` here (``category_weighted_pck``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

ALL_CATEGORY = "All"
ESTIMATORS = {
    "pck_per_image": "per image",
    "pck_per_keypoint": "per keypoint",
    "pck_category_weighted": "per keypoint; All = categories weighted by pairs",
}
SQUASHED = "squashed frame"
ORIGINAL = "original frame (DIFT's eval)"
UNSTATED = "unstated"
AS_REPORTED = "as reported"
PADDED = "padded {size}×{size} (sd-dino's eval)"

PROTOCOL_LEGEND = (
    "Protocols (`protocol` column): `squashed frame` = this pipeline's and SD4Match's code: images resized "
    "anisotropically to the S×S frame of the header, keypoints and θ rescaled there, bilinear source "
    "descriptor, error ≤ αθ; `original frame (DIFT's eval)` = DIFT's evaluation: each ensemble copy its own "
    "VAE sample, raw features upsampled to the original image, nearest neighbour over its pixels, θ from the "
    "original box / image / keypoints, error/θ ≤ α; `padded P×P (sd-dino's eval)` = sd-dino's evaluation: "
    "aspect-preserving resize and zero padding to the square (SD at its own size, DINO and the keypoints at "
    "P; the captioner's CLIP sees the padded image), shared noise seeded 42, source descriptor = the patch "
    "holding the keypoint, prediction = the matched patch's centre, θ scaled by P/max(W, H) (PF-Pascal: θ = "
    "P), error < αθ, per-keypoint PCK per category and All = their mean weighted by pairs (sd-dino has no "
    "PF-Willow evaluation: the same rules with θ from the keypoints); `unstated` = the paper does not say "
    "how the quoted number was obtained; `as reported` = the cited paper's own convention."
)


@dataclass(frozen=True)
class RowProtocol:
    """A row's protocol cell, the summary estimator of its numbers (a key of ``ESTIMATORS``) and the
    matching the protocol fixes (the peers' nearest neighbour; None: the table's matching)."""

    protocol: str
    estimator: str = "pck_per_image"
    matching: str | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"RowProtocol: estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}"
            )

    @property
    def pck(self) -> str:
        """The row's ``pck`` cell."""
        return ESTIMATORS[self.estimator]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for Snakemake params."""
        return asdict(self)

    @classmethod
    def coerce(cls, value: RowProtocol | Mapping[str, Any] | None) -> RowProtocol:
        """A RowProtocol from itself, its ``to_dict`` form, or None (our squashed protocol)."""
        if value is None:
            return OURS
        return value if isinstance(value, cls) else cls(**dict(value))


OURS = RowProtocol(SQUASHED)


def method_row_protocol(method: Mapping[str, Any]) -> RowProtocol:
    """The row protocol of a configured zero-shot method (its ``protocol`` key, ``squashed`` by default)."""
    protocol = method.get("protocol", "squashed")
    if protocol == "original":
        return RowProtocol(ORIGINAL, "pck_per_image", "nn")
    if protocol == "padded":
        size = method["dino_image_size"] if method["kind"] == "sd_dino" else method["image_size"]
        return RowProtocol(PADDED.format(size=size), "pck_category_weighted", "nn")
    if protocol != "squashed":
        raise ValueError(f"unknown zero-shot protocol {protocol!r} (squashed, original, padded)")
    return OURS


# What is known of how the SD4Match paper's numbers of the methods this pipeline computes were obtained
# (protocol.md "Zero-shot baselines", "What the authors' code does beyond the paper text"; the peers' code).
# Tables 2 and 3 (keyed by the paper table's ``method``); Table 1's rows are the authors' own prompt study.
PAPER_PROTOCOLS = {
    "DIFT": ("DIFT's eval (SPair-71k); PF: unstated", "per image"),
    "SD+DINO": (
        "sd-dino's eval, padded 840×840 (SPair-71k, PF-Pascal); PF-Willow: unstated",
        ESTIMATORS["pck_category_weighted"],
    ),  # fmt: skip
    "DINO": (UNSTATED, AS_REPORTED),
    "DINOv2": (UNSTATED, AS_REPORTED),
    "SD4Match-Single": ("squashed 768×768 (authors' code)", "per image"),
    "SD4Match-Class": ("squashed 768×768 (authors' code)", "per image"),
    "SD4Match-CPM": ("squashed 768×768 (authors' code)", "per image"),
}
TABLE1_PAPER_PROTOCOL = (UNSTATED, "per image")


def paper_protocol(method: str, table: str = "table2") -> tuple[str, str]:
    """(protocol, pck) cells of the paper's row of ``method`` (a paper-table ``method`` key) in ``table``
    (``table1``, ``table2`` or ``table3``)."""
    if table == "table1":
        return TABLE1_PAPER_PROTOCOL
    return PAPER_PROTOCOLS.get(method, (UNSTATED, AS_REPORTED))


def category_weighted_pck(summary: pd.DataFrame, matching: str, alpha: float, where: str) -> float:
    """sd-dino's "All": the per-keypoint PCK of each category, averaged with the categories' pair counts as
    weights (NaN-free summary rows of ``metrics.summarise``)."""
    rows = summary[
        (summary["category"] != ALL_CATEGORY)
        & (summary["method"] == matching)
        & np.isclose(summary["alpha"].astype(float), alpha)
    ]
    if rows.empty:
        raise ValueError(f"summary {where}: no category rows for method={matching!r}, alpha={alpha:g}")
    weights = rows["n_pairs"].astype(float)
    value = float((weights * rows["pck_per_keypoint"].astype(float)).sum() / weights.sum())
    if math.isnan(value):
        raise ValueError(f"summary {where}: per-keypoint PCK is NaN for method={matching!r}, alpha={alpha:g}")
    return value
