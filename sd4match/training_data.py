"""What a prompt-tuning run trains on: pairs in the squashed S x S frame, batches, the deterministic pair
sampler, and the pairs tables, model records and caches a job reads (checked to cover every image)."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sd4match.caches import DinoCache, LatentCache, cache_meta, image_key, open_dino_cache
from sd4match.evaluation import ImageKey, limit_pairs
from sd4match.matching import to_squashed_frame
from sd4match.models import ModelRecord, read_model_record
from sd4match.prompt_learning import CPMConfig, cpm_config_from_dict
from sd4match.training_job import TrainJob

SEED_MODULUS = 2**62


@dataclass(frozen=True)
class TrainPair:
    """One pair as training uses it: image keys and keypoints in the squashed S x S frame (K, 2)."""

    pair_id: str
    category: str
    src: ImageKey
    trg: ImageKey
    src_kps: Tensor
    trg_kps: Tensor


@dataclass
class PairBatch:
    """B pairs, keypoints padded to the batch's largest K; ``valid`` (B, K) marks the real ones."""

    pair_ids: list[str]
    categories: list[str]
    src_keys: list[str]
    trg_keys: list[str]
    src_kps: Tensor
    trg_kps: Tensor
    valid: Tensor


def pair_image_keys(row: Any) -> tuple[ImageKey, ImageKey]:
    """Source and target ImageKey of a pairs-table row (the row's flip applies to both images)."""
    flip = bool(row.flip)
    return ImageKey(row.src_image, flip, row.category), ImageKey(row.trg_image, flip, row.category)


def cache_key(key: ImageKey) -> str:
    """The latent/DINOv2 cache key of an image: ``"<relpath>|<flip 0/1>"``."""
    return image_key(key.path, key.flip)


def squashed_pairs(pairs: pd.DataFrame, image_size: int) -> list[TrainPair]:
    """Training pairs with keypoints mapped to the S x S frame (flips are already in the table's points)."""
    out = []
    for row in pairs.itertuples():
        src, trg = pair_image_keys(row)
        src_kps = to_squashed_frame(
            torch.tensor(row.src_kps, dtype=torch.float32), row.src_width, row.src_height, image_size
        )
        trg_kps = to_squashed_frame(
            torch.tensor(row.trg_kps, dtype=torch.float32), row.trg_width, row.trg_height, image_size
        )
        out.append(TrainPair(str(row.pair_id), str(row.category), src, trg, src_kps, trg_kps))
    return out


def collate_pairs(pairs: Sequence[TrainPair], device: torch.device | str = "cpu") -> PairBatch:
    """Stack pairs into a PairBatch: keypoints zero-padded to the largest K with a valid mask."""
    if not pairs:
        raise ValueError("collate_pairs: no pairs")
    n_max = max(len(p.src_kps) for p in pairs)
    src = torch.zeros(len(pairs), n_max, 2)
    trg = torch.zeros(len(pairs), n_max, 2)
    valid = torch.zeros(len(pairs), n_max, dtype=torch.bool)
    for i, pair in enumerate(pairs):
        k = len(pair.src_kps)
        src[i, :k], trg[i, :k], valid[i, :k] = pair.src_kps, pair.trg_kps, True
    return PairBatch(
        pair_ids=[p.pair_id for p in pairs],
        categories=[p.category for p in pairs],
        src_keys=[cache_key(p.src) for p in pairs],
        trg_keys=[cache_key(p.trg) for p in pairs],
        src_kps=src.to(device),
        trg_kps=trg.to(device),
        valid=valid.to(device),
    )


