"""Annotation sanity of the benchmarks, checked against the real image sizes, and the record of what was kept.

Two kinds of problem (docs/ARCHITECTURE.md, "Annotation sanity"):

- a whole file that contradicts its image (an SPair ``imsize`` that is not the JPEG's size, an unreadable
  image) means the dataset copy is broken: parsing stops with an error naming the file, pair and key;
- one pair's annotation that cannot be scored (a keypoint outside its image, an inverted or zero-area
  target bbox that sets the PCK threshold) is a counted, logged skip: the pair leaves the table, the
  skip is recorded in the split's ``<pairs>.report.json`` and the tables say "12,232 of 12,234 pairs".

The report also carries the PF-Pascal cross-check of the ``.mat`` keypoints against the test CSV's inline
keypoints (pairs where they disagree are logged and counted; the ``.mat`` values are used, as the authors do).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd4match.io import write_json_atomic

log = logging.getLogger("sd4match.datasets")

PathLike = str | os.PathLike[str]

# Keypoints may sit on the image border (1-based or pixel-edge conventions give x = W); more than this
# many pixels outside the image is an annotation error.
KEYPOINT_MARGIN = 1.0
# The PF-Pascal test CSV repeats the .mat keypoints; values further apart than this (px) disagree.
INLINE_TOLERANCE = 1e-3
REPORT_VERSION = 1
DATASET_TITLES = {"spair": "SPair-71k", "pfpascal": "PF-Pascal", "pfwillow": "PF-Willow"}


@dataclass(frozen=True)
class SkippedPair:
    """A pair left out of the table: which, the file that holds its annotation, the key and why."""

    pair_id: str
    file: str
    key: str
    reason: str


@dataclass(frozen=True)
class KeypointDisagreement:
    """A PF-Pascal test pair whose CSV inline keypoints differ from its ``.mat`` annotations."""

    pair_id: str
    file: str
    detail: str


@dataclass
class PairsReport:
    """What parsing one dataset split kept: listed and kept pair counts, skips, keypoint cross-checks."""

    dataset: str
    split: str
    source: str
    listed: int = 0
    keypoint_source: str = ""
    skipped: list[SkippedPair] = field(default_factory=list)
    disagreements: list[KeypointDisagreement] = field(default_factory=list)

    @property
    def kept(self) -> int:
        """Pairs in the table."""
        return self.listed - len(self.skipped)

    def skip(self, pair_id: str, file: PathLike, key: str, reason: str) -> None:
        """Record and log one skipped pair."""
        self.skipped.append(SkippedPair(pair_id, str(file), key, reason))
        log.warning(
            "%s %s: skipping pair %r (%s, key %s): %s", self.dataset, self.split, pair_id, file, key, reason
        )

    def disagree(self, pair_id: str, file: PathLike, detail: str) -> None:
        """Record and log one PF-Pascal pair whose inline keypoints disagree with its .mat files."""
        self.disagreements.append(KeypointDisagreement(pair_id, str(file), detail))
        log.warning(
            "%s %s: pair %r (%s): %s; using the .mat keypoints",
            self.dataset,
            self.split,
            pair_id,
            file,
            detail,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the ``.report.json`` beside the pairs parquet)."""
        return {
            "version": REPORT_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "source": self.source,
            "pairs_listed": self.listed,
            "pairs_kept": self.kept,
            "pairs_skipped": len(self.skipped),
            "skip_reasons": dict(Counter(s.reason.split(":")[0] for s in self.skipped)),
            "skipped": [asdict(s) for s in self.skipped],
            "keypoint_source": self.keypoint_source,
            "inline_keypoint_disagreements": len(self.disagreements),
            "disagreements": [asdict(d) for d in self.disagreements],
            "checks": (
                f"keypoints within {KEYPOINT_MARGIN:g} px of their image; a bbox that sets the PCK threshold "
                "is non-empty; SPair imsize equals the JPEG size (else an error)"
            ),
        }


# ---------------------------------------------------------------------------------------------- checks


def keypoint_problem(points: Sequence[Sequence[float]], width: int, height: int) -> tuple[int, str] | None:
    """(index, reason) of the first keypoint outside ``[0, W] x [0, H]`` by more than the margin, or None."""
    for i, (x, y) in enumerate(points):
        if not (
            -KEYPOINT_MARGIN <= x <= width + KEYPOINT_MARGIN
            and -KEYPOINT_MARGIN <= y <= height + KEYPOINT_MARGIN
        ):
            return i, f"keypoint outside its image: ({x:g}, {y:g}) in a {width} x {height} image"
    return None


