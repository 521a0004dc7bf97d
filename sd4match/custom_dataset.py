"""Your own keypoint dataset as a benchmark: a folder of images plus one pairs file (CSV or JSON).

Layout (README "Benchmark on your own data", docs/ARCHITECTURE.md)::

    <folder>/                     datasets.<name>.local_path in config.yaml
      <any sub-folders>/<images>  any format PIL reads
      pairs.csv                   or pairs.json (datasets.<name>.pairs)

``pairs.csv`` has a header; columns by name (unknown names are an error, so a typo cannot pass unnoticed):
``source, target`` (image paths relative to the folder), ``source_kps, target_kps`` (``x1,y1;x2,y2;...`` in
pixels of the original images, the same count on both sides; ``nan,nan`` marks a keypoint not visible in
that image), optional ``source_bbox, target_bbox`` (``x1,y1,x2,y2``, empty for none), ``category`` (default
``object``) and ``pair_id`` (default: the row number from 0, header excluded). ``pairs.json`` is a list of
objects with the same keys (keypoints ``[[x, y], ...]`` with ``null`` for a point not visible, boxes
``[x1, y1, x2, y2]``), or ``{"pairs": [...]}``.

It becomes the same normalised pairs table as the official benchmarks (split ``test``), parsed as
strictly: a malformed file, row or value is an error naming the file, row and key; a pair that cannot be
scored (a keypoint more than 1 px outside its image, an empty target bbox or keypoint extent where it sets
the PCK threshold, no keypoint visible in both images) is skipped and counted in the pairs report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from sd4match.annotation_checks import PairsReport, screen_rows
from sd4match.datasets import (
    CUSTOM_NAME_PATTERN,
    DATASETS,
    PAIRS_COLUMNS,
    THRESHOLD_KIND_NAMES,
    ImageSizes,
    mutually_visible,
    validate_pairs_table,
)

PathLike = str | os.PathLike[str]

CUSTOM_KIND = "custom"
CUSTOM_SPLIT = "test"
DEFAULT_PAIRS_FILE = "pairs.csv"
DEFAULT_CATEGORY = "object"
RESERVED_CATEGORIES = ("All",)  # the summaries' row over every category
REQUIRED_KEYS: tuple[str, ...] = ("source", "target", "source_kps", "target_kps")
OPTIONAL_KEYS: tuple[str, ...] = ("source_bbox", "target_bbox", "category", "pair_id")
PAIRS_SUFFIXES = (".csv", ".json")
# Zero-shot methods evaluated on a custom dataset unless its ``zero_shot`` key lists others: the zero-shot
# rows of the paper's Tables 2 and 3, each in this pipeline's squashed frame with the dataset's own threshold
# (the peers' own protocols, dift_orig and sddino, are defined for the official datasets' thresholds).
DEFAULT_ZERO_SHOT: tuple[str, ...] = ("dino", "dinov2", "dift", "sddino_squashed")


@dataclass(frozen=True)
class CustomDatasetSpec:
    """A custom dataset of the config (``datasets.<name>: {kind: custom, ...}``): its name, the PCK threshold
    kind (``bbox``: max side of the target bbox, ``img``: the image size S, ``kps``: the target keypoints'
    extent) and the pairs file inside its folder."""

    name: str
    threshold: str
    pairs_file: str = DEFAULT_PAIRS_FILE

    def __post_init__(self) -> None:
        if not CUSTOM_NAME_PATTERN.fullmatch(self.name) or self.name in DATASETS:
            raise ValueError(
                f"custom dataset name {self.name!r} must match {CUSTOM_NAME_PATTERN.pattern} and differ from "
                f"the official benchmarks {list(DATASETS)}"
            )
        if self.threshold not in THRESHOLD_KIND_NAMES:
            raise ValueError(
                f"custom dataset {self.name!r}: threshold must be one of {list(THRESHOLD_KIND_NAMES)}, "
                f"got {self.threshold!r}"
            )
        if (
            Path(self.pairs_file).name != self.pairs_file
            or Path(self.pairs_file).suffix not in PAIRS_SUFFIXES
        ):
            raise ValueError(
                f"custom dataset {self.name!r}: pairs must be a file name in its folder ending with "
                f"{' or '.join(PAIRS_SUFFIXES)}, got {self.pairs_file!r}"
            )

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> CustomDatasetSpec:
        """The spec of ``datasets.<name>`` (``kind: custom``, ``threshold``, optional ``pairs``)."""
        if not is_custom(cfg):
            raise ValueError(f"config key 'datasets.{name}' is not a custom dataset (kind: {CUSTOM_KIND})")
        return cls(name, cfg["threshold"], cfg.get("pairs") or DEFAULT_PAIRS_FILE)


def is_custom(cfg: Mapping[str, Any]) -> bool:
    """True for a ``datasets.<name>`` entry of kind ``custom``."""
    return isinstance(cfg, Mapping) and cfg.get("kind") == CUSTOM_KIND


def custom_dataset_names(config: Mapping[str, Any]) -> list[str]:
    """Names of the custom datasets of a config, in config order."""
    return [name for name, cfg in config["datasets"].items() if is_custom(cfg)]


def custom_zero_shot(cfg: Mapping[str, Any]) -> list[str]:
    """The zero-shot methods evaluated on a custom dataset: its ``zero_shot`` list, else the default."""
    methods = cfg.get("zero_shot")
    return list(DEFAULT_ZERO_SHOT if methods is None else methods)


# --------------------------------------------------------------------------------------------- values


def _where(source: PathLike, row: int, key: str) -> str:
    return f"{source}: row {row}: key {key!r}"


def _number(text: Any, where: str) -> float:
    """One coordinate (a JSON number or a CSV cell); NaN allowed (a keypoint not visible)."""
    if isinstance(text, bool):
        raise ValueError(f"{where}: not a number: {text!r}")
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(str(text).strip())
    except ValueError as exc:
        raise ValueError(f"{where}: not a number: {text!r}") from exc


def parse_points_text(text: str, where: str, allow_missing: bool = False) -> list[list[float]]:
    """Points written ``"x1,y1;x2,y2;..."`` (the ``--points`` syntax of ``sd4match match`` and the CSV cells)
    as ``[[x, y], ...]``; ``nan,nan`` is allowed only when ``allow_missing`` (a point not visible)."""
    if not str(text).strip():
        raise ValueError(f"{where}: no points (write x1,y1;x2,y2;...)")
    points = []
    for i, item in enumerate(str(text).strip().rstrip(";").split(";")):
        cells = item.split(",")
        if len(cells) != 2:
            raise ValueError(f"{where}: point {i} {item.strip()!r} is not 'x,y'")
        points.append([_number(cells[0], f"{where}: point {i}"), _number(cells[1], f"{where}: point {i}")])
    return _checked_points(points, where, allow_missing)


def _checked_points(points: list[list[float]], where: str, allow_missing: bool) -> list[list[float]]:
    """Reject infinities, and NaN unless ``allow_missing`` (then both coordinates of a point are NaN)."""
    for i, (x, y) in enumerate(points):
        if math.isinf(x) or math.isinf(y):
            raise ValueError(f"{where}: point {i} ({x}, {y}) is infinite")
        if math.isnan(x) != math.isnan(y) or (math.isnan(x) and not allow_missing):
            raise ValueError(f"{where}: point {i} ({x}, {y}) is not a point (nan marks a missing point only)")
    return points


def _json_points(value: Any, where: str) -> list[list[float]]:
    """``[[x, y], ...]`` with ``null`` for a point not visible, as floats (NaN for null)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: must be a non-empty list of [x, y] points, got {value!r}")
    points = []
    for i, point in enumerate(value):
        if point is None:
            points.append([math.nan, math.nan])
            continue
        if not isinstance(point, list) or len(point) != 2 or any(v is None for v in point):
            raise ValueError(f"{where}: point {i} must be [x, y] or null, got {point!r}")
        points.append([_number(point[0], f"{where}: point {i}"), _number(point[1], f"{where}: point {i}")])
    return _checked_points(points, where, allow_missing=True)


