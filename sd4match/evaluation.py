"""Evaluate a feature extractor on a pairs table: match every source keypoint, score PCK per pair."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sd4match.caches import LatentCache, image_key
from sd4match.data_sources import read_location
from sd4match.datasets import load_image, read_pairs_table
from sd4match.matching import bbox_to_squashed_frame, match_all, match_in_bank, to_squashed_frame
from sd4match.metrics import PairScore, pck, pck_threshold, per_pair_frame
from sd4match.models import ModelRecord, read_model_record
from sd4match.predictions import PredictionLog
from sd4match.prompts import CategoryPromptEncoder, PromptSource, encode_prompt_pair

if TYPE_CHECKING:  # records of an evaluation job (evaluation_job imports this module)
    from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs

log = logging.getLogger(__name__)

DEFAULT_PAIR_BATCH = 32


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
    """How predictions are made and scored (protocol.md "Matching at test time" and "Evaluation protocol").

    ``pair_batch``: pairs whose correlations are computed in one batched call on the features' device
    (memory: pair_batch gathered target maps besides the category's maps); it does not change the results.
    """

    image_size: int
    methods: tuple[str, ...]
    alphas: tuple[float, ...]
    kernel_sigma: float = 7.0
    temperature: float = 0.04
    pair_batch: int = DEFAULT_PAIR_BATCH

    def __post_init__(self) -> None:
        if self.pair_batch < 1:
            raise ValueError(f"MatchingSettings.pair_batch must be >= 1, got {self.pair_batch}")

    @classmethod
    def from_config(
        cls,
        matching: Mapping[str, Any],
        image_size: int,
        alphas: Sequence[float],
        methods: Sequence[str] | None = None,
    ) -> MatchingSettings:
        """From the config's ``matching`` block (``kernel_sigma``, ``softmax_temperature`` and, unless
        ``methods`` is given, its ``methods``) at S = ``image_size`` and the PCK ``alphas``."""
        return cls(
            image_size=image_size,
            methods=tuple(matching["methods"] if methods is None else methods),
            alphas=tuple(alphas),
            kernel_sigma=matching["kernel_sigma"],
            temperature=matching["softmax_temperature"],
        )


def _pair_keys(row: Any) -> tuple[ImageKey, ImageKey]:
    flip = bool(row.flip)
    return ImageKey(row.src_image, flip, row.category), ImageKey(row.trg_image, flip, row.category)


PairTargets = tuple[torch.Tensor, torch.Tensor, float]
"""(source keypoints, target keypoints, PCK threshold) of one pair in the S frame (``_squashed_targets``)."""


def _squashed_targets(row: Any, size: int) -> PairTargets:
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


def _scores(
    row: Any,
    trg: torch.Tensor,
    threshold: float,
    predictions: dict[str, torch.Tensor],
    alphas: Sequence[float],
) -> list[PairScore]:
    """PCK counts of one pair's (K, 2) CPU predictions per method and alpha (float64, as ``metrics.pck``)."""
    scores = []
    for method, pred in predictions.items():
        correct = pck(pred, trg, threshold, alphas)
        scores.extend(
            PairScore(
                row.pair_id, row.category, method, alpha, len(trg), int(correct[alpha]), float(threshold)
            )
            for alpha in alphas
        )
    return scores


def score_predictions(
    row: Any, predictions: dict[str, torch.Tensor], settings: MatchingSettings
) -> list[PairScore]:
    """PCK of predicted target keypoints (S frame, one (K, 2) tensor per matching method) for one pair."""
    _, trg, threshold = _squashed_targets(row, settings.image_size)
    return _scores(row, trg, threshold, predictions, settings.alphas)