def bbox_problem(bbox: Sequence[float] | None) -> str | None:
    """Why a threshold bbox ``[x1, y1, x2, y2]`` cannot set a threshold (inverted or zero area), or None."""
    if bbox is None:
        return "missing target bbox"
    x1, y1, x2, y2 = bbox
    if x2 < x1 or y2 < y1:
        return f"inverted target bbox: {list(bbox)}"
    if x2 == x1 or y2 == y1:
        return f"zero-area target bbox: {list(bbox)}"
    return None


def screen_rows(rows: Iterable[dict[str, Any]], report: PairsReport) -> list[dict[str, Any]]:
    """The rows whose annotation can be scored; the others are recorded in ``report`` as skips.

    Each row carries ``_file`` (where its annotation lives) for the record; sizes are the images' own.
    """
    kept = []
    for row in rows:
        problem = _row_problem(row)
        if problem is None:
            kept.append(row)
        else:
            report.skip(row["pair_id"], row["_file"], *problem)
    return kept


def _row_problem(row: dict[str, Any]) -> tuple[str, str] | None:
    """(key, reason) of the first problem of one pairs-table row."""
    for side in ("src", "trg"):
        found = keypoint_problem(row[f"{side}_kps"], row[f"{side}_width"], row[f"{side}_height"])
        if found is not None:
            return f"{side}_kps[{found[0]}]", found[1]
    if row["threshold_kind"] == "bbox":
        reason = bbox_problem(row["trg_bbox"])
        if reason is not None:
            return "trg_bbox", reason
    return None


def inline_disagreement(
    inline: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]],
    mats: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]],
) -> str | None:
    """How the CSV's mutually visible keypoints differ from the ``.mat`` files' (None when they agree)."""
    if len(inline[0]) != len(mats[0]):
        return f"the CSV lists {len(inline[0])} mutually visible keypoints, the .mat files {len(mats[0])}"
    worst, where = 0.0, ""
    for side, name in ((0, "source"), (1, "target")):
        for i, (a, b) in enumerate(zip(inline[side], mats[side], strict=True)):
            gap = math.hypot(a[0] - b[0], a[1] - b[1])
            if gap > worst:
                worst, where = (
                    gap,
                    f"{name} keypoint {i}: CSV ({a[0]:g}, {a[1]:g}), .mat ({b[0]:g}, {b[1]:g})",
                )
    if worst > INLINE_TOLERANCE:
        return f"CSV and .mat keypoints differ by up to {worst:.3g} px ({where})"
    return None


# ----------------------------------------------------------------------------------------------- files


def report_path(pairs_path: PathLike) -> Path:
    """The report written beside a pairs parquet: ``<dataset>_<split>.report.json``."""
    path = Path(pairs_path)
    return path.with_name(path.name.removesuffix(".parquet") + ".report.json")


def write_pairs_report(report: PairsReport, path: PathLike) -> None:
    """Write the report atomically."""
    write_json_atomic(path, report.to_dict())


def read_pairs_report(path: PathLike) -> dict[str, Any]:
    """Read a report written by :func:`write_pairs_report`; problems raise naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"pairs report {path} is unreadable: {exc}") from exc
    missing = [k for k in ("dataset", "split", "pairs_listed", "pairs_kept") if k not in data]
    if missing:
        raise ValueError(f"pairs report {path} lacks {missing}")
    return data


def pairs_note(report_paths: Iterable[PathLike]) -> str:
    """One line for a table caption: pairs evaluated per test set, with what was skipped and why.

    e.g. "Pairs: SPair-71k test 12,232 of 12,234 (2 skipped: 1 keypoint outside its image, 1 zero-area
    target bbox); PF-Willow test 900 of 900."
    """
    parts = []
    for path in report_paths:
        data = read_pairs_report(path)
        text = (
            f"{DATASET_TITLES.get(data['dataset'], data['dataset'])} {data['split']} "
            f"{data['pairs_kept']:,} of {data['pairs_listed']:,}"
        )
        reasons = data.get("skip_reasons") or {}
        if reasons:
            listed = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
            text += f" ({data['pairs_listed'] - data['pairs_kept']} skipped: {listed})"
        if data.get("inline_keypoint_disagreements"):
            text += (
                f"; {data['inline_keypoint_disagreements']} pairs' CSV keypoints disagree with the .mat files"
            )
        parts.append(text)
    return "Pairs: " + "; ".join(parts) + "." if parts else ""