def _bbox(value: Any, where: str) -> list[float] | None:
    """A box ``x1,y1,x2,y2`` (CSV) or ``[x1, y1, x2, y2]`` (JSON); empty / null is no box."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) != 4:
        raise ValueError(f"{where}: must be x1,y1,x2,y2 (four numbers), got {value!r}")
    box = [_number(item, where) for item in items]
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: must hold four finite numbers, got {value!r}")
    return box


def _image_path(value: Any, where: str) -> str:
    """An image path relative to the dataset folder (``/`` or ``\\`` separated), never leaving it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: must be an image path relative to the dataset folder, got {value!r}")
    parts = [part for part in re.split(r"[\\/]+", value.strip()) if part]
    text = value.strip()
    if text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text) or ".." in parts or not parts:
        raise ValueError(f"{where}: {value!r} must be a path inside the dataset folder (relative, no '..')")
    return str(PurePosixPath(*parts))


def _category(value: Any, where: str) -> str:
    """The pair's category: a non-empty name (default ``object``), not a name the summaries reserve."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_CATEGORY
    if not isinstance(value, str):
        raise ValueError(f"{where}: must be a category name, got {value!r}")
    if value.strip() in RESERVED_CATEGORIES:
        raise ValueError(f"{where}: {value!r} is reserved (the summaries' row over every category)")
    return value.strip()


# ---------------------------------------------------------------------------------------------- files


def _check_keys(keys: list[str], source: PathLike, where: str) -> None:
    """Every required key present, nothing unknown (a typo would silently drop a column)."""
    unknown = [key for key in keys if key not in REQUIRED_KEYS + OPTIONAL_KEYS]
    missing = [key for key in REQUIRED_KEYS if key not in keys]
    if unknown or missing:
        raise ValueError(
            f"{source}: {where}: unknown keys {unknown}, missing keys {missing}; the keys are "
            f"{list(REQUIRED_KEYS)} and optionally {list(OPTIONAL_KEYS)}"
        )


def read_pairs_csv(path: Path) -> list[dict[str, Any]]:
    """The data rows of a custom ``pairs.csv`` (header by name) as {key: cell}, in file order."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: empty pairs file (expected a header and one row per pair)")
    header = [cell.strip() for cell in rows[0]]
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: header repeats a column: {header}")
    _check_keys(header, path, "header")
    records = []
    for i, cells in enumerate(rows[1:]):
        if len(cells) != len(header):
            raise ValueError(f"{path}: row {i} has {len(cells)} cells, the header {len(header)}")
        records.append({key: cell.strip() for key, cell in zip(header, cells, strict=True)})
    return records


