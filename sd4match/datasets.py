"""Parsers of the official SPair-71k / PF-Pascal / PF-Willow layouts into one normalised pairs table.

The table contract (columns, types, coordinate frame) is in docs/ARCHITECTURE.md: one row per image pair,
keypoints in the original frame of the image as it is fed (flipped already where ``flip`` is true).

The PF lists are read as every peer reads them: by column position (never by header name) and with image
paths joined by file name (never by the CSV's path prefix). PF-Pascal keypoints come from the ``.mat``
annotations (test too, as the authors do), cross-checked against the test CSV's inline copy. Annotations
are checked against the real image sizes (``sd4match.annotation_checks``): a broken file is an error, a pair
that cannot be scored is skipped and counted in the split's :class:`PairsReport`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.io
from PIL import Image, ImageOps, UnidentifiedImageError

from sd4match.annotation_checks import PairsReport, inline_disagreement, screen_rows
from sd4match.io import atomic_path

PathLike = str | os.PathLike[str]

SPAIR_CATEGORIES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "train",
    "tvmonitor",
)
PFPASCAL_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
PFWILLOW_CLASSES: tuple[str, ...] = (
    "car(G)",
    "car(M)",
    "car(S)",
    "duck(S)",
    "motorbike(G)",
    "motorbike(M)",
    "motorbike(S)",
    "winebottle(M)",
    "winebottle(wC)",
    "winebottle(woC)",
)

DATASETS: tuple[str, ...] = ("spair", "pfpascal", "pfwillow")
SPLITS: tuple[str, ...] = ("trn", "val", "test")
THRESHOLD_KINDS: dict[str, str] = {"spair": "bbox", "pfpascal": "img", "pfwillow": "kps"}
THRESHOLD_KIND_NAMES: tuple[str, ...] = ("bbox", "img", "kps")
# Names of custom datasets (``sd4match.custom_dataset``): wildcard- and path-safe, never an official name.
CUSTOM_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")

PAIRS_COLUMNS: tuple[str, ...] = (
    "pair_id",
    "dataset",
    "split",
    "category",
    "src_image",
    "trg_image",
    "src_width",
    "src_height",
    "trg_width",
    "trg_height",
    "src_kps",
    "trg_kps",
    "src_bbox",
    "trg_bbox",
    "flip",
    "n_kps",
    "threshold_kind",
)
SPAIR_EXTRA_COLUMNS: tuple[str, ...] = (
    "mirror",
    "viewpoint_variation",
    "scale_variation",
    "truncation",
    "occlusion",
    "kps_ids",
)

_POINTS = pa.list_(pa.list_(pa.float64()))
_BBOX = pa.list_(pa.float64())
_ARROW_TYPES: dict[str, pa.DataType] = {
    "pair_id": pa.string(),
    "dataset": pa.string(),
    "split": pa.string(),
    "category": pa.string(),
    "src_image": pa.string(),
    "trg_image": pa.string(),
    "src_width": pa.int64(),
    "src_height": pa.int64(),
    "trg_width": pa.int64(),
    "trg_height": pa.int64(),
    "src_kps": _POINTS,
    "trg_kps": _POINTS,
    "src_bbox": _BBOX,
    "trg_bbox": _BBOX,
    "flip": pa.bool_(),
    "n_kps": pa.int64(),
    "threshold_kind": pa.string(),
    "mirror": pa.int64(),
    "viewpoint_variation": pa.int64(),
    "scale_variation": pa.int64(),
    "truncation": pa.int64(),
    "occlusion": pa.int64(),
    "kps_ids": pa.list_(pa.string()),
}

_SPAIR_KEYS: tuple[str, ...] = (
    "src_imname",
    "trg_imname",
    "src_imsize",
    "trg_imsize",
    "src_bndbox",
    "trg_bndbox",
    "src_kps",
    "trg_kps",
    "kps_ids",
    "category",
    *SPAIR_EXTRA_COLUMNS[:5],
)
_PFPASCAL_INLINE_COLUMNS: tuple[str, ...] = ("XA", "YA", "XB", "YB")
_PFWILLOW_N_KPS = 10
# Where the images are under a dataset root (the official layout); CSV paths are joined by file name.
PFPASCAL_IMAGE_DIR = "PF-dataset-PASCAL/JPEGImages"
PFWILLOW_IMAGE_DIR = "PF-dataset"
# PF-Pascal list columns by position: source, target, class, then flip (trn/val) or XA, YA, XB, YB (test).
_PFPASCAL_WIDTHS = {
    3: "source, target, class",
    4: "source, target, class, flip",
    7: "source, target, class, XA, YA, XB, YB",
}
# PF-Willow list: imageA, imageB, then 10 x and 10 y of A, then 10 x and 10 y of B.
_PFWILLOW_WIDTH = 2 + 4 * _PFWILLOW_N_KPS


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRecord:
    """One row of the normalised pairs table; SPair-only fields are None for the PF datasets."""

    pair_id: str
    dataset: str
    split: str
    category: str
    src_image: str
    trg_image: str
    src_width: int
    src_height: int
    trg_width: int
    trg_height: int
    src_kps: list[list[float]]
    trg_kps: list[list[float]]
    src_bbox: list[float] | None
    trg_bbox: list[float] | None
    flip: bool
    n_kps: int
    threshold_kind: str
    mirror: int | None = None
    viewpoint_variation: int | None = None
    scale_variation: int | None = None
    truncation: int | None = None
    occlusion: int | None = None
    kps_ids: list[str] | None = None


@dataclass(frozen=True)
class PFPascalCsvRow:
    """One raw row of a PF-Pascal pair CSV; inline keypoints (test CSV only) keep their NaN entries."""

    source_image: str
    target_image: str
    class_id: int
    flip: bool
    src_kps: list[list[float]] | None
    trg_kps: list[list[float]] | None


def records(df: pd.DataFrame) -> list[PairRecord]:
    """Turn a pairs table into PairRecord objects, the convenient form for per-pair loops."""
    names = [f.name for f in fields(PairRecord)]
    present = [n for n in names if n in df.columns]
    return [PairRecord(**_plain_row(row, present)) for row in df[present].to_dict("records")]


def _plain_row(row: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Convert numpy scalars of one table row into plain python values."""
    out: dict[str, Any] = {}
    for name in names:
        value = row[name]
        out[name] = value.item() if isinstance(value, np.generic) else value
    return out