def _padded(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, K_max, 2) source points, zero-padded (the padded predictions are dropped)."""
    return torch.nn.utils.rnn.pad_sequence(list(sources), batch_first=True)


def _per_pair(
    sources: Sequence[torch.Tensor], batch: dict[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Batched (B, K_max, 2) predictions moved to the CPU once and cut into per-pair (K_i, 2) tensors."""
    on_cpu = {method: pred.cpu() for method, pred in batch.items()}
    return [{m: pred[i, : len(src)] for m, pred in on_cpu.items()} for i, src in enumerate(sources)]


def _predict(
    sources: Sequence[torch.Tensor],
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    settings: MatchingSettings,
) -> list[dict[str, torch.Tensor]]:
    """Every method's predictions for B pairs in one batched call on the features' device."""
    if src_feats.ndim != 4 or src_feats.shape != trg_feats.shape or src_feats.shape[0] != len(sources):
        raise ValueError(
            f"predict_pairs: expected {len(sources)} source and target maps (B, C, h, w) of one shape, "
            f"got {tuple(src_feats.shape)} and {tuple(trg_feats.shape)}"
        )
    batch = match_all(
        src_feats.float(),
        trg_feats.float(),
        _padded(sources),
        settings.image_size,
        settings.methods,
        temperature=settings.temperature,
        sigma=settings.kernel_sigma,
    )
    return _per_pair(sources, batch)


def predict_pairs(
    rows: Sequence[Any], src_feats: torch.Tensor, trg_feats: torch.Tensor, settings: MatchingSettings
) -> list[dict[str, torch.Tensor]]:
    """Predicted target keypoints (S frame) of B pairs for every method: one correlation per pair, all
    pairs in one call on the features' device, only the predictions moved to the CPU."""
    sources = [_squashed_targets(row, settings.image_size)[0] for row in rows]
    return _predict(sources, src_feats, trg_feats, settings)


def predict_pair(
    row: Any, src_feat: torch.Tensor, trg_feat: torch.Tensor, settings: MatchingSettings
) -> dict[str, torch.Tensor]:
    """Predicted target keypoints (S frame) of one pair for every matching method (CPU tensors)."""
    return predict_pairs([row], src_feat[None], trg_feat[None], settings)[0]


def _score_all(
    rows: Sequence[Any],
    targets: Sequence[PairTargets],
    predictions: Sequence[dict[str, torch.Tensor]],
    settings: MatchingSettings,
) -> list[PairScore]:
    """PairScores of B pairs from their ``_squashed_targets`` and per-pair CPU predictions."""
    return [
        score
        for row, (_, trg, threshold), preds in zip(rows, targets, predictions, strict=True)
        for score in _scores(row, trg, threshold, preds, settings.alphas)
    ]


def score_pairs(
    rows: Sequence[Any],
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    settings: MatchingSettings,
    predictions: PredictionLog | None = None,
) -> list[PairScore]:
    """Predict and score B pairs whose (B, C, h, w) features sit on the evaluation device (the predictions
    are recorded in ``predictions`` when given)."""
    targets = [_squashed_targets(row, settings.image_size) for row in rows]
    predicted = _predict([src for src, _, _ in targets], src_feats, trg_feats, settings)
    if predictions is not None:
        predictions.add(rows, predicted)
    return _score_all(rows, targets, predicted, settings)


def score_pair(
    row: Any,
    src_feat: torch.Tensor,
    trg_feat: torch.Tensor,
    settings: MatchingSettings,
    predictions: PredictionLog | None = None,
) -> list[PairScore]:
    """Predict the target keypoints of one pair with every matching method and score them."""
    return score_pairs([row], src_feat[None], trg_feat[None], settings, predictions)


