"""Match points on your own images with a tuned prompt or a text prompt: ``sd4match.match(...)`` and the
``sd4match match`` command (``sd4match.match_cli``).

Built on the evaluation path, never beside it: the pair becomes a one-row pairs table and goes through the
evaluation's own functions (``evaluation.iter_predictions`` with ``sd_text_prompt_features`` for text, Single
and Class prompts; ``evaluation.conditional_feature_batches`` and ``predict_pairs`` for CPM), with the same
prompt loading (``prompt_learning.load_prompt``), model check (``evaluation.check_prompt_models``), frames,
noise seeds and matching settings. For a pair of a test set, the predicted points are those the evaluation
writes to ``predictions.parquet`` (``sd4match.predictions``) when the images are keyed as the dataset keys
them (``root``: the dataset root) and, for CPM, the pair has the same ``pair_id`` and is matched alone.

CPM needs the DINOv2 tokens of the two images: computed here with the configured DINOv2 model and the
processor's preprocessing, stored as the token cache stores them (float16), never read from a cache.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from sd4match.custom_dataset import parse_points_text
from sd4match.evaluation import (
    ConditionalFeatures,
    ImageKey,
    MatchingSettings,
    conditional_feature_batches,
    iter_predictions,
    predict_pairs,
    sd_text_prompt_features,
)
from sd4match.match_models import MatchInputError, MatchSetup, load_setup
from sd4match.matching import (
    MATCHING_METHODS,
    _grid_coords,
    correlation,
    nearest_neighbour,
    sample_descriptors,
    to_squashed_frame,
)
from sd4match.predictions import from_squashed_frame

CONFIDENCE_DEFINITION = (
    "kernel-softmax peak probability: with corr the cosine correlation of the source point's descriptor "
    "with every target feature cell, G the Gaussian (kernel_sigma cells) centred on corr's argmax and T the "
    "softmax temperature, the probability softmax((corr * G) / T) puts on that argmax cell (the cell the "
    "kernel is centred on, the nearest-neighbour match). The kernel-softmax prediction is the mean of this "
    "distribution; the confidence is its largest probability whenever the peak correlation is >= 0. 1 = all "
    "mass on one cell; 1 / (cells) = no preference."
)


# ----------------------------------------------------------------------------------------------- confidence


def kernel_softmax_distribution(corr: torch.Tensor, sigma: float, temperature: float) -> torch.Tensor:
    """``softmax((corr * G) / T)`` over the ``(..., h, w)`` cells of each map, flattened to ``(..., h * w)``:
    the distribution whose mean is ``matching.kernel_soft_argmax`` (G centred on the map's argmax)."""
    corr = corr.float()
    peak = nearest_neighbour(corr)
    xs, ys = _grid_coords(corr)
    sq_dist = (xs - peak[..., :1]) ** 2 + (ys - peak[..., 1:]) ** 2
    flat = corr.flatten(-2) * torch.exp(-sq_dist / (2.0 * sigma**2))
    return torch.softmax((flat - flat.amax(dim=-1, keepdim=True)) / temperature, dim=-1)


def kernel_softmax_confidence(corr: torch.Tensor, sigma: float, temperature: float) -> torch.Tensor:
    """The kernel-softmax peak probability of each ``(..., h, w)`` map (``CONFIDENCE_DEFINITION``)."""
    prob = kernel_softmax_distribution(corr, sigma, temperature)
    peak = nearest_neighbour(corr.float()).long()
    index = peak[..., 1] * corr.shape[-1] + peak[..., 0]
    return prob.gather(-1, index[..., None])[..., 0]


# ------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LoadedImage:
    """An input image: the path given, its key (path relative to the keying folder: its noise seed) and its
    (width, height)."""

    path: Path
    key: str
    size: tuple[int, int]


def open_image(path: str | os.PathLike[str], argument: str) -> tuple[Path, tuple[int, int]]:
    """Check that ``path`` is an image PIL reads; its (width, height). Errors name ``argument``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MatchInputError(f"argument {argument}: image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return path, (int(image.width), int(image.height))
    except (UnidentifiedImageError, OSError) as exc:
        raise MatchInputError(f"argument {argument}: cannot read image {path}: {exc}") from exc


def image_keys(paths: Sequence[Path], root: str | os.PathLike[str] | None) -> tuple[Path, list[str]]:
    """The folder the images are keyed from (``root``, default the images' common folder) and each image's
    path relative to it, ``/``-separated: the evaluation seeds each image's noise by this key."""
    resolved = [p.resolve() for p in paths]
    base = (
        Path(root).expanduser().resolve()
        if root is not None
        else Path(os.path.commonpath([p.parent for p in resolved]))
    )
    keys = []
    for path in resolved:
        try:
            keys.append(path.relative_to(base).as_posix())
        except ValueError as exc:
            raise MatchInputError(f"argument --root: image {path} is not inside {base}") from exc
    return base, keys


def _points_from_file(path: Path, argument: str) -> list[list[float]]:
    """Points of a JSON file (``[[x, y], ...]`` or ``{"points": [...]}``) or a CSV of x, y rows."""
    where = f"argument {argument}: {path}"
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MatchInputError(f"{where}: invalid JSON: {exc}") from exc
        data = data.get("points") if isinstance(data, dict) else data
        numbers = (int, float)
        if not isinstance(data, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, numbers) for v in p) for p in data
        ):
            raise MatchInputError(f'{where}: expected [[x, y], ...] or {{"points": [[x, y], ...]}} (numbers)')
        return [[float(x), float(y)] for x, y in data]
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [[c.strip() for c in row] for row in csv.reader(handle) if any(c.strip() for c in row)]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]  # a header
    text = ";".join(",".join(row) for row in rows)
    try:
        return parse_points_text(text, where)
    except ValueError as exc:
        raise MatchInputError(str(exc)) from exc