# --------------------------------------------------------------------------------------------------
# Small checked readers
# --------------------------------------------------------------------------------------------------


def _require(mapping: dict[str, Any], key: str, source: PathLike) -> Any:
    """Return ``mapping[key]`` or raise naming the file and the missing key."""
    if key not in mapping:
        raise ValueError(f"{source}: missing key {key!r}")
    return mapping[key]


def _as_float(value: Any, source: PathLike, key: str) -> float:
    """Convert one coordinate to float, raising with the file and key on failure."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{source}: {key} holds a non-numeric value {value!r}")
    return float(value)


def _as_points(value: Any, source: PathLike, key: str) -> list[list[float]]:
    """Check a ``[[x, y], ...]`` list and return it as floats."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{source}: {key} must be a list of [x, y] points, got {type(value).__name__}")
    points = []
    for i, point in enumerate(value):
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ValueError(f"{source}: {key}[{i}] must be an [x, y] pair, got {point!r}")
        points.append(
            [_as_float(point[0], source, f"{key}[{i}]"), _as_float(point[1], source, f"{key}[{i}]")]
        )
    return points


def _as_bbox(value: Any, source: PathLike, key: str) -> list[float]:
    """Check an ``[x1, y1, x2, y2]`` box and return it as floats."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{source}: {key} must be [x1, y1, x2, y2], got {value!r}")
    return [_as_float(v, source, key) for v in value]


def _as_int(value: Any, source: PathLike, key: str) -> int:
    """Check an integer field (SPair difficulty flags, sizes)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
    return int(value)


def _check_split(split: str, source: PathLike) -> None:
    """Reject split names outside trn/val/test."""
    if split not in SPLITS:
        raise ValueError(f"{source}: unknown split {split!r}; expected one of {list(SPLITS)}")


def image_size(path: PathLike, referenced_by: PathLike | None = None) -> tuple[int, int]:
    """Return ``(width, height)`` read from the image header only, so tables build without decoding pixels."""
    path = Path(path)
    where = f" (referenced by {referenced_by})" if referenced_by is not None else ""
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}{where}")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}{where}: {exc}") from exc
    return int(width), int(height)


def load_image(root: PathLike, relpath: str, flip: bool = False) -> Image.Image:
    """Load ``root/relpath`` as an RGB PIL image, mirrored horizontally when ``flip`` (PF-Pascal trn/val)."""
    path = Path(root) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    return ImageOps.mirror(rgb) if flip else rgb


def flip_points(points: list[list[float]], width: int) -> list[list[float]]:
    """Mirror keypoints horizontally in a ``width``-wide image (``x -> W - x``, the CATs/DHPF convention)."""
    return [[width - x, y] for x, y in points]


def flip_bbox(bbox: list[float] | None, width: int) -> list[float] | None:
    """Mirror an ``[x1, y1, x2, y2]`` box horizontally: ``x1' = W - x2``, ``x2' = W - x1``."""
    if bbox is None:
        return None
    x1, y1, x2, y2 = bbox
    return [width - x2, y1, width - x1, y2]