def _predict_in_bank(
    rows: Sequence[Any],
    bank: torch.Tensor,
    unit_bank: torch.Tensor,
    index: dict[ImageKey, int],
    settings: MatchingSettings,
) -> tuple[list[PairTargets], list[dict[str, torch.Tensor]]]:
    """Targets and per-pair CPU predictions of B pairs of one feature bank (``matching.match_in_bank``)."""
    targets = [_squashed_targets(row, settings.image_size) for row in rows]
    sources = [src for src, _, _ in targets]
    batch = match_in_bank(
        bank,
        unit_bank,
        torch.tensor([index[_pair_keys(row)[0]] for row in rows]),
        torch.tensor([index[_pair_keys(row)[1]] for row in rows]),
        _padded(sources),
        settings.image_size,
        settings.methods,
        temperature=settings.temperature,
        sigma=settings.kernel_sigma,
    )
    return targets, _per_pair(sources, batch)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def iter_predictions(
    pairs: pd.DataFrame,
    features_for: FeatureFn,
    settings: MatchingSettings,
    device: str | torch.device | None = None,
) -> Iterator[tuple[Sequence[Any], list[PairTargets], list[dict[str, torch.Tensor]]]]:
    """Yield (rows, targets, predictions) per batch of ``settings.pair_batch`` pairs of one category.

    Features are computed once per distinct image of a category and stay on ``device`` (default: where
    ``features_for`` put them); each pair's correlation is computed once there, for every method.
    """
    for _, group in pairs.groupby("category", sort=False):
        keys = sorted({k for row in group.itertuples() for k in _pair_keys(row)}, key=str)
        bank = features_for(keys)
        bank = (bank if device is None else bank.to(device)).float()
        unit_bank = F.normalize(bank, dim=1)  # the target side of every correlation, once per image
        index = {key: i for i, key in enumerate(keys)}
        for rows in _chunks(list(group.itertuples()), settings.pair_batch):
            yield rows, *_predict_in_bank(rows, bank, unit_bank, index, settings)


def evaluate_pairs(
    pairs: pd.DataFrame,
    features_for: FeatureFn,
    settings: MatchingSettings,
    device: str | torch.device | None = None,
    predictions: PredictionLog | None = None,
) -> pd.DataFrame:
    """Score every pair (``iter_predictions``: features once per distinct image, matched on the device);
    the predicted points are recorded in ``predictions`` when given."""
    scores: list[PairScore] = []
    with tqdm(total=len(pairs), desc="pairs", unit="pair") as bar:
        for rows, targets, predicted in iter_predictions(pairs, features_for, settings, device):
            scores.extend(_score_all(rows, targets, predicted, settings))
            if predictions is not None:
                predictions.add(rows, predicted)
            bar.update(len(rows))
    return per_pair_frame(scores)


def image_seed(seed: int, key: ImageKey) -> int:
    """Per-image noise seed: results do not depend on batching or evaluation order."""
    return (seed * 1_000_003 + zlib.crc32(f"{key.path}|{int(key.flip)}".encode())) % (2**63)


def cache_keys(pairs: pd.DataFrame) -> list[str]:
    """Cache keys (``"<relpath>|<flip>"``) of the distinct images of a pairs table, sorted."""
    return sorted({image_key(k.path, k.flip) for row in pairs.itertuples() for k in _pair_keys(row)})


class ImageLatents:
    """Scaled VAE latent samples of images, ``latent_dist.sample()`` with eps from the caller's generator:
    from the test split's latent cache when one is given (no image loaded, no VAE pass), else the VAE on the
    loaded image. Both give the same latent (``caches.run_test_latent_cache``)."""

    def __init__(
        self, featurizer: Any, root: str | Path, image_size: int, cache: LatentCache | None = None
    ) -> None:
        self.featurizer, self.root, self.image_size, self.cache = featurizer, root, image_size, cache

    def __call__(self, key: ImageKey, generator: torch.Generator) -> torch.Tensor:
        """One latent (1, 4, S/8, S/8) float32 on the featurizer's device."""
        if self.cache is not None:
            return self.cache.sample(
                [image_key(key.path, key.flip)],
                self.featurizer.scaling_factor,
                generator,
                device=self.featurizer.device,
            )
        image = load_image(self.root, key.path, flip=key.flip)
        return self.featurizer.encode_latents(self.featurizer.preprocess([image], self.image_size), generator)