def _numeric(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def read_points(value: Any, argument: str, size: tuple[int, int], image: Path) -> np.ndarray:
    """(K, 2) points from ``"x1,y1;x2,y2"``, a JSON/CSV file or a sequence, each inside ``[0, W] x [0, H]``
    of ``image``; errors name ``argument``."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if path.suffix in (".json", ".csv") or path.is_file():
            if not path.is_file():
                raise MatchInputError(f"argument {argument}: points file not found: {path}")
            points = _points_from_file(path, argument)
        else:
            try:
                points = parse_points_text(str(value), f"argument {argument}")
            except ValueError as exc:
                raise MatchInputError(str(exc)) from exc
    else:
        points = value
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
        raise MatchInputError(f"argument {argument}: expected K >= 1 points (x, y), got shape {arr.shape}")
    width, height = size
    for i, (x, y) in enumerate(arr):
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= width and 0 <= y <= height):
            raise MatchInputError(
                f"argument {argument}: point {i} ({x:g}, {y:g}) lies outside the image {image} "
                f"({width} x {height}; x in [0, {width}], y in [0, {height}])"
            )
    return arr


def grid_points(n: int, size: tuple[int, int]) -> np.ndarray:
    """An ``n x n`` grid of cell centres inside a ``W x H`` image, ``((i + 0.5) W / n, (j + 0.5) H / n)``,
    row by row."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MatchInputError(f"argument --grid: must be a positive integer, got {n!r}")
    width, height = size
    ys, xs = np.meshgrid((np.arange(n) + 0.5) * height / n, (np.arange(n) + 0.5) * width / n, indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)


# ------------------------------------------------------------------------------------------------- result


@dataclass
class MatchResult:
    """Predicted target points (original target frame) of the source points, with a confidence each.

    ``target_points`` are those of ``method``; ``predictions`` holds every computed method's points.
    """

    source: LoadedImage
    target: LoadedImage
    source_points: np.ndarray
    method: str
    target_points: np.ndarray
    confidence: np.ndarray
    predictions: dict[str, np.ndarray]
    settings: dict[str, Any]
    ground_truth: np.ndarray | None = None

    def errors(self) -> np.ndarray | None:
        """Distance (pixels of the original target) of each prediction to its ground truth, if given."""
        if self.ground_truth is None:
            return None
        return np.linalg.norm(self.target_points - self.ground_truth, axis=1)

    def to_frame(self) -> pd.DataFrame:
        """One row per point: source x/y, target x/y, confidence (and ground truth, error when given)."""
        frame = pd.DataFrame(
            {
                "point": np.arange(len(self.source_points)),
                "source_x": self.source_points[:, 0],
                "source_y": self.source_points[:, 1],
                "target_x": self.target_points[:, 0],
                "target_y": self.target_points[:, 1],
                "confidence": self.confidence,
                "method": self.method,
            }
        )
        if self.ground_truth is not None:
            frame["gt_x"], frame["gt_y"] = self.ground_truth[:, 0], self.ground_truth[:, 1]
            frame["error_px"] = self.errors()
        return frame

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON object: images, settings, the confidence's definition, one entry per point."""
        matches = []
        errors = self.errors()
        for i, (src, trg, conf) in enumerate(
            zip(self.source_points, self.target_points, self.confidence, strict=True)
        ):
            entry: dict[str, Any] = {
                "source": src.tolist(),
                "target": trg.tolist(),
                "confidence": float(conf),
            }
            if self.ground_truth is not None and errors is not None:
                entry |= {"ground_truth": self.ground_truth[i].tolist(), "error_px": float(errors[i])}
            matches.append(entry)
        return {
            "source": {"path": str(self.source.path), "key": self.source.key, "size": list(self.source.size)},
            "target": {"path": str(self.target.path), "key": self.target.key, "size": list(self.target.size)},
            "method": self.method,
            "frame": "pixels of the original images (x right, y down)",
            "confidence": CONFIDENCE_DEFINITION,
            "settings": self.settings,
            "matches": matches,
            "predictions": {m: p.tolist() for m, p in self.predictions.items()},
        }


# ------------------------------------------------------------------------------------------------ matcher


class _OnTheFlyDino:
    """DINOv2 tokens of the request's images, stored like the token cache (float16) and served by image key
    as ``caches.DinoCache`` serves them to ``conditional_feature_batches``."""

    def __init__(self, model: Any, processor: Any, root: Path, keys: Sequence[str]) -> None:
        from sd4match.caches import dino_features, image_key
        from sd4match.datasets import load_image

        self._tokens: dict[str, torch.Tensor] = {}
        self._global: dict[str, torch.Tensor] = {}
        for key in dict.fromkeys(keys):
            with torch.no_grad():
                tokens, global_ = dino_features(model, processor, [load_image(root, key)])
            name = image_key(key, False)
            self._tokens[name] = tokens[0].detach().to("cpu", torch.float16)
            self._global[name] = global_[0].detach().to("cpu", torch.float16)

    def tokens(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._tokens[key] for key in keys]).float()

    def global_(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._global[key] for key in keys]).float()