def _pair_row(
    *,
    pair_id: str,
    dataset: str,
    split: str,
    category: str,
    images: tuple[str, str],
    sizes: tuple[tuple[int, int], tuple[int, int]],
    kps: tuple[list[list[float]], list[list[float]]],
    bboxes: tuple[list[float] | None, list[float] | None],
    flip: bool,
) -> dict[str, Any]:
    """Assemble one pairs-table row in the column order of PAIRS_COLUMNS."""
    return {
        "pair_id": pair_id,
        "dataset": dataset,
        "split": split,
        "category": category,
        "src_image": images[0],
        "trg_image": images[1],
        "src_width": sizes[0][0],
        "src_height": sizes[0][1],
        "trg_width": sizes[1][0],
        "trg_height": sizes[1][1],
        "src_kps": kps[0],
        "trg_kps": kps[1],
        "src_bbox": bboxes[0],
        "trg_bbox": bboxes[1],
        "flip": bool(flip),
        "n_kps": len(kps[0]),
        "threshold_kind": THRESHOLD_KINDS[dataset],
    }


def _table(
    rows: list[dict[str, Any]], columns: Sequence[str], source: PathLike, report: PairsReport
) -> pd.DataFrame:
    """Screen the rows (skips go to ``report``), build the DataFrame in a fixed column order, validate it."""
    report.listed = len(rows)
    df = pd.DataFrame(screen_rows(rows, report), columns=list(columns))
    validate_pairs_table(df, source)
    return df


def _new_report(
    report: PairsReport | None, dataset: str, split: str, source: PathLike, kps: str
) -> PairsReport:
    """The caller's report, or a fresh one (skips are then only logged)."""
    report = report if report is not None else PairsReport(dataset, split, str(source))
    report.keypoint_source = kps
    return report


class ImageSizes:
    """Image sizes read from the headers, each image once (SPair trn lists each image ~60 times)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sizes: dict[str, tuple[int, int]] = {}

    def __call__(self, relpath: str, referenced_by: PathLike) -> tuple[int, int]:
        if relpath not in self._sizes:
            self._sizes[relpath] = image_size(self.root / relpath, referenced_by)
        return self._sizes[relpath]


# --------------------------------------------------------------------------------------------------
# SPair-71k
# --------------------------------------------------------------------------------------------------


def read_spair_split_list(path: PathLike) -> list[str]:
    """Read an official ``Layout/<layout>/<split>.txt`` list: one pair-annotation stem per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SPair-71k split list not found: {path}")
    stems = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not stems:
        raise ValueError(f"{path}: SPair-71k split list is empty")
    return stems


def _read_json(path: Path, listed_in: Path) -> dict[str, Any]:
    """Read one pair-annotation JSON, naming the split list when the file is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{listed_in} lists a pair whose annotation file is missing: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _spair_imsize(value: Any, source: Path, key: str) -> tuple[int, int]:
    """Read an SPair ``[W, H, C]`` image size."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{source}: {key} must be [W, H, C], got {value!r}")
    return _as_int(value[0], source, key), _as_int(value[1], source, key)


def _spair_row(root: Path, split: str, stem: str, listed_in: Path, image_sizes: ImageSizes) -> dict[str, Any]:
    """Parse one SPair-71k pair annotation into a pairs-table row (with the SPair extra columns)."""
    path = root / "PairAnnotation" / split / f"{stem}.json"
    ann = _read_json(path, listed_in)
    values = {key: _require(ann, key, path) for key in _SPAIR_KEYS}
    category = values["category"]
    if category not in SPAIR_CATEGORIES:
        raise ValueError(f"{path}: unknown SPair-71k category {category!r}")
    if ":" in stem and stem.rsplit(":", 1)[1] != category:
        raise ValueError(f"{path}: category {category!r} disagrees with the file name {stem!r}")
    src_kps = _as_points(values["src_kps"], path, "src_kps")
    trg_kps = _as_points(values["trg_kps"], path, "trg_kps")
    kps_ids = values["kps_ids"]
    if len(trg_kps) != len(src_kps) or not isinstance(kps_ids, list) or len(kps_ids) != len(src_kps):
        raise ValueError(
            f"{path}: src_kps/trg_kps/kps_ids lengths differ "
            f"({len(src_kps)}, {len(trg_kps)}, {len(kps_ids) if isinstance(kps_ids, list) else kps_ids!r})"
        )
    images = (
        f"JPEGImages/{category}/{values['src_imname']}",
        f"JPEGImages/{category}/{values['trg_imname']}",
    )
    sizes = []
    for side, image in zip(("src", "trg"), images, strict=True):
        stated = _spair_imsize(values[f"{side}_imsize"], path, f"{side}_imsize")
        actual = image_sizes(image, path)
        if stated != actual:
            raise ValueError(
                f"{path}: pair {stem!r}: {side}_imsize says {stated[0]} x {stated[1]} but {root / image} "
                f"is {actual[0]} x {actual[1]}: the annotation does not belong to this image (re-fetch the "
                "dataset)"
            )
        sizes.append(actual)
    row = _pair_row(
        pair_id=stem,
        dataset="spair",
        split=split,
        category=category,
        images=images,
        sizes=(sizes[0], sizes[1]),
        kps=(src_kps, trg_kps),
        bboxes=(
            _as_bbox(values["src_bndbox"], path, "src_bndbox"),
            _as_bbox(values["trg_bndbox"], path, "trg_bndbox"),
        ),
        flip=False,
    )
    for key in SPAIR_EXTRA_COLUMNS[:5]:
        row[key] = _as_int(values[key], path, key)
    row["kps_ids"] = [str(k) for k in kps_ids]
    row["_file"] = str(path)
    return row