def sd_text_prompt_features(
    featurizer: Any,
    prompt: PromptSource,
    root: str | Path,
    image_size: int,
    timestep: int,
    ensemble: int,
    seed: int,
    latent_cache: LatentCache | None = None,
) -> FeatureFn:
    """A FeatureFn of SD features whose prompt depends only on each image's category.

    Serves text prompts (DIFT) and the per-image learned prompts (SD4Match-Single/Class) alike. Each distinct
    prompt is encoded once per job (``CategoryPromptEncoder``); latents come from ``latent_cache`` when given
    (``ImageLatents``); each image's generator draws its latent, then its noise; features stay on the
    featurizer's device.
    """
    conditioning = CategoryPromptEncoder(featurizer.text_encoder, prompt)
    latents = ImageLatents(featurizer, root, image_size, latent_cache)

    def features_for(keys: Sequence[ImageKey]) -> torch.Tensor:
        out = []
        for key in keys:
            with torch.no_grad():
                with featurizer.autocast():
                    hidden = conditioning([key.category])
                generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, key))
                latent = latents(key, generator)
                out.append(featurizer.extract_from_latents(latent, hidden, timestep, ensemble, generator)[0])
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

    def __init__(self, latents: ImageLatents, seed: int) -> None:
        self.sample, self.seed = latents, seed
        self.latents: dict[ImageKey, torch.Tensor] = {}

    def __call__(self, key: ImageKey) -> torch.Tensor:
        if key not in self.latents:
            generator = torch.Generator(device="cpu").manual_seed(image_seed(self.seed, key))
            self.latents[key] = self.sample(key, generator)[0]
        return self.latents[key]


@dataclass(frozen=True)
class ConditionalFeatures:
    """How SD4Match-CPM computes the features of test pairs, whose prompt depends on both images: the prompt
    module and SD featurizer, the images' DINOv2 tokens (``caches.DinoCache`` or any source with its
    ``tokens``/``global_``), the image root, S, the timestep, the ensemble size, the noise seed and
    ``pair_batch`` pairs per batched UNet call; latents from ``latent_cache`` when given (else the VAE)."""

    module: Any
    featurizer: Any
    dino: Any
    root: str | Path
    image_size: int
    timestep: int
    ensemble: int
    seed: int
    pair_batch: int
    latent_cache: LatentCache | None = None


def conditional_feature_batches(
    pairs: pd.DataFrame, source: ConditionalFeatures
) -> Iterator[tuple[list[Any], torch.Tensor, torch.Tensor]]:
    """Yield (rows, src_feats, trg_feats) for CPM pairs: ``source.pair_batch`` pairs per batched UNet call,
    features (B, C, s, s) on the featurizer's device; latents once per distinct image; a prompt shared by
    source and target is encoded once."""
    from sd4match.prompt_learning import PromptBatch

    featurizer, dino, seed = source.featurizer, source.dino, source.seed
    memo = _LatentMemo(ImageLatents(featurizer, source.root, source.image_size, source.latent_cache), seed)
    rows = list(pairs.itertuples())
    for start in tqdm(range(0, len(rows), source.pair_batch), desc="pair batches", unit="batch"):
        chunk = rows[start : start + source.pair_batch]
        keys = [_pair_keys(row) for row in chunk]
        src_names = [image_key(s.path, s.flip) for s, _ in keys]
        trg_names = [image_key(t.path, t.flip) for _, t in keys]
        batch = PromptBatch(
            categories=[row.category for row in chunk],
            src_tokens=dino.tokens(src_names).to(featurizer.device),
            trg_tokens=dino.tokens(trg_names).to(featurizer.device),
            src_global=dino.global_(src_names).to(featurizer.device),
            trg_global=dino.global_(trg_names).to(featurizer.device),
        )
        latents = torch.stack([memo(s) for s, _ in keys] + [memo(t) for _, t in keys])
        generator = torch.Generator(device="cpu").manual_seed(_chunk_seed(seed, [r.pair_id for r in chunk]))
        with torch.no_grad():
            src_embeds, trg_embeds = source.module.prompt_pair(batch)  # fp32 prompt module
            with featurizer.autocast():
                hidden = encode_prompt_pair(featurizer.text_encoder, src_embeds, trg_embeds)
            feats = featurizer.extract_from_latents(
                latents, hidden, source.timestep, source.ensemble, generator
            )
        yield chunk, feats[: len(chunk)], feats[len(chunk) :]