def read_pairs_json(path: Path) -> list[dict[str, Any]]:
    """The pairs of a custom ``pairs.json`` (a list of objects, or ``{"pairs": [...]}``), in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"pairs"}:
        data = data["pairs"]
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a list of pair objects (or {{"pairs": [...]}})')
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: row {i}: expected an object, got {type(record).__name__}")
        _check_keys(list(record), path, f"row {i}")
    return data


def _row(
    root: Path, spec: CustomDatasetSpec, record: dict[str, Any], i: int, source: Path, sizes: ImageSizes
) -> dict[str, Any]:
    """One pairs-table row of a custom pair: mutually visible keypoints, sizes read from the images."""
    json_file = source.suffix == ".json"
    images, image_sizes = [], []
    for key in ("source", "target"):
        image = _image_path(record.get(key), _where(source, i, key))
        try:
            image_sizes.append(sizes(image, f"{source} row {i} key {key!r}"))
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"{_where(source, i, key)}: {exc}") from exc
        images.append(image)
    kps = []
    for key in ("source_kps", "target_kps"):
        where = _where(source, i, key)
        value = record[key]
        kps.append(_json_points(value, where) if json_file else parse_points_text(value, where, True))
    if len(kps[0]) != len(kps[1]):
        raise ValueError(
            f"{_where(source, i, 'target_kps')}: {len(kps[1])} points, but source_kps has {len(kps[0])} "
            "(list every keypoint on both sides; nan marks one not visible)"
        )
    keep = mutually_visible(kps[0], kps[1])
    bboxes = [_bbox(record.get(key), _where(source, i, key)) for key in ("source_bbox", "target_bbox")]
    if spec.threshold == "bbox" and bboxes[1] is None:
        raise ValueError(
            f"{_where(source, i, 'target_bbox')}: missing; dataset {spec.name!r} has threshold 'bbox' "
            "(the max side of the target bbox), so every pair needs one"
        )
    return {
        "pair_id": str(record["pair_id"]).strip() if record.get("pair_id") not in (None, "") else str(i),
        "dataset": spec.name,
        "split": CUSTOM_SPLIT,
        "category": _category(record.get("category"), _where(source, i, "category")),
        "src_image": images[0],
        "trg_image": images[1],
        "src_width": image_sizes[0][0],
        "src_height": image_sizes[0][1],
        "trg_width": image_sizes[1][0],
        "trg_height": image_sizes[1][1],
        "src_kps": [kps[0][k] for k in keep],
        "trg_kps": [kps[1][k] for k in keep],
        "src_bbox": bboxes[0],
        "trg_bbox": bboxes[1],
        "flip": False,
        "n_kps": len(keep),
        "threshold_kind": spec.threshold,
        "_file": f"{source} row {i}",
    }


def _check_pair_ids(rows: list[dict[str, Any]], source: Path) -> None:
    """Pair ids are unique (the per-pair results and the bootstrap match pairs by them)."""
    first: dict[str, str] = {}
    for row in rows:
        if row["pair_id"] in first:
            raise ValueError(
                f"{row['_file']}: key 'pair_id': {row['pair_id']!r} repeats {first[row['pair_id']]}"
            )
        first[row["pair_id"]] = row["_file"]


def _scorable(rows: list[dict[str, Any]], threshold: str, report: PairsReport) -> list[dict[str, Any]]:
    """Rows with a keypoint visible in both images, and (threshold ``kps``) a non-zero keypoint extent."""
    kept = []
    for row in rows:
        if row["n_kps"] == 0:
            report.skip(row["pair_id"], row["_file"], "source_kps", "no keypoint visible in both images")
        elif threshold == "kps" and _extent(row["trg_kps"]) == 0:
            report.skip(row["pair_id"], row["_file"], "target_kps", "zero target keypoint extent (theta = 0)")
        else:
            kept.append(row)
    return kept


def _extent(points: list[list[float]]) -> float:
    """Max extent (x or y range) of points: PF-Willow's PCK threshold."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return max(max(xs) - min(xs), max(ys) - min(ys))


