"""Evaluate a feature extractor on a pairs table: match every source keypoint, score PCK per pair."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from sd4match.data_sources import read_location
from sd4match.datasets import load_image, read_pairs_table
from sd4match.io import write_table_atomic
from sd4match.matching import bbox_to_squashed_frame, match_keypoints, to_squashed_frame
from sd4match.metrics import PairScore, pck, pck_threshold, per_pair_frame, summarise
from sd4match.models import load_stable_diffusion, read_model_record
from sd4match.prompts import PromptSource, encode_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageKey:
    """One distinct input image: its path (relative to the dataset root), flip flag and category."""

    path: str
    flip: bool
    category: str


FeatureFn = Callable[[Sequence[ImageKey]], torch.Tensor]
"""Maps image keys to L2-normalised feature maps (B, C, s, s)."""


@dataclass(frozen=True)
class MatchingSettings:
    """How predictions are made and scored (protocol.md "Matching at test time" and "Evaluation protocol")."""

    image_size: int
    methods: tuple[str, ...]
    alphas: tuple[float, ...]
    kernel_sigma: float = 7.0
    temperature: float = 0.04


def _pair_keys(row: Any) -> tuple[ImageKey, ImageKey]:
    flip = bool(row.flip)
    return ImageKey(row.src_image, flip, row.category), ImageKey(row.trg_image, flip, row.category)


def _squashed_targets(row: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Source and target keypoints in the S x S frame and the pair's PCK threshold there."""
    src = to_squashed_frame(
        torch.tensor(row.src_kps, dtype=torch.float32), row.src_width, row.src_height, size
    )
    trg = to_squashed_frame(
        torch.tensor(row.trg_kps, dtype=torch.float32), row.trg_width, row.trg_height, size
    )
    bbox = None
    if row.trg_bbox is not None:
        bbox = bbox_to_squashed_frame(
            torch.tensor(row.trg_bbox, dtype=torch.float32), row.trg_width, row.trg_height, size
        )
    return src, trg, pck_threshold(row.threshold_kind, trg_bbox=bbox, trg_kps=trg, image_size=size)


def score_predictions(
    row: Any, predictions: dict[str, torch.Tensor], settings: MatchingSettings
) -> list[PairScore]:
    """PCK of predicted target keypoints (S frame, one (K, 2) tensor per matching method) for one pair."""
    _, trg, threshold = _squashed_targets(row, settings.image_size)
    scores = []
    for method, pred in predictions.items():
        correct = pck(pred, trg, threshold, settings.alphas)
        scores.extend(
            PairScore(
                row.pair_id, row.category, method, alpha, len(trg), int(correct[alpha]), float(threshold)
            )
            for alpha in settings.alphas
        )
    return scores


def predict_pair(
    row: Any, src_feat: torch.Tensor, trg_feat: torch.Tensor, settings: MatchingSettings
) -> dict[str, torch.Tensor]:
    """Predicted target keypoints (S frame) of one pair for every matching method."""
    src, _, _ = _squashed_targets(row, settings.image_size)
    predictions = {}
    for method in settings.methods:
        kwargs: dict[str, float] = {}
        if method != "nn":
            kwargs["temperature"] = settings.temperature
        if method == "kernel_softmax":
            kwargs["sigma"] = settings.kernel_sigma
        predictions[method] = match_keypoints(
            src_feat[None].float(), trg_feat[None].float(), src[None], settings.image_size, method, **kwargs
        )[0]
    return predictions


def score_pair(
    row: Any, src_feat: torch.Tensor, trg_feat: torch.Tensor, settings: MatchingSettings
) -> list[PairScore]:
    """Predict the target keypoints of one pair with every matching method and score them."""
    return score_predictions(row, predict_pair(row, src_feat, trg_feat, settings), settings)


def evaluate_pairs(pairs: pd.DataFrame, features_for: FeatureFn, settings: MatchingSettings) -> pd.DataFrame:
    """Score every pair; features are computed once per distinct image within a category and reused."""
    scores: list[PairScore] = []
    with tqdm(total=len(pairs), desc="pairs", unit="pair") as bar:
        for _, group in pairs.groupby("category", sort=False):
            keys = sorted({k for row in group.itertuples() for k in _pair_keys(row)}, key=str)
            feats = dict(zip(keys, features_for(keys), strict=True))
            for row in group.itertuples():
                src_key, trg_key = _pair_keys(row)
                scores.extend(score_pair(row, feats[src_key], feats[trg_key], settings))
                bar.update(1)
    return per_pair_frame(scores)


def image_seed(seed: int, key: ImageKey) -> int:
    """Per-image noise seed: results do not depend on batching or evaluation order."""
    return (seed * 1_000_003 + zlib.crc32(f"{key.path}|{int(key.flip)}".encode())) % (2**63)