def conditional_pair_features(
    pairs: pd.DataFrame, source: ConditionalFeatures
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """Yield (row, src_feat, trg_feat) pair by pair from :func:`conditional_feature_batches`."""
    for chunk, src_feats, trg_feats in conditional_feature_batches(pairs, source):
        for i, row in enumerate(chunk):
            yield row, src_feats[i], trg_feats[i]


def evaluate_pairs_conditional(
    pairs: pd.DataFrame,
    source: ConditionalFeatures,
    settings: MatchingSettings,
    predictions: PredictionLog | None = None,
) -> pd.DataFrame:
    """Score pairs with per-pair (CPM) features; each UNet batch of pairs is matched in one device call."""
    if source.image_size != settings.image_size:
        raise ValueError(
            f"CPM features at S={source.image_size} scored in a frame of S={settings.image_size}: "
            "features and matching need one S"
        )
    scores: list[PairScore] = []
    for chunk, src_feats, trg_feats in conditional_feature_batches(pairs, source):
        scores.extend(score_pairs(chunk, src_feats, trg_feats, settings, predictions))
    return per_pair_frame(scores)


# Sidecar metadata keys naming the models a prompt was trained with, as ``training`` writes them.
PROMPT_MODEL_KEYS = {"sd_model": "Stable Diffusion", "dinov2_model": "DINOv2"}


def _check_prompt_model(
    prompt_path: str | Path, meta: dict[str, Any], key: str, record_path: str | Path | ModelRecord
) -> None:
    """The prompt's sidecar must record the model (``{"id", "revision"}``) of the record actually used (a
    record file, or the record of a local model folder)."""
    from sd4match.prompt_learning import sidecar_path

    if isinstance(record_path, ModelRecord):
        record, record_path = record_path, f"of the model folder {record_path.local_path}"
    else:
        record = read_model_record(record_path)
    side = sidecar_path(prompt_path)
    recorded = meta.get(key)
    if not isinstance(recorded, dict) or "revision" not in recorded:
        raise ValueError(
            f"prompt sidecar {side} records no {key!r} (the {PROMPT_MODEL_KEYS[key]} model it was trained "
            f"with), so it cannot be checked against model record {record_path}; retrain the prompt, or "
            f'record "{key}": {{"id": ..., "revision": ...}} in the sidecar\'s metadata'
        )
    if recorded["revision"] != record.revision_resolved:
        raise ValueError(
            f"prompt sidecar {side}: the prompt was trained with {PROMPT_MODEL_KEYS[key]} "
            f"{recorded.get('id')!r} revision {recorded['revision']!r}, but model record {record_path} is "
            f"{record.id!r} revision {record.revision_resolved!r}: evaluate it with the model it was trained "
            f"with, or retrain it with this one"
        )


def check_prompt_models(
    prompt_path: str | Path,
    sd_record_path: str | Path | ModelRecord,
    dino_record_path: str | Path | ModelRecord | None = None,
) -> dict[str, Any]:
    """Refuse a prompt trained with other models than the records used: its sidecar's ``sd_model`` (and, for
    CPM, ``dinov2_model``) revision must equal the record's; errors name the sidecar and the record. Records
    are files, or ``ModelRecord`` objects of local model folders. Returns the sidecar's metadata."""
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


def open_test_latents(
    cache_path: str | Path | None,
    record_path: str | Path,
    image_size: int,
    featurizer: Any,
    pairs: pd.DataFrame,
    pairs_path: str | Path,
) -> LatentCache | None:
    """The test split's latent cache checked against the evaluation (model revision, image size, the
    featurizer's VAE) and the pairs it scores; None without a cache (the VAE runs in the job)."""
    from sd4match.caches import open_latent_cache

    if cache_path is None:
        return None
    cache = open_latent_cache(cache_path, record_path, image_size, featurizer)
    cache.require(cache_keys(pairs), f"pairs table {pairs_path}")
    log.info("test latents from %s (%d images): no VAE pass in this job", cache_path, len(cache))
    return cache


@dataclass(frozen=True)
class PromptModels:
    """The model records a learned prompt is evaluated with (checked against its sidecar): the SD model's,
    and for CPM the DINOv2 model's with the test split's DINOv2 cache."""

    sd_record: str | Path
    dino_record: str | Path | None = None
    dino_cache: str | Path | None = None

    def __post_init__(self) -> None:
        if self.dino_cache is not None and self.dino_record is None:
            raise ValueError(
                f"DINOv2 cache {self.dino_cache} given without the DINOv2 model record to check it"
            )


def run_prompt_evaluation(
    prompt_path: str | Path,
    models: PromptModels,
    split: SplitInputs,
    evaluation: dict[str, Any],
    settings: JobSettings,
    outputs: JobOutputs,
) -> pd.DataFrame:
    """SD4Match with a learned prompt on one test set: per-image reuse for Single/Class, per pair for CPM
    (``evaluation``: the timestep, ensemble and CPM pair batch).

    ``split.latent_cache``: the test split's latent cache (``caches.run_test_latent_cache``), read instead of
    running the VAE (the same latents); None encodes each distinct image here. The predicted points go to
    ``outputs.predictions`` (parquet, ``sd4match.predictions``) when given.
    """
    from sd4match.caches import open_dino_cache
    from sd4match.features import load_sd_featurizer
    from sd4match.prompt_learning import load_prompt

    check_prompt_models(prompt_path, models.sd_record, models.dino_record)
    dino = None if models.dino_cache is None else open_dino_cache(models.dino_cache, models.dino_record)
    pairs = limit_pairs(read_pairs_table(split.pairs), settings.max_pairs)
    root = read_location(split.location).root
    record = read_model_record(models.sd_record)
    image_size, seed, device = settings.image_size, settings.seed, settings.device
    featurizer = load_sd_featurizer(record.local_path, settings.features, device)
    latents = open_test_latents(
        split.latent_cache, models.sd_record, image_size, featurizer, pairs, split.pairs
    )
    module, _ = load_prompt(prompt_path, featurizer.text_encoder, featurizer.tokenizer)
    module = module.to(device).eval()
    matching = settings.matching_settings()
    t, ensemble = evaluation["timestep"], evaluation["ensemble"]
    log.info("SD4Match-%s (%s) on %s: %d pairs", module.variant, prompt_path, split.pairs, len(pairs))
    predictions = outputs.prediction_log(image_size)
    if module.per_image:
        features_for = sd_text_prompt_features(
            featurizer, module, root, image_size, t, ensemble, seed, latents
        )
        per_pair = evaluate_pairs(pairs, features_for, matching, predictions=predictions)
    else:
        if dino is None:
            raise ValueError(
                f"prompt {prompt_path} is conditional (CPM) and needs a DINOv2 cache of the test images"
            )
        source = ConditionalFeatures(
            module, featurizer, dino, root, image_size, t, ensemble, seed, evaluation["pair_batch"], latents
        )
        per_pair = evaluate_pairs_conditional(pairs, source, matching, predictions)
    log.info("UNet passes: %d (%d latents)", featurizer.unet_passes, featurizer.unet_samples)
    return outputs.write(per_pair, predictions)