def parse_spair(
    root: PathLike, split: str, layout: str = "large", report: PairsReport | None = None
) -> pd.DataFrame:
    """Parse SPair-71k ``split`` (order of ``Layout/<layout>/<split>.txt``) into the pairs table."""
    root = Path(root)
    list_path = root / "Layout" / layout / f"{split}.txt"
    _check_split(split, list_path)
    report = _new_report(report, "spair", split, list_path, "PairAnnotation JSON")
    stems = read_spair_split_list(list_path)
    sizes = ImageSizes(root)
    rows = [_spair_row(root, split, stem, list_path, sizes) for stem in stems]
    return _table(rows, PAIRS_COLUMNS + SPAIR_EXTRA_COLUMNS, list_path, report)


# --------------------------------------------------------------------------------------------------
# PF-Pascal
# --------------------------------------------------------------------------------------------------


def find_pfpascal_pairs_csv(directory: PathLike, split: str) -> Path:
    """Locate the PF-Pascal list of ``split`` (SD4Match ``trn_pairs.csv`` or NCNet ``train_pairs.csv``)."""
    directory = Path(directory)
    _check_split(split, directory)
    names = ("trn_pairs.csv", "train_pairs.csv") if split == "trn" else (f"{split}_pairs.csv",)
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"PF-Pascal {split} pair list not found: tried {[str(directory / n) for n in names]}"
    )