def sd_text_prompt_features(
    featurizer: Any,
    prompt: PromptSource,
    root: str | Path,
    image_size: int,
    timestep: int,
    ensemble: int,
    seed: int,
) -> FeatureFn:
    """A FeatureFn of SD features whose prompt depends only on each image's category.

    Serves text prompts (DIFT) and the per-image learned prompts (SD4Match-Single/Class) alike.
    """

    def features_for(keys: Sequence[ImageKey]) -> torch.Tensor:
        out = []
        for key in keys:
            image = load_image(root, key.path, flip=key.flip)
            pixels = featurizer.preprocess([image], image_size)
            with torch.no_grad():
                hidden = encode_sequence(
                    featurizer.text_encoder, prompt.embeddings([key.category]).to(featurizer.device)
                )
                generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, key))
                out.append(featurizer(pixels, hidden, timestep, ensemble, generator)[0].cpu())
        return torch.stack(out)

    return features_for


def limit_pairs(pairs: pd.DataFrame, max_pairs: int | None) -> pd.DataFrame:
    """The first ``max_pairs`` pairs (all when None), for quick partial evaluations."""
    return pairs if max_pairs is None else pairs.head(max_pairs)


def _chunk_seed(seed: int, pair_ids: Sequence[str]) -> int:
    """Noise seed of one batch of CPM pairs (fixed by the config's pair_batch)."""
    return (seed * 1_000_003 + zlib.crc32("|".join(pair_ids).encode())) % (2**63)


class _LatentMemo:
    """One VAE latent sample per distinct image, seeded per image and reused by every pair it appears in."""

    def __init__(self, featurizer: Any, root: str | Path, image_size: int, seed: int) -> None:
        self.featurizer, self.root, self.image_size, self.seed = featurizer, root, image_size, seed
        self.latents: dict[ImageKey, torch.Tensor] = {}

    def __call__(self, key: ImageKey) -> torch.Tensor:
        if key not in self.latents:
            pixels = self.featurizer.preprocess(
                [load_image(self.root, key.path, flip=key.flip)], self.image_size
            )
            generator = torch.Generator(device="cpu").manual_seed(image_seed(self.seed, key))
            self.latents[key] = self.featurizer.encode_latents(pixels, generator)[0]
        return self.latents[key]