class PairSampler:
    """Deterministic pair order: epoch e is ``randperm(N)`` from a generator seeded with ``seed + e``; pairs
    are taken in order across epoch boundaries. The state is the position in that endless sequence."""

    def __init__(self, n_pairs: int, seed: int) -> None:
        if n_pairs < 1:
            raise ValueError(f"PairSampler: need at least one training pair, got {n_pairs}")
        self.n_pairs, self.seed, self.position = n_pairs, seed, 0
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        """The pair order of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_pairs, generator=generator)

    def take(self, count: int) -> list[int]:
        """The next ``count`` pair indices."""
        out = []
        for position in range(self.position, self.position + count):
            epoch = position // self.n_pairs
            if epoch != self._epoch:
                self._epoch, self._order = epoch, self.permutation(epoch)
            out.append(int(self._order[position % self.n_pairs]))
        self.position += count
        return out

    def state_dict(self) -> dict[str, int]:
        """Position, pair count and seed (the count and seed must match on resume)."""
        return {"position": self.position, "n_pairs": self.n_pairs, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int], where: str) -> None:
        """Restore the position; a different pair count or seed raises naming ``where``."""
        if state["n_pairs"] != self.n_pairs or state["seed"] != self.seed:
            raise ValueError(
                f"{where}: the checkpoint's sampler has {state['n_pairs']} pairs / seed {state['seed']}, "
                f"this run {self.n_pairs} / {self.seed}; the training set changed, delete the checkpoint"
            )
        self.position = int(state["position"])


def pair_chunk_seed(seed: int, pair_ids: Sequence[str]) -> int:
    """Noise seed of a validation chunk of pairs (CPM), fixed by its pair ids."""
    return (seed * 1_000_003 + zlib.crc32("|".join(pair_ids).encode())) % SEED_MODULUS


# ----------------------------------------------------------------------------------------- the job's inputs


def _plain(value: Any) -> Any:
    """A pairs-table cell as plain JSON data (numpy arrays and scalars become lists and numbers)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def table_digest(pairs: pd.DataFrame) -> str:
    """sha256 of a pairs table's rows (columns in name order, values exact): the training data's identity."""
    columns = sorted(pairs.columns)
    rows = [[_plain(v) for v in row] for row in pairs[columns].itertuples(index=False, name=None)]
    text = json.dumps({"columns": columns, "rows": rows}, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def require_cached(cache: LatentCache | DinoCache, keys: Sequence[str]) -> None:
    """Every image key must be in the cache; the first missing one raises naming the cache file."""
    missing = [key for key in keys if key not in cache]
    if missing:
        raise ValueError(f"cache {cache.path} lacks {len(missing)} image(s), e.g. {missing[0]!r}; rebuild it")


def resolve_cpm_config(cpm: Mapping[str, Any] | None, dino: DinoCache, where: str) -> CPMConfig:
    """CPM config with ``dino_dim``/``n_patches`` taken from the DINOv2 cache where the dict leaves them out;
    given values that contradict the cache raise naming it."""
    n_patches, dino_dim = dino.tokens(dino.keys[:1]).shape[1:]
    data = {"dino_dim": int(dino_dim), "n_patches": int(n_patches), **dict(cpm or {})}
    config = cpm_config_from_dict(data, where)
    if config.dino_dim != dino_dim or (config.features == "local" and config.n_patches != n_patches):
        raise ValueError(
            f"{where}: CPM expects {config.n_patches} x {config.dino_dim} DINOv2 tokens but cache "
            f"{dino.path} holds {n_patches} x {dino_dim}"
        )
    return config


def class_categories(
    variant: str, categories: Sequence[str] | None, pairs: Sequence[pd.DataFrame]
) -> list[str] | None:
    """Categories of a Class prompt: the job's list (checked to cover every pair) or those of the pairs."""
    if variant != "class":
        return None
    seen = sorted({str(c) for table in pairs for c in table["category"]})
    if categories is None:
        return seen
    missing = sorted(set(seen) - set(categories))
    if missing:
        raise ValueError(
            f"TrainJob: categories {missing} of the training/validation pairs have no Class prompt"
        )
    return sorted(set(categories))


def record_summary(record: ModelRecord) -> dict[str, str]:
    """What a prompt sidecar and a run's identity record of a model: its id and resolved revision."""
    return {"id": record.id, "revision": record.revision_resolved}


def dataset_name(pairs: pd.DataFrame) -> str:
    """The dataset(s) of a pairs table, e.g. ``spair``."""
    return "+".join(sorted({str(d) for d in pairs["dataset"]}))


@dataclass
class TrainingData:
    """The inputs of one run: pairs tables (validation limited to val_max_pairs), their pairs in the S x S
    frame, the model records, the latent cache and (CPM) the DINOv2 cache with the resolved CPM config."""

    trn: pd.DataFrame
    val: pd.DataFrame
    train_pairs: list[TrainPair]
    val_pairs: list[TrainPair]
    sd_record: ModelRecord
    latents: LatentCache
    dino_record: ModelRecord | None
    dino: DinoCache | None
    cpm_config: CPMConfig | None
    categories: list[str] | None

    def inputs_identity(self) -> dict[str, Any]:
        """Content identities of everything read besides the settings: tables, caches, model revisions."""
        return {
            "pairs_trn": table_digest(self.trn),
            "pairs_val": table_digest(self.val),
            "sd_model": record_summary(self.sd_record),
            "latent_cache": self.latents.digest,
            "dinov2_model": None if self.dino_record is None else record_summary(self.dino_record),
            "dino_cache": None if self.dino is None else self.dino.digest,
        }


def load_training_data(job: TrainJob) -> TrainingData:
    """Read the job's pairs tables, model records and caches; every image must be cached."""
    from sd4match.datasets import read_pairs_table

    settings = job.settings
    size = settings.image_size
    trn = read_pairs_table(job.pairs_trn)
    val = limit_pairs(read_pairs_table(job.pairs_val), settings.val_max_pairs)
    train_pairs, val_pairs = squashed_pairs(trn, size), squashed_pairs(val, size)
    sd_record = read_model_record(job.sd_model)
    latents = LatentCache.load(job.latent_cache, cache_meta(sd_record, size, "latents"), source=job.sd_model)
    keys = [cache_key(k) for p in train_pairs + val_pairs for k in (p.src, p.trg)]
    require_cached(latents, keys)
    dino, dino_record, cpm_config = None, None, None
    if settings.variant == "cpm":
        dino_record = read_model_record(job.dinov2_model)
        dino = open_dino_cache(job.dino_cache, job.dinov2_model)
        require_cached(dino, keys)
        cpm_config = resolve_cpm_config(job.cpm, dino, f"TrainJob cpm (cache {job.dino_cache})")
    return TrainingData(
        trn=trn,
        val=val,
        train_pairs=train_pairs,
        val_pairs=val_pairs,
        sd_record=sd_record,
        latents=latents,
        dino_record=dino_record,
        dino=dino,
        cpm_config=cpm_config,
        categories=class_categories(settings.variant, job.categories, [trn, val]),
    )