def parse_custom(
    root: PathLike,
    spec: CustomDatasetSpec,
    pairs_file: PathLike | None = None,
    report: PairsReport | None = None,
) -> pd.DataFrame:
    """The normalised pairs table (split ``test``) of a custom dataset folder, in file order; skipped pairs
    are recorded in ``report``."""
    root = Path(root)
    source = Path(pairs_file) if pairs_file is not None else root / spec.pairs_file
    if not source.is_file():
        raise FileNotFoundError(f"custom dataset {spec.name!r}: pairs file {source} not found")
    report = report if report is not None else PairsReport(spec.name, CUSTOM_SPLIT, str(source))
    report.keypoint_source = f"custom pairs file {source.name}"
    records = read_pairs_json(source) if source.suffix == ".json" else read_pairs_csv(source)
    sizes = ImageSizes(root)
    rows = [_row(root, spec, record, i, source, sizes) for i, record in enumerate(records)]
    if not rows:
        raise ValueError(f"{source}: no pairs")
    _check_pair_ids(rows, source)
    report.listed = len(rows)
    kept = screen_rows(_scorable(rows, spec.threshold, report), report)
    if not kept:
        raise ValueError(f"{source}: every pair was skipped ({len(report.skipped)}); see the pairs report")
    table = pd.DataFrame(kept, columns=list(PAIRS_COLUMNS))
    validate_pairs_table(table, source)
    return table