@dataclass
class Matcher:
    """Models, prompt and settings loaded once (``match_models.load_setup``); ``match`` runs one pair."""

    setup: MatchSetup

    @classmethod
    def from_request(cls, **request: Any) -> Matcher:
        """Load what ``request`` (``match_models.MatchRequest`` fields) asks for."""
        return cls(load_setup(**request))

    def match(
        self,
        source: str | os.PathLike[str],
        target: str | os.PathLike[str],
        points: Any = None,
        grid: int | None = None,
        ground_truth: Any = None,
    ) -> MatchResult:
        """Match ``points`` (or an ``n x n`` grid) of the source image into the target image."""
        s = self.setup
        src_path, src_size = open_image(source, "source")
        trg_path, trg_size = open_image(target, "target")
        if (points is None) == (grid is None):
            raise MatchInputError("arguments --points / --grid: give exactly one of them")
        src_points = (
            grid_points(grid, src_size)
            if grid is not None
            else read_points(points, "--points", src_size, src_path)
        )
        gt = None if ground_truth is None else read_points(ground_truth, "--gt", trg_size, trg_path)
        if gt is not None and len(gt) != len(src_points):
            raise MatchInputError(f"argument --gt: {len(gt)} points for {len(src_points)} source points")
        root, (src_key, trg_key) = image_keys([src_path, trg_path], s.root)
        row = _pair_row(s, src_key, trg_key, src_size, trg_size, src_points, gt)
        pairs = pd.DataFrame([row])
        src_feat, trg_feat, predicted = self._predict(pairs, root)
        src_s = to_squashed_frame(
            torch.tensor(src_points, dtype=torch.float32), *src_size, s.settings.image_size
        )
        corr = correlation(
            sample_descriptors(
                src_feat[None].float(), src_s[None].to(src_feat.device), s.settings.image_size
            ),
            trg_feat[None].float(),
        )
        confidence = kernel_softmax_confidence(corr, s.settings.kernel_sigma, s.settings.temperature)[0]
        predictions = {
            m: from_squashed_frame(p, trg_size[0], trg_size[1], s.settings.image_size)
            for m, p in predicted.items()
        }
        return MatchResult(
            source=LoadedImage(src_path, src_key, src_size),
            target=LoadedImage(trg_path, trg_key, trg_size),
            source_points=src_points,
            method=s.method,
            target_points=predictions[s.method],
            confidence=confidence.detach().cpu().double().numpy(),
            predictions=predictions,
            settings=s.describe() | {"root": str(root), "pair_id": row["pair_id"]},
            ground_truth=gt,
        )

    def _predict(
        self, pairs: pd.DataFrame, root: Path
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(source features, target features, S-frame predictions per method) of the one-row table."""
        s = self.setup
        if s.module is not None and not s.module.per_image:
            row = next(pairs.itertuples())
            dino = _OnTheFlyDino(s.dino_model, s.dino_processor, root, [row.src_image, row.trg_image])
            source = ConditionalFeatures(
                s.module, s.featurizer, dino, root, s.settings.image_size, s.timestep, s.ensemble, s.seed, 1
            )
            batches = conditional_feature_batches(pairs, source)
            chunk, src_feats, trg_feats = next(iter(batches))
            return src_feats[0], trg_feats[0], predict_pairs(chunk, src_feats, trg_feats, s.settings)[0]
        bank: dict[ImageKey, torch.Tensor] = {}
        base = sd_text_prompt_features(
            s.featurizer, s.prompt_source, root, s.settings.image_size, s.timestep, s.ensemble, s.seed
        )
        features_for = _recording(base, bank)
        rows, _, predictions = next(iter_predictions(pairs, features_for, s.settings))
        src_key, trg_key = (ImageKey(rows[0].src_image, False, rows[0].category),
                            ImageKey(rows[0].trg_image, False, rows[0].category))  # fmt: skip
        return bank[src_key], bank[trg_key], predictions[0]


def _recording(features_for: Callable, bank: dict[ImageKey, torch.Tensor]) -> Callable:
    """``features_for`` that also keeps each image's features in ``bank`` (for the confidence)."""

    def recorded(keys: Sequence[ImageKey]) -> torch.Tensor:
        feats = features_for(keys)
        bank.update(zip(keys, feats, strict=True))
        return feats

    return recorded


def _pair_row(
    setup: MatchSetup,
    src_key: str,
    trg_key: str,
    src_size: tuple[int, int],
    trg_size: tuple[int, int],
    points: np.ndarray,
    gt: np.ndarray | None,
) -> dict[str, Any]:
    """The pair as one row of the normalised pairs table. Without ground truth, ``trg_kps`` repeats the
    source points: the evaluation functions derive a PCK threshold from them, which ``match`` never uses."""
    return {
        "pair_id": setup.pair_id or f"{src_key}|{trg_key}",
        "dataset": "match",
        "split": "test",
        "category": setup.category,
        "src_image": src_key,
        "trg_image": trg_key,
        "src_width": src_size[0],
        "src_height": src_size[1],
        "trg_width": trg_size[0],
        "trg_height": trg_size[1],
        "src_kps": points.tolist(),
        "trg_kps": (points if gt is None else gt).tolist(),
        "src_bbox": None,
        "trg_bbox": None,
        "flip": False,
        "n_kps": len(points),
        "threshold_kind": "img",
    }


def match(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    points: Any = None,
    *,
    grid: int | None = None,
    ground_truth: Any = None,
    **request: Any,
) -> MatchResult:
    """Match ``points`` of ``source`` (``"x1,y1;x2,y2"``, a JSON/CSV file, a (K, 2) sequence, or ``grid=N``)
    into ``target``; ``request`` holds the ``match_models.MatchRequest`` fields (``prompt`` or ``text``,
    ``demo``, ``config``, ``method``, ``timestep``, ...). Loads the models on each call: use ``Matcher`` for
    many pairs."""
    return Matcher.from_request(**request).match(source, target, points, grid, ground_truth)


__all__ = [
    "CONFIDENCE_DEFINITION",
    "MATCHING_METHODS",
    "MatchInputError",
    "MatchResult",
    "Matcher",
    "MatchingSettings",
    "grid_points",
    "kernel_softmax_confidence",
    "match",
    "read_points",
]