def conditional_pair_features(
    pairs: pd.DataFrame,
    module: Any,
    featurizer: Any,
    dino_cache: Any,
    root: str | Path,
    image_size: int,
    timestep: int,
    ensemble: int,
    seed: int,
    pair_batch: int,
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Yield (row, src_feat, trg_feat) for pairs whose prompt depends on both images (CPM): ``pair_batch``
    pairs per batched UNet call; VAE latents are computed once per distinct image."""
    from sd4match.caches import image_key
    from sd4match.prompt_learning import PromptBatch

    memo = _LatentMemo(featurizer, root, image_size, seed)
    rows = list(pairs.itertuples())
    for start in tqdm(range(0, len(rows), pair_batch), desc="pair batches", unit="batch"):
        chunk = rows[start : start + pair_batch]
        keys = [_pair_keys(row) for row in chunk]
        src_names = [image_key(s.path, s.flip) for s, _ in keys]
        trg_names = [image_key(t.path, t.flip) for _, t in keys]
        batch = PromptBatch(
            categories=[row.category for row in chunk],
            src_tokens=dino_cache.tokens(src_names).to(featurizer.device),
            trg_tokens=dino_cache.tokens(trg_names).to(featurizer.device),
            src_global=dino_cache.global_(src_names).to(featurizer.device),
            trg_global=dino_cache.global_(trg_names).to(featurizer.device),
        )
        latents = torch.stack([memo(s) for s, _ in keys] + [memo(t) for _, t in keys])
        generator = torch.Generator(device="cpu").manual_seed(_chunk_seed(seed, [r.pair_id for r in chunk]))
        with torch.no_grad():
            src_embeds, trg_embeds = module.prompt_pair(batch)
            hidden = encode_sequence(featurizer.text_encoder, torch.cat([src_embeds, trg_embeds]))
            feats = featurizer.extract_from_latents(latents, hidden, timestep, ensemble, generator).cpu()
        for i, row in enumerate(chunk):
            yield row, feats[i], feats[len(chunk) + i]


def evaluate_pairs_conditional(
    pairs: pd.DataFrame,
    module: Any,
    featurizer: Any,
    dino_cache: Any,
    root: str | Path,
    settings: MatchingSettings,
    timestep: int,
    ensemble: int,
    seed: int,
    pair_batch: int,
) -> pd.DataFrame:
    """Score pairs with per-pair (CPM) features from :func:`conditional_pair_features`."""
    features = conditional_pair_features(
        pairs, module, featurizer, dino_cache, root, settings.image_size, timestep, ensemble, seed, pair_batch
    )
    scores: list[PairScore] = []
    for row, src_feat, trg_feat in features:
        scores.extend(score_pair(row, src_feat, trg_feat, settings))
    return per_pair_frame(scores)


# Sidecar metadata keys naming the models a prompt was trained with, as ``training`` writes them.
PROMPT_MODEL_KEYS = {"sd_model": "Stable Diffusion", "dinov2_model": "DINOv2"}


def _check_prompt_model(
    prompt_path: str | Path, meta: dict[str, Any], key: str, record_path: str | Path
) -> None:
    """The prompt's sidecar must record the model (``{"id", "revision"}``) of the record actually used."""
    from sd4match.prompt_learning import sidecar_path

    side = sidecar_path(prompt_path)
    recorded = meta.get(key)
    if not isinstance(recorded, dict) or "revision" not in recorded:
        raise ValueError(
            f"prompt sidecar {side} records no {key!r} (the {PROMPT_MODEL_KEYS[key]} model it was trained "
            f"with), so it cannot be checked against model record {record_path}; retrain the prompt, or "
            f'record "{key}": {{"id": ..., "revision": ...}} in the sidecar\'s metadata'
        )
    record = read_model_record(record_path)
    if recorded["revision"] != record.revision_resolved:
        raise ValueError(
            f"prompt sidecar {side}: the prompt was trained with {PROMPT_MODEL_KEYS[key]} "
            f"{recorded.get('id')!r} revision {recorded['revision']!r}, but model record {record_path} is "
            f"{record.id!r} revision {record.revision_resolved!r}: evaluate it with the model it was trained "
            f"with, or retrain it with this one"
        )


def check_prompt_models(
    prompt_path: str | Path, sd_record_path: str | Path, dino_record_path: str | Path | None = None
) -> dict[str, Any]:
    """Refuse a prompt trained with other models than the records used: its sidecar's ``sd_model`` (and, for
    CPM, ``dinov2_model``) revision must equal the record's; errors name the sidecar and the record. Returns
    the sidecar's metadata."""
    from sd4match.prompt_learning import read_sidecar

    data = read_sidecar(prompt_path)
    if data["variant"] == "cpm" and dino_record_path is None:
        raise ValueError(
            f"prompt {prompt_path} is conditional (CPM) and needs a DINOv2 cache of the test images and the "
            f"DINOv2 model record"
        )
    _check_prompt_model(prompt_path, data["metadata"], "sd_model", sd_record_path)
    if data["variant"] == "cpm":
        _check_prompt_model(prompt_path, data["metadata"], "dinov2_model", dino_record_path)
    return data["metadata"]


def run_prompt_evaluation(
    prompt_path: str | Path,
    pairs_path: str | Path,
    location_path: str | Path,
    model_record_path: str | Path,
    dino_cache_path: str | Path | None,
    dino_record_path: str | Path | None,
    evaluation: dict[str, Any],
    features: dict[str, Any],
    matching: dict[str, Any],
    alphas: Sequence[float],
    max_pairs: int | None,
    image_size: int,
    seed: int,
    device: str,
    per_pair_out: str | Path,
    summary_out: str | Path,
) -> pd.DataFrame:
    """SD4Match with a learned prompt on one test set: per-image reuse for Single/Class, per pair for CPM."""
    from sd4match.caches import open_dino_cache
    from sd4match.features import SDFeaturizer
    from sd4match.prompt_learning import load_prompt

    if dino_cache_path is not None and dino_record_path is None:
        raise ValueError(f"DINOv2 cache {dino_cache_path} given without the DINOv2 model record to check it")
    check_prompt_models(prompt_path, model_record_path, dino_record_path)
    dino = None if dino_cache_path is None else open_dino_cache(dino_cache_path, dino_record_path)
    pairs = limit_pairs(read_pairs_table(pairs_path), max_pairs)
    root = read_location(location_path).root
    record = read_model_record(model_record_path)
    components = load_stable_diffusion(record.local_path, device=device)
    module, _ = load_prompt(prompt_path, components.text_encoder, components.tokenizer)
    module = module.to(device).eval()
    autocast = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[features["precision"]]
    featurizer = SDFeaturizer(
        components,
        up_block_index=features["up_block_index"],
        device=device,
        autocast_dtype=autocast if device.startswith("cuda") else None,
        max_batch=features["max_unet_batch"],
    )
    settings = MatchingSettings(
        image_size=image_size,
        methods=tuple(matching["methods"]),
        alphas=tuple(alphas),
        kernel_sigma=matching["kernel_sigma"],
        temperature=matching["softmax_temperature"],
    )
    t, ensemble = evaluation["timestep"], evaluation["ensemble"]
    log.info("SD4Match-%s (%s) on %s: %d pairs", module.variant, prompt_path, pairs_path, len(pairs))
    if module.per_image:
        features_for = sd_text_prompt_features(featurizer, module, root, image_size, t, ensemble, seed)
        per_pair = evaluate_pairs(pairs, features_for, settings)
    else:
        if dino is None:
            raise ValueError(
                f"prompt {prompt_path} is conditional (CPM) and needs a DINOv2 cache of the test images"
            )
        per_pair = evaluate_pairs_conditional(
            pairs, module, featurizer, dino, root, settings, t, ensemble, seed, evaluation["pair_batch"]
        )
    log.info("UNet passes: %d (%d latents)", featurizer.unet_passes, featurizer.unet_samples)
    write_table_atomic(per_pair, per_pair_out)
    summary = summarise(per_pair)
    write_table_atomic(summary, summary_out)
    return summary