def read_csv_rows(path: PathLike, is_data: Callable[[list[str]], bool]) -> list[list[str]]:
    """The data rows of a pair CSV as lists of stripped cells, read by position.

    The first row is a header, whatever its names, unless ``is_data`` says it is a pair; blank lines are
    skipped and a UTF-8 byte-order mark is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair list not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if any(c.strip() for c in row)]
    if rows and not is_data(rows[0]):
        rows = rows[1:]
    return rows


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _path_parts(text: str) -> list[str]:
    """Components of a CSV image path, whichever separator it uses."""
    return [part for part in re.split(r"[\\/]+", text) if part]


def pfpascal_image(text: str, source: PathLike, row: int) -> str:
    """A PF-Pascal CSV image path joined by file name: ``PF-dataset-PASCAL/JPEGImages/<file>``."""
    parts = _path_parts(text)
    if not parts:
        raise ValueError(f"{source}: row {row}: empty image path")
    return f"{PFPASCAL_IMAGE_DIR}/{parts[-1]}"


def _parse_number(text: str, source: Path, row: int, column: str, position: int | None = None) -> float:
    """Parse one CSV number, naming the file, row and column on failure."""
    try:
        return float(text)
    except ValueError as exc:
        where = f" (column {position + 1})" if position is not None else ""
        raise ValueError(f"{source}: row {row}, column {column}: not a number: {text!r}{where}") from exc


def _parse_coordinate_list(text: str, source: Path, row: int, column: str) -> list[float]:
    """Parse a ``;``-separated PF-Pascal coordinate list."""
    return [_parse_number(part, source, row, column) for part in text.split(";")]


def _parse_class_id(text: str, source: Path, row: int) -> int:
    """Parse a PF-Pascal class id (1..20)."""
    try:
        class_id = int(text)
    except ValueError as exc:
        raise ValueError(f"{source}: row {row}, column class: not an integer: {text!r}") from exc
    if not 1 <= class_id <= len(PFPASCAL_CLASSES):
        raise ValueError(f"{source}: row {row}, column class: unknown class id {class_id} (expected 1..20)")
    return class_id


def _parse_flip(text: str, source: Path, row: int) -> bool:
    """Parse the 0/1 ``flip`` column of the train/val lists."""
    if text not in ("0", "1"):
        raise ValueError(f"{source}: row {row}, column flip: expected 0 or 1, got {text!r}")
    return text == "1"


def _inline_points(
    cells: Sequence[str], source: Path, row: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Parse the inline XA/YA/XB/YB keypoints (columns 4-7) of one test-CSV row (NaN entries kept)."""
    coords = {
        c: _parse_coordinate_list(text, source, row, c)
        for c, text in zip(_PFPASCAL_INLINE_COLUMNS, cells, strict=True)
    }
    lengths = {c: len(v) for c, v in coords.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{source}: row {row}: coordinate lists have different lengths {lengths}")
    src = [[x, y] for x, y in zip(coords["XA"], coords["YA"], strict=True)]
    trg = [[x, y] for x, y in zip(coords["XB"], coords["YB"], strict=True)]
    return src, trg


def read_pfpascal_csv(path: PathLike) -> list[PFPascalCsvRow]:
    """Read a PF-Pascal pair list by column position (source, target, class, then flip or XA, YA, XB, YB).

    Any header (or none) and any image path prefix: images are joined by file name under
    ``PF-dataset-PASCAL/JPEGImages``.
    """
    path = Path(path)
    rows = read_csv_rows(path, lambda cells: len(cells) >= 3 and _is_int(cells[2]))
    widths = {len(cells) for cells in rows}
    if not rows:
        raise ValueError(f"{path}: the PF-Pascal pair list holds no pairs")
    if len(widths) != 1 or next(iter(widths)) not in _PFPASCAL_WIDTHS:
        bad = next(
            i
            for i, cells in enumerate(rows)
            if len(cells) not in _PFPASCAL_WIDTHS or len(cells) != len(rows[0])
        )
        expected = "; ".join(f"{n} ({names})" for n, names in _PFPASCAL_WIDTHS.items())
        raise ValueError(
            f"{path}: row {bad} has {len(rows[bad])} columns (row 0: {len(rows[0])}); a PF-Pascal list has "
            f"{expected}"
        )
    records = []
    for i, cells in enumerate(rows):
        src, trg = _inline_points(cells[3:], path, i) if len(cells) == 7 else (None, None)
        records.append(
            PFPascalCsvRow(
                source_image=pfpascal_image(cells[0], path, i),
                target_image=pfpascal_image(cells[1], path, i),
                class_id=_parse_class_id(cells[2], path, i),
                flip=_parse_flip(cells[3], path, i) if len(cells) == 4 else False,
                src_kps=src,
                trg_kps=trg,
            )
        )
    return records


def read_pfpascal_mat(path: PathLike) -> tuple[np.ndarray, list[float]]:
    """Read an official PF-Pascal annotation ``.mat``: ``kps`` (N x 2, NaN rows invisible) and ``bbox``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PF-Pascal annotation not found: {path}")
    mat = _loadmat(path)
    kps = np.asarray(_require(mat, "kps", path), dtype=np.float64)
    if kps.ndim != 2 or kps.shape[1] != 2:
        raise ValueError(f"{path}: kps must be an N x 2 array, got shape {kps.shape}")
    bbox = np.asarray(_require(mat, "bbox", path), dtype=np.float64).reshape(-1)
    if bbox.size != 4:
        raise ValueError(f"{path}: bbox must hold 4 numbers [x1, y1, x2, y2], got {bbox.size}")
    return kps, [float(v) for v in bbox]


def _loadmat(path: Path) -> dict[str, Any]:
    """Load a MATLAB file, turning scipy's parse errors into a ValueError naming the file."""
    try:
        return scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many error types on bad bytes
        raise ValueError(f"cannot read MATLAB file {path}: {exc}") from exc


def pfpascal_annotation_path(root: Path, image: str, category: str) -> Path:
    """Annotation of an image: ``<base>/JPEGImages/<img>.jpg`` -> ``<base>/Annotations/<class>/<img>.mat``."""
    rel = Path(image)
    return root / rel.parent.parent / "Annotations" / category / f"{rel.stem}.mat"


def mutually_visible(src: Sequence[Sequence[float]], trg: Sequence[Sequence[float]]) -> list[int]:
    """Indices of keypoints whose source and target coordinates are all finite."""
    return [
        i for i, (s, t) in enumerate(zip(src, trg, strict=True)) if all(math.isfinite(v) for v in (*s, *t))
    ]


def _pfpascal_annotations(
    root: Path, record: PFPascalCsvRow, category: str, source: Path, row: int, report: PairsReport
) -> tuple[list[list[float]], list[list[float]], list[float], list[float]]:
    """Keypoints (all, NaNs kept) and bboxes of one pair from its two ``.mat`` files (as the authors read
    them); the test CSV's inline keypoints are cross-checked and a disagreement is recorded in ``report``."""
    mats = [
        pfpascal_annotation_path(root, image, category)
        for image in (record.source_image, record.target_image)
    ]
    (src_kps, src_bbox), (trg_kps, trg_bbox) = (read_pfpascal_mat(m) for m in mats)
    if src_kps.shape != trg_kps.shape:
        raise ValueError(
            f"{source}: row {row}: {mats[0]} has {len(src_kps)} keypoints but {mats[1]} has {len(trg_kps)}"
        )
    if record.src_kps is not None and record.trg_kps is not None:
        inline_keep = mutually_visible(record.src_kps, record.trg_kps)
        mat_keep = mutually_visible(src_kps, trg_kps)
        detail = inline_disagreement(
            ([record.src_kps[i] for i in inline_keep], [record.trg_kps[i] for i in inline_keep]),
            (src_kps[mat_keep].tolist(), trg_kps[mat_keep].tolist()),
        )
        if detail is not None:
            report.disagree(str(row), f"{source} row {row} vs {mats[0].name}, {mats[1].name}", detail)
    return src_kps.tolist(), trg_kps.tolist(), src_bbox, trg_bbox


def _pfpascal_row(
    root: Path, split: str, record: PFPascalCsvRow, source: Path, row: int, report: PairsReport
) -> dict[str, Any]:
    """Turn one PF-Pascal CSV row into a pairs-table row (mutually visible keypoints, flip applied)."""
    category = PFPASCAL_CLASSES[record.class_id - 1]
    src_size = image_size(root / record.source_image, f"{source} row {row}")
    trg_size = image_size(root / record.target_image, f"{source} row {row}")
    src_all, trg_all, src_bbox, trg_bbox = _pfpascal_annotations(root, record, category, source, row, report)
    keep = mutually_visible(src_all, trg_all)
    src_kps = [[float(v) for v in src_all[i]] for i in keep]
    trg_kps = [[float(v) for v in trg_all[i]] for i in keep]
    if record.flip:
        src_kps, trg_kps = flip_points(src_kps, src_size[0]), flip_points(trg_kps, trg_size[0])
        src_bbox, trg_bbox = flip_bbox(src_bbox, src_size[0]), flip_bbox(trg_bbox, trg_size[0])
    row_dict = _pair_row(
        pair_id=str(row),
        dataset="pfpascal",
        split=split,
        category=category,
        images=(record.source_image, record.target_image),
        sizes=(src_size, trg_size),
        kps=(src_kps, trg_kps),
        bboxes=(src_bbox, trg_bbox),
        flip=record.flip,
    )
    row_dict["_file"] = f"{source} row {row}"
    return row_dict


def parse_pfpascal(
    root: PathLike, split: str, pairs_csv: PathLike, report: PairsReport | None = None
) -> pd.DataFrame:
    """Parse a PF-Pascal pair list (images joined by file name under ``root``) into the pairs table, in CSV
    order; keypoints and bboxes come from the ``.mat`` annotations."""
    root, pairs_csv = Path(root), Path(pairs_csv)
    _check_split(split, pairs_csv)
    report = _new_report(report, "pfpascal", split, pairs_csv, "PF-Pascal Annotations/<class>/<image>.mat")
    rows = [
        _pfpascal_row(root, split, rec, pairs_csv, i, report)
        for i, rec in enumerate(read_pfpascal_csv(pairs_csv))
    ]
    return _table(rows, PAIRS_COLUMNS, pairs_csv, report)


# --------------------------------------------------------------------------------------------------
# PF-Willow
# --------------------------------------------------------------------------------------------------


def read_pfwillow_mat(path: PathLike) -> np.ndarray:
    """Read the 10 keypoints of an official PF-Willow ``.mat`` (``pts_coord``, 2 x 10) as a (10, 2) array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PF-Willow annotation not found: {path}")
    coords = np.asarray(_require(_loadmat(path), "pts_coord", path), dtype=np.float64)
    if coords.shape != (2, _PFWILLOW_N_KPS):
        raise ValueError(f"{path}: pts_coord must be 2 x {_PFWILLOW_N_KPS}, got shape {coords.shape}")
    return coords.T.copy()


def _pfwillow_columns() -> list[str]:
    """The names of the 40 coordinate columns by position: XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10."""
    return [f"{axis}{side}{i}" for side in "AB" for axis in "XY" for i in range(1, _PFWILLOW_N_KPS + 1)]


def pfwillow_image(text: str, source: PathLike, row: int) -> str:
    """A PF-Willow CSV image path joined by file name and sub-class folder: ``PF-dataset/<class>/<file>``
    (file names repeat across sub-classes, so the folder is needed; any prefix before it is ignored)."""
    parts = _path_parts(text)
    if len(parts) < 2:
        raise ValueError(f"{source}: row {row}: image path {text!r} names no sub-class folder")
    return f"{PFWILLOW_IMAGE_DIR}/{parts[-2]}/{parts[-1]}"


def _pfwillow_category(image: str, source: Path, row: int) -> str:
    """Sub-class of a ``PF-dataset/<class>/<img>.png`` path."""
    category = Path(image).parent.name
    if category not in PFWILLOW_CLASSES:
        raise ValueError(f"{source}: row {row}: unknown PF-Willow sub-class {category!r} in {image!r}")
    return category


def _pfwillow_points(cells: Sequence[str], side: int, source: Path, row: int) -> list[list[float]]:
    """Parse the 10 finite keypoints of image ``side`` (0: A, 1: B) of one CSV row, by column position."""
    names = _pfwillow_columns()
    first = 2 + side * 2 * _PFWILLOW_N_KPS
    points = []
    for i in range(_PFWILLOW_N_KPS):
        px, py = first + i, first + _PFWILLOW_N_KPS + i
        x = _parse_number(cells[px], source, row, names[px - 2], px)
        y = _parse_number(cells[py], source, row, names[py - 2], py)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{source}: row {row}: keypoint {'AB'[side]}{i + 1} is not finite ({x}, {y})")
        points.append([x, y])
    return points


def _pfwillow_row(root: Path, cells: Sequence[str], source: Path, row: int) -> dict[str, Any]:
    """Turn one PF-Willow CSV row into a pairs-table row."""
    images = (pfwillow_image(cells[0], source, row), pfwillow_image(cells[1], source, row))
    category = _pfwillow_category(images[0], source, row)
    if _pfwillow_category(images[1], source, row) != category:
        raise ValueError(f"{source}: row {row}: imageA and imageB belong to different sub-classes")
    row_dict = _pair_row(
        pair_id=str(row),
        dataset="pfwillow",
        split="test",
        category=category,
        images=images,
        sizes=(
            image_size(root / images[0], f"{source} row {row}"),
            image_size(root / images[1], f"{source} row {row}"),
        ),
        kps=(_pfwillow_points(cells, 0, source, row), _pfwillow_points(cells, 1, source, row)),
        bboxes=(None, None),
        flip=False,
    )
    row_dict["_file"] = f"{source} row {row}"
    return row_dict


def parse_pfwillow(root: PathLike, pairs_csv: PathLike, report: PairsReport | None = None) -> pd.DataFrame:
    """Parse the PF-Willow test pair list by column position (any header, any path prefix) into the pairs
    table, in CSV order."""
    root, pairs_csv = Path(root), Path(pairs_csv)
    report = _new_report(report, "pfwillow", "test", pairs_csv, "PF-Willow test_pairs.csv")
    rows = read_csv_rows(pairs_csv, lambda cells: len(cells) >= 3 and _is_number(cells[2]))
    for i, cells in enumerate(rows):
        if len(cells) != _PFWILLOW_WIDTH:
            raise ValueError(
                f"{pairs_csv}: row {i} has {len(cells)} columns; the PF-Willow list has {_PFWILLOW_WIDTH} "
                f"(imageA, imageB, then {_PFWILLOW_N_KPS} x and {_PFWILLOW_N_KPS} y of A, then of B)"
            )
    table_rows = [_pfwillow_row(root, cells, pairs_csv, i) for i, cells in enumerate(rows)]
    return _table(table_rows, PAIRS_COLUMNS, pairs_csv, report)


# --------------------------------------------------------------------------------------------------
# Dispatch, validation, storage
# --------------------------------------------------------------------------------------------------


def build_pairs(
    dataset: str,
    root: PathLike,
    split: str,
    pairs_csv: PathLike | None = None,
    layout: str = "large",
    custom: Any = None,
) -> tuple[pd.DataFrame, PairsReport]:
    """The normalised pairs table of ``dataset`` (spair / pfpascal / pfwillow, or a custom dataset whose
    ``custom_dataset.CustomDatasetSpec`` is ``custom``) and ``split``, and the report of what was kept
    (skipped pairs, PF-Pascal keypoint cross-check)."""
    report = PairsReport(dataset, split, "")
    if custom is not None:
        from sd4match.custom_dataset import CUSTOM_SPLIT, parse_custom

        if custom.name != dataset or split != CUSTOM_SPLIT:
            raise ValueError(
                f"custom dataset {custom.name!r} has only a {CUSTOM_SPLIT!r} split, asked for "
                f"{dataset!r} / {split!r} (root {root})"
            )
        report.source = str(Path(pairs_csv) if pairs_csv is not None else Path(root) / custom.pairs_file)
        return parse_custom(root, custom, pairs_csv, report), report
    if dataset == "spair":
        if pairs_csv is not None:
            raise ValueError(f"spair takes its pairs from Layout/{layout}/{split}.txt, not from {pairs_csv}")
        report.source = str(Path(root) / "Layout" / layout / f"{split}.txt")
        return parse_spair(root, split, layout, report), report
    if dataset == "pfpascal":
        csv_path = Path(pairs_csv) if pairs_csv is not None else find_pfpascal_pairs_csv(root, split)
        report.source = str(csv_path)
        return parse_pfpascal(root, split, csv_path, report), report
    if dataset == "pfwillow":
        if split != "test":
            raise ValueError(f"PF-Willow has only a test split, got {split!r} (root {root})")
        csv_path = Path(pairs_csv) if pairs_csv is not None else Path(root) / "test_pairs.csv"
        report.source = str(csv_path)
        return parse_pfwillow(root, csv_path, report), report
    raise ValueError(f"unknown dataset {dataset!r} (root {root}); expected one of {list(DATASETS)}")


def build_pairs_table(
    dataset: str, root: PathLike, split: str, pairs_csv: PathLike | None = None, layout: str = "large"
) -> pd.DataFrame:
    """Build the normalised pairs table of ``dataset`` (spair / pfpascal / pfwillow) and ``split``."""
    return build_pairs(dataset, root, split, pairs_csv, layout)[0]


def _validate_row(row: dict[str, Any], source: PathLike) -> None:
    """Check one row's keypoint lists, counts, boxes and sizes."""
    where = f"{source}: pair {row['pair_id']!r}"
    src, trg = row["src_kps"], row["trg_kps"]
    for key, points in (("src_kps", src), ("trg_kps", trg)):
        if points is None or any(len(p) != 2 for p in points):
            raise ValueError(f"{where}: {key} must be a list of [x, y] points")
        if not all(math.isfinite(v) for p in points for v in p):
            raise ValueError(f"{where}: {key} holds a non-finite coordinate")
    if len(src) != len(trg):
        raise ValueError(f"{where}: src_kps has {len(src)} points but trg_kps has {len(trg)}")
    if row["n_kps"] != len(src):
        raise ValueError(f"{where}: n_kps is {row['n_kps']} but there are {len(src)} keypoints")
    if len(src) < 1:
        raise ValueError(f"{where}: no mutually visible keypoints")
    for key in ("src_bbox", "trg_bbox"):
        if row[key] is not None and len(row[key]) != 4:
            raise ValueError(f"{where}: {key} must be [x1, y1, x2, y2] or None")
    for key in ("src_width", "src_height", "trg_width", "trg_height"):
        if not row[key] > 0:
            raise ValueError(f"{where}: {key} must be positive, got {row[key]}")
    official = row["dataset"] in DATASETS
    if not (official or CUSTOM_NAME_PATTERN.fullmatch(str(row["dataset"]))) or row["split"] not in SPLITS:
        raise ValueError(f"{where}: unknown dataset/split {row['dataset']!r}/{row['split']!r}")
    if official and row["threshold_kind"] != THRESHOLD_KINDS[row["dataset"]]:
        raise ValueError(f"{where}: threshold_kind {row['threshold_kind']!r} is wrong for {row['dataset']}")
    if row["threshold_kind"] not in THRESHOLD_KIND_NAMES:
        raise ValueError(f"{where}: threshold_kind {row['threshold_kind']!r} not in {THRESHOLD_KIND_NAMES}")
    if row["threshold_kind"] == "bbox" and row["trg_bbox"] is None:
        raise ValueError(f"{where}: threshold_kind 'bbox' needs trg_bbox")


def validate_pairs_table(df: pd.DataFrame, source: PathLike) -> None:
    """Check a pairs table against the docs/ARCHITECTURE.md contract; raise naming ``source`` and the pair."""
    missing = [c for c in PAIRS_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: pairs table lacks columns {missing}")
    if len(df) == 0:
        raise ValueError(f"{source}: pairs table has no pairs")
    duplicated = df["pair_id"][df["pair_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{source}: pair {duplicated.iloc[0]!r} appears more than once")
    for row in df[list(PAIRS_COLUMNS)].to_dict("records"):
        _validate_row(row, source)


def _arrow_column(values: list[Any], name: str) -> pa.Array:
    """Arrow array of one column with the contract's type (all-None bbox columns stay list<double>)."""
    return pa.array(values, type=_ARROW_TYPES.get(name))


def write_pairs_table(df: pd.DataFrame, path: PathLike) -> None:
    """Validate and write the pairs table as parquet atomically, with the contract's column types."""
    validate_pairs_table(df, path)
    table = pa.table({name: _arrow_column(df[name].tolist(), name) for name in df.columns})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_pairs_table(path: PathLike) -> pd.DataFrame:
    """Read a pairs-table parquet back with python lists of floats in the list columns, then validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs table not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"cannot read pairs table {path}: {exc}") from exc
    df = pd.DataFrame({name: table.column(name).to_pylist() for name in table.column_names})
    validate_pairs_table(df, path)
    return df
