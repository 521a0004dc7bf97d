"""SD4Match prompt tuning (paper Sec. 3.2-3.3, 4.1; protocol.md "Training" and "Loss").

Only the prompt module learns: the VAE, UNet and CLIP text encoder are frozen and DINOv2 is only seen through
its cache. Each optimiser step draws ``batch_size`` pairs from a deterministic sampler, samples one VAE latent
per image from the latent cache, adds one noise draw at t = 261, runs source and target images through the
truncated UNet in one batch with the prompt of ``module.prompt_pair`` and applies the Gaussian-window matching
loss in the squashed S x S frame. Adam at a constant learning rate; the best prompt by PCK@0.1 (nearest
neighbour) on the validation pairs is saved. Checkpoints hold every state a run depends on, so a killed run
resumes and ends with exactly the result of an uninterrupted one.

Randomness (all seeded from ``settings.seed``):
- pair order: epoch ``e`` is a permutation from a generator seeded with ``seed + e``; pairs are taken in
  order, ``batch_size`` per step, across epoch boundaries;
- latents and noise: a persistent ``torch.Generator`` (checkpointed) gives one seed per step; chunk ``j`` of
  the step (``per_device_batch`` pairs, chunks numbered over accumulation steps and processes) uses a
  generator seeded with ``step_seed + j`` for its latent samples and then its noise, so 1 GPU x 3
  accumulation steps and 3 GPUs draw the same numbers;
- validation: each image's latent (a posterior sample, as ``latent_dist.sample()`` at test time) and, for
  per-image prompts, its noise come from a generator seeded with ``evaluation.image_seed``; CPM pairs draw
  their noise from a generator seeded by the chunk's pair ids. Validation is therefore the same at every
  evaluation and independent of training randomness.

Multi-GPU runs go through ``accelerate launch`` (see ``launch``); only the prompt module and the optimiser are
prepared by accelerate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from sd4match.caches import DinoCache, LatentCache, cache_meta, image_key
from sd4match.config import config_hash
from sd4match.evaluation import ImageKey, MatchingSettings, image_seed, limit_pairs, score_pair
from sd4match.gpu import join_gpu_lease, lease_fds
from sd4match.io import atomic_path, write_json_atomic, write_table_atomic
from sd4match.loss import check_finite, matching_loss
from sd4match.matching import to_squashed_frame
from sd4match.models import ModelRecord, load_stable_diffusion, read_model_record
from sd4match.prompt_learning import (
    VARIANTS,
    CPMConfig,
    LearnedPrompt,
    PromptBatch,
    build_prompt_module,
    cpm_config_from_dict,
    save_prompt,
)
from sd4match.prompts import encode_sequence

log = logging.getLogger("sd4match.training")  # also when run as __main__ (accelerate launch -m)

PRECISIONS = ("fp16", "bf16", "fp32")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
ACCELERATE_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}
VAL_EPOCH = "epoch"
VAL_ALPHA = 0.1
VAL_METHOD = "nn"
CHECKPOINT_NAME = "checkpoint.pt"
JOB_NAME = "job.json"
CHECKPOINT_FORMAT = "sd4match-train-checkpoint"
CHECKPOINT_VERSION = 1
CURVE_COLUMNS = ("step", "loss", "val_pck")
# Settings that do not change what a run computes; a checkpoint stays valid when they change.
BOOKKEEPING_SETTINGS = ("checkpoint_every", "log_every")
# Metadata keys the trainer writes into the saved prompt's sidecar; job.metadata must not use them.
RESERVED_METADATA = (
    "variant",
    "training_set",
    "step",
    "val_pck",
    "val_pairs",
    "steps_done",
    "train_hash",
    "sd_model",
    "dinov2_model",
)
PATH_FIELDS = (
    "pairs_trn",
    "pairs_val",
    "sd_model",
    "latent_cache",
    "output",
    "curve",
    "out_dir",
    "dinov2_model",
    "dino_cache",
)
SEED_MODULUS = 2**62


# --------------------------------------------------------------------------------------------------- settings


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@dataclass
class TrainSettings:
    """Hyper-parameters of one prompt-tuning run (paper Sec. 4.1); the defaults are the paper's.

    ``batch_size`` is the number of pairs per optimiser step over all processes and gradient-accumulation
    steps: ``batch_size = per_device_batch x num_processes x accumulation``. ``val_every`` is a number of
    steps or ``"epoch"`` (one pass over the training pairs, the authors' choice).
    """

    variant: str
    steps: int = 30000
    batch_size: int = 9
    per_device_batch: int = 3
    lr: float = 1e-2
    lr_linear: float = 1e-3
    timestep: int = 261
    temperature: float = 0.04
    window: int = 7
    sigma: float = 1.5
    val_every: int | str = VAL_EPOCH
    val_timestep: int = 261
    val_max_pairs: int | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    image_size: int = 768
    precision: str = "fp16"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        bad = self._bad_fields()
        if bad:
            raise ValueError("TrainSettings: " + "; ".join(bad))
        if self.batch_size % self.per_device_batch:
            raise ValueError(
                f"TrainSettings: batch_size ({self.batch_size}) must be a multiple of per_device_batch "
                f"({self.per_device_batch})"
            )

    def _bad_fields(self) -> list[str]:
        """One message per invalid field."""
        bad = []
        if self.variant not in VARIANTS:
            bad.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("steps", "batch_size", "per_device_batch", "checkpoint_every", "log_every"):
            if not _positive_int(getattr(self, name)):
                bad.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lr", "lr_linear", "temperature", "sigma"):
            if not _positive_number(getattr(self, name)):
                bad.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("timestep", "val_timestep", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad.append(f"{name} must be a non-negative integer, got {value!r}")
        if not _positive_int(self.window) or self.window % 2 == 0:
            bad.append(f"window must be a positive odd integer, got {self.window!r}")
        if self.val_every != VAL_EPOCH and not _positive_int(self.val_every):
            bad.append(f"val_every must be a positive integer or {VAL_EPOCH!r}, got {self.val_every!r}")
        if self.val_max_pairs is not None and not _positive_int(self.val_max_pairs):
            bad.append(f"val_max_pairs must be a positive integer or None, got {self.val_max_pairs!r}")
        if not _positive_int(self.image_size) or self.image_size % 16:
            bad.append(f"image_size must be a positive multiple of 16, got {self.image_size!r}")
        if self.precision not in PRECISIONS:
            bad.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            bad.append(f"gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        return bad

    def accumulation_steps(self, num_processes: int) -> int:
        """Gradient-accumulation steps A with ``batch_size = per_device_batch x num_processes x A``."""
        per_round = self.per_device_batch * num_processes
        if num_processes < 1 or self.batch_size % per_round:
            raise ValueError(
                f"TrainSettings: batch_size ({self.batch_size}) must equal per_device_batch "
                f"({self.per_device_batch}) x num_processes ({num_processes}) x accumulation steps, but "
                f"{self.batch_size} is not divisible by {per_round}"
            )
        return self.batch_size // per_round

    def validation_interval(self, n_train_pairs: int) -> int:
        """Steps between validations: ``val_every``, or the steps of one epoch ceil(N / batch_size)."""
        if self.val_every == VAL_EPOCH:
            return max(1, math.ceil(n_train_pairs / self.batch_size))
        return int(self.val_every)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TrainSettings:
        """Settings from a mapping; unknown keys or bad values raise a ValueError naming ``where``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: training settings must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown training settings {unknown}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error


# -------------------------------------------------------------------------------------------------------- job


@dataclass
class TrainJob:
    """Everything one training run needs, serialisable to JSON so the same job runs in-process or under
    ``accelerate launch``. Paths (stored as str): pairs tables, model records, caches, outputs."""

    settings: TrainSettings
    pairs_trn: str
    pairs_val: str
    sd_model: str
    latent_cache: str
    output: str
    curve: str
    out_dir: str
    dinov2_model: str | None = None
    dino_cache: str | None = None
    cpm: dict[str, Any] | None = None
    categories: list[str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.settings, TrainSettings):
            raise ValueError(f"TrainJob: settings must be TrainSettings, got {type(self.settings).__name__}")
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(os.fspath(value)))
        variant = self.settings.variant
        if not str(self.output).endswith(".safetensors"):
            raise ValueError(f"TrainJob: output must be a .safetensors prompt file, got {self.output}")
        if not str(self.curve).endswith(".csv"):
            raise ValueError(f"TrainJob: curve must be a .csv file, got {self.curve}")
        if self.cpm is not None and variant != "cpm":
            raise ValueError(f"TrainJob: a CPM config was given for variant {variant!r}")
        if variant == "cpm" and (self.dino_cache is None or self.dinov2_model is None):
            raise ValueError("TrainJob: variant 'cpm' needs dino_cache and dinov2_model (DINOv2 tokens)")
        if self.categories is not None and (
            isinstance(self.categories, str) or not all(isinstance(c, str) for c in self.categories)
        ):
            raise ValueError(f"TrainJob: categories must be a list of names, got {self.categories!r}")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"TrainJob: metadata must be a dict, got {type(self.metadata).__name__}")
        clash = sorted(set(self.metadata) & set(RESERVED_METADATA))
        if clash:
            raise ValueError(f"TrainJob: metadata keys {clash} are written by the trainer; rename them")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as error:
            raise ValueError(f"TrainJob: metadata is not JSON-serialisable ({error})") from error

    @property
    def checkpoint_path(self) -> Path:
        """``<out_dir>/checkpoint.pt``."""
        return Path(self.out_dir) / CHECKPOINT_NAME

    @property
    def job_path(self) -> Path:
        """``<out_dir>/job.json``, next to the checkpoint."""
        return Path(self.out_dir) / JOB_NAME

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (settings nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TrainJob:
        """A job from ``to_dict`` output; unknown/missing keys or bad values raise naming ``where``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: a training job must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        required = [
            f.name
            for f in fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if unknown or missing:
            raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
        settings = TrainSettings.from_dict(data["settings"], f"{where} (settings)")
        try:
            return cls(**{**data, "settings": settings})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from error


def write_job(job: TrainJob, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the job as JSON (default ``<out_dir>/job.json``) atomically; returns the path."""
    target = Path(path) if path is not None else job.job_path
    write_json_atomic(target, job.to_dict())
    return target


def read_job(path: str | os.PathLike[str]) -> TrainJob:
    """Read a job written by ``write_job``; problems raise naming the file."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"training job {source} does not exist")
    try:
        data = json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"training job {source}: invalid JSON ({error})") from error
    return TrainJob.from_dict(data, f"training job {source}")


@dataclass
class TrainResult:
    """Outcome of a run: the selected step, its validation PCK@0.1 (percent), steps done, the prompt file."""

    best_step: int
    best_val_pck: float
    steps_done: int
    output: str


class TrainingStopped(RuntimeError):
    """Raised by the ``stop_after`` hook of ``train_prompt``: simulates a kill right after a step."""


# -------------------------------------------------------------------------------------------- pairs, sampler


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


# ------------------------------------------------------------------------------------------------ RNG states


def global_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python global RNG states, in types ``torch.load`` reads safely."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states saved by ``global_rng_state``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------- setup helpers


def require_frozen(modules: Mapping[str, nn.Module]) -> None:
    """Raise if any parameter of the frozen models requires a gradient (only the prompt may learn)."""
    for name, module in modules.items():
        trainable = [p_name for p_name, p in module.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"{name} must be frozen but {trainable[:3]} require gradients")


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


def class_categories(job: TrainJob, pairs: Sequence[pd.DataFrame]) -> list[str] | None:
    """Categories of a Class prompt: the job's list (checked to cover every pair) or those of the pairs."""
    if job.settings.variant != "class":
        return None
    seen = sorted({str(c) for table in pairs for c in table["category"]})
    if job.categories is None:
        return seen
    missing = sorted(set(seen) - set(job.categories))
    if missing:
        raise ValueError(
            f"TrainJob: categories {missing} of the training/validation pairs have no Class prompt"
        )
    return sorted(set(job.categories))


def require_cached(cache: LatentCache | DinoCache, keys: Sequence[str]) -> None:
    """Every image key must be in the cache; the first missing one raises naming the cache file."""
    missing = [key for key in keys if key not in cache]
    if missing:
        raise ValueError(f"cache {cache.path} lacks {len(missing)} image(s), e.g. {missing[0]!r}; rebuild it")


def _record_summary(record: ModelRecord) -> dict[str, str]:
    return {"id": record.id, "revision": record.revision_resolved}


def _dataset_name(pairs: pd.DataFrame) -> str:
    return "+".join(sorted({str(d) for d in pairs["dataset"]}))


# ---------------------------------------------------------------------------------------------------- trainer


@dataclass
class Progress:
    """What a checkpoint restores besides the tensors' owners: step, losses, validation PCKs, the best."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    val_pck: dict[int, float] = field(default_factory=dict)
    best_step: int = -1
    best_val_pck: float = -math.inf
    best_state: dict[str, Tensor] | None = None


class PromptTrainer:
    """One prompt-tuning run: frozen SD, a learned prompt, caches, the sampler and all RNG state."""

    def __init__(self, job: TrainJob, accelerator: Any = None) -> None:
        from accelerate import Accelerator, PartialState

        self.job, self.settings = job, job.settings
        cuda = torch.cuda.is_available()
        if accelerator is None:
            processes = PartialState(cpu=not cuda).num_processes
            accelerator = Accelerator(
                cpu=not cuda,
                mixed_precision=ACCELERATE_PRECISION[self.settings.precision] if cuda else "no",
                gradient_accumulation_steps=self.settings.accumulation_steps(processes),
            )
        self.accumulation = self.settings.accumulation_steps(accelerator.num_processes)
        if accelerator.gradient_accumulation_steps != self.accumulation:
            raise ValueError(
                f"accelerator has gradient_accumulation_steps={accelerator.gradient_accumulation_steps}, the "
                f"settings need {self.accumulation}"
            )
        self.accelerator = accelerator
        self.device = accelerator.device
        self._load_data()
        self._load_models()
        self.progress = Progress()
        self.sampler = PairSampler(len(self.train_pairs), self.settings.seed)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.val_interval = self.settings.validation_interval(len(self.train_pairs))

    # -- setup

    def _load_data(self) -> None:
        """Pairs tables (validation limited to val_max_pairs), records, caches; every image must be cached."""
        from sd4match.datasets import read_pairs_table

        job, size = self.job, self.settings.image_size
        self.trn = read_pairs_table(job.pairs_trn)
        self.val = limit_pairs(read_pairs_table(job.pairs_val), self.settings.val_max_pairs)
        self.train_pairs = squashed_pairs(self.trn, size)
        self.val_pairs = squashed_pairs(self.val, size)
        self.sd_record = read_model_record(job.sd_model)
        self.latents = LatentCache.load(job.latent_cache, cache_meta(self.sd_record, size, "latents"))
        keys = [cache_key(k) for p in self.train_pairs + self.val_pairs for k in (p.src, p.trg)]
        require_cached(self.latents, keys)
        self.dino, self.dino_record, self.cpm_config = None, None, None
        if self.settings.variant == "cpm":
            from transformers import AutoImageProcessor

            self.dino_record = read_model_record(job.dinov2_model)
            processor = AutoImageProcessor.from_pretrained(self.dino_record.local_path)
            self.dino = DinoCache.load(job.dino_cache, cache_meta(self.dino_record, None, "dino", processor))
            require_cached(self.dino, keys)
            self.cpm_config = resolve_cpm_config(job.cpm, self.dino, f"TrainJob cpm (cache {job.dino_cache})")
        self.categories = class_categories(job, [self.trn, self.val])

    def _load_models(self) -> None:
        """Frozen SD on the accelerator's device, the featurizer, the prompt module and Adam (prepared)."""
        from sd4match.features import SDFeaturizer

        components = load_stable_diffusion(self.sd_record.local_path, device=self.device)
        if self.settings.gradient_checkpointing:
            components.unet.enable_gradient_checkpointing()
        require_frozen(
            {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
        )
        self.components = components
        self.text_encoder = components.text_encoder
        self.featurizer = SDFeaturizer(
            components,
            device=self.device,
            autocast_dtype=AUTOCAST_DTYPES[self.settings.precision] if self.device.type == "cuda" else None,
            max_batch=2 * self.settings.per_device_batch,
        )
        self.scaling_factor = self.featurizer.scaling_factor
        module = build_prompt_module(
            self.settings.variant,
            components.text_encoder,
            components.tokenizer,
            categories=self.categories,
            cpm=self.cpm_config,
            seed=self.settings.seed,
        ).to(self.device)
        if not all(p.requires_grad for p in module.parameters()):
            raise RuntimeError(f"prompt module {module.variant}: every parameter must be trainable")
        optimizer = torch.optim.Adam(module.parameter_groups(self.settings.lr, self.settings.lr_linear))
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)

    @property
    def prompt_module(self) -> LearnedPrompt:
        """The bare prompt module (unwrapped from DDP / autocast wrappers)."""
        return self.accelerator.unwrap_model(self.module)

    def train_hash(self) -> str:
        """Hash of what determines the run's result (settings but bookkeeping, CPM config, categories)."""
        settings = {k: v for k, v in asdict(self.settings).items() if k not in BOOKKEEPING_SETTINGS}
        cpm = None if self.cpm_config is None else asdict(self.cpm_config)
        return config_hash({"settings": settings, "cpm": cpm, "categories": self.categories})

    # -- features and loss

    def prompt_batch(self, batch: PairBatch) -> PromptBatch:
        """PromptBatch of a pair batch, with cached DINOv2 tokens/descriptors when the prompt needs them."""
        if self.dino is None:
            return PromptBatch(batch.categories)
        return PromptBatch(
            batch.categories,
            src_tokens=self.dino.tokens(batch.src_keys, self.device),
            trg_tokens=self.dino.tokens(batch.trg_keys, self.device),
            src_global=self.dino.global_(batch.src_keys, self.device),
            trg_global=self.dino.global_(batch.trg_keys, self.device),
        )

    def pair_features(
        self,
        prompt_fn: Callable[[PromptBatch], tuple[Tensor, Tensor]],
        batch: PairBatch,
        latents: Tensor,
        t: int,
        generator: torch.Generator,
    ) -> tuple[Tensor, Tensor]:
        """Source and target features (B, C, s, s): both images in one UNet batch, one noise draw each."""
        src_embeds, trg_embeds = prompt_fn(self.prompt_batch(batch))
        hidden = encode_sequence(self.text_encoder, torch.cat([src_embeds, trg_embeds]))
        feats = self.featurizer.extract_from_latents(latents, hidden, t, ensemble=1, generator=generator)
        n = len(batch.categories)
        return feats[:n], feats[n:]

    def chunk_loss(self, pairs: Sequence[TrainPair], generator: torch.Generator) -> Tensor:
        """Matching loss (paper Eq. 5) of one chunk of pairs at the training timestep."""
        s = self.settings
        batch = collate_pairs(pairs, self.device)
        latents = self.latents.sample(batch.src_keys + batch.trg_keys, self.scaling_factor, generator)
        src_feat, trg_feat = self.pair_features(self.module, batch, latents, s.timestep, generator)
        return matching_loss(
            src_feat,
            trg_feat,
            batch.src_kps,
            batch.trg_kps,
            batch.valid,
            s.image_size,
            temperature=s.temperature,
            window=s.window,
            sigma=s.sigma,
        )

    def train_step(self, step: int) -> float:
        """One optimiser step over ``batch_size`` pairs; returns the batch's mean loss (all processes)."""
        s, acc = self.settings, self.accelerator
        indices = self.sampler.take(s.batch_size)
        step_seed = int(torch.randint(0, SEED_MODULUS, (1,), generator=self.generator))
        losses = []
        for micro in range(self.accumulation):
            chunk = micro * acc.num_processes + acc.process_index
            pairs = [
                self.train_pairs[i]
                for i in indices[chunk * s.per_device_batch : (chunk + 1) * s.per_device_batch]
            ]
            generator = torch.Generator().manual_seed(step_seed + chunk)
            with acc.accumulate(self.module):
                loss = self.chunk_loss(pairs, generator)
                acc.backward(loss)
            losses.append(loss.detach().float())
        step_loss = acc.reduce(torch.stack(losses).mean(), reduction="mean")
        check_finite(step_loss, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(step_loss)

    # -- validation

    def val_latent(self, key: ImageKey, generator: torch.Generator) -> Tensor:
        """A posterior sample (1, 4, S/8, S/8) of a validation image drawn from ``generator``."""
        return self.latents.sample([cache_key(key)], self.scaling_factor, generator)

    def image_feature(self, module: LearnedPrompt, key: ImageKey) -> Tensor:
        """Validation feature (C, s, s) of one image (per-image prompt); latent and noise seeded per image."""
        generator = torch.Generator().manual_seed(image_seed(self.settings.seed, key))
        latent = self.val_latent(key, generator)
        embeds = module.prompt_pair(PromptBatch([key.category]))[0]
        hidden = encode_sequence(self.text_encoder, embeds)
        feature = self.featurizer.extract_from_latents(
            latent, hidden, self.settings.val_timestep, 1, generator
        )
        return feature[0].cpu()

    def _val_score(self, row: Any, src_feat: Tensor, trg_feat: Tensor) -> float:
        """PCK@0.1 (percent, nearest neighbour) of one validation pair."""
        settings = MatchingSettings(self.settings.image_size, (VAL_METHOD,), (VAL_ALPHA,))
        return score_pair(row, src_feat, trg_feat, settings)[0].pck

    def _validate_per_image(self, module: LearnedPrompt) -> tuple[float, int]:
        """Sum and count of pair PCKs, features once per distinct image (categories split over processes)."""
        total, count = 0.0, 0
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        for index, (_, group) in enumerate(self.val.groupby("category", sort=False)):
            if index % world != rank:
                continue
            rows = list(group.itertuples())
            keys = sorted({k for row in rows for k in pair_image_keys(row)}, key=str)
            feats = {key: self.image_feature(module, key) for key in keys}
            for row in rows:
                src, trg = pair_image_keys(row)
                total += self._val_score(row, feats[src], feats[trg])
                count += 1
        return total, count

    def _validate_pairs(self, module: LearnedPrompt) -> tuple[float, int]:
        """Sum and count of pair PCKs with a prompt per pair (CPM), chunks split over processes."""
        total, count, size = 0.0, 0, self.settings.per_device_batch
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rows = list(self.val.itertuples())
        for index, start in enumerate(range(0, len(rows), size)):
            if index % world != rank:
                continue
            pairs = self.val_pairs[start : start + size]
            batch = collate_pairs(pairs, self.device)
            keys = [p.src for p in pairs] + [p.trg for p in pairs]
            latents = torch.cat(
                [
                    self.val_latent(k, torch.Generator().manual_seed(image_seed(self.settings.seed, k)))
                    for k in keys
                ]
            )
            generator = torch.Generator().manual_seed(pair_chunk_seed(self.settings.seed, batch.pair_ids))
            src, trg = self.pair_features(
                module.prompt_pair, batch, latents, self.settings.val_timestep, generator
            )
            for i, row in enumerate(rows[start : start + size]):
                total += self._val_score(row, src[i].cpu(), trg[i].cpu())
                count += 1
        return total, count

    @torch.no_grad()
    def validate(self) -> float:
        """Mean per-pair PCK@0.1 (percent, nearest neighbour) on the validation pairs at t = val_timestep."""
        module = self.prompt_module
        total, count = self._validate_per_image(module) if module.per_image else self._validate_pairs(module)
        summed = self.accelerator.reduce(
            torch.tensor([total, count], dtype=torch.float64, device=self.device)
        )
        return float(summed[0] / summed[1])

    def record_validation(self, step: int, pck: float) -> None:
        """Store a validation result; a strictly higher PCK becomes the best (ties keep the earlier step)."""
        progress = self.progress
        progress.val_pck[step] = pck
        if pck > progress.best_val_pck:
            progress.best_step, progress.best_val_pck = step, pck
            progress.best_state = {
                k: v.detach().cpu().clone() for k, v in self.prompt_module.state_dict().items()
            }

    # -- checkpoints and outputs

    def checkpoint(self) -> dict[str, Any]:
        """Every state the rest of the run depends on."""
        p = self.progress
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "train_hash": self.train_hash(),
            "step": p.step,
            "prompt": {k: v.detach().cpu().clone() for k, v in self.prompt_module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
            "rng": global_rng_state(),
            "losses": list(p.losses),
            "val_pck": dict(p.val_pck),
            "best": {"step": p.best_step, "val_pck": p.best_val_pck, "state": p.best_state},
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (main process), then the loss curve."""
        if self.accelerator.is_main_process:
            with atomic_path(self.job.checkpoint_path) as tmp:
                torch.save(self.checkpoint(), tmp)
            self.write_curve()
        self.accelerator.wait_for_everyone()

    def resume(self) -> bool:
        """Load ``<out_dir>/checkpoint.pt`` if present; a checkpoint of another configuration raises."""
        path = self.job.checkpoint_path
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} file")
        if state["train_hash"] != self.train_hash():
            raise ValueError(
                f"checkpoint {path} belongs to another training configuration (hash "
                f"{state['train_hash']}, this run {self.train_hash()}); delete it to start over"
            )
        self.prompt_module.load_state_dict(state["prompt"])
        self.optimizer.load_state_dict(state["optimizer"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"], f"checkpoint {path}")
        set_global_rng_state(state["rng"])
        best = state["best"]
        self.progress = Progress(
            step=int(state["step"]),
            losses=[float(v) for v in state["losses"]],
            val_pck={int(k): float(v) for k, v in state["val_pck"].items()},
            best_step=int(best["step"]),
            best_val_pck=float(best["val_pck"]),
            best_state=best["state"],
        )
        log.info("resumed from %s at step %d", path, self.progress.step)
        return True

    def curve(self) -> pd.DataFrame:
        """Loss curve: one row per step with the batch loss and the validation PCK@0.1 where validated."""
        p = self.progress
        rows = [
            {"step": i + 1, "loss": loss, "val_pck": p.val_pck.get(i + 1, math.nan)}
            for i, loss in enumerate(p.losses)
        ]
        return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))

    def write_curve(self) -> None:
        """Write the loss curve CSV atomically."""
        write_table_atomic(self.curve(), self.job.curve)

    def prompt_metadata(self) -> dict[str, Any]:
        """Sidecar metadata of the saved prompt: the job's metadata plus what the run selected and used."""
        p = self.progress
        return {
            **self.job.metadata,
            "variant": self.settings.variant,
            "training_set": _dataset_name(self.trn),
            "step": p.best_step,
            "val_pck": p.best_val_pck,
            "val_pairs": len(self.val),
            "steps_done": p.step,
            "train_hash": self.train_hash(),
            "sd_model": _record_summary(self.sd_record),
            "dinov2_model": None if self.dino_record is None else _record_summary(self.dino_record),
        }

    def save_best(self) -> None:
        """Save the best prompt with ``save_prompt`` to the job's output (main process)."""
        if self.accelerator.is_main_process:
            best = build_prompt_module(
                self.settings.variant,
                self.components.text_encoder,
                self.components.tokenizer,
                categories=self.categories,
                cpm=self.cpm_config,
                seed=self.settings.seed,
            )
            best.load_state_dict(self.progress.best_state)
            save_prompt(best, self.job.output, self.prompt_metadata())
        self.accelerator.wait_for_everyone()

    # -- loop

    def log_line(self, step: int, rate: float) -> None:
        """One progress line: step, loss, learning rates, steps/s and the last validation PCK."""
        p = self.progress
        lrs = ",".join(f"{group['lr']:g}" for group in self.optimizer.param_groups)
        last_val = f"{p.val_pck[max(p.val_pck)]:.2f}" if p.val_pck else "-"
        log.info(
            "step %d/%d loss %.4f lr %s %.2f steps/s val PCK@0.1 %s",
            step,
            self.settings.steps,
            p.losses[-1],
            lrs,
            rate,
            last_val,
        )

    def after_step(self, step: int) -> None:
        """Validation and checkpoint bookkeeping after optimiser step ``step``."""
        s = self.settings
        if step % self.val_interval == 0 or step == s.steps:
            self.record_validation(step, self.validate())
        if step % s.checkpoint_every == 0 or step == s.steps:
            self.save_checkpoint()

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train from the checkpoint (or from scratch) to ``settings.steps``, then save the best prompt."""
        s = self.settings
        self.resume()
        p = self.progress
        main = self.accelerator.is_main_process
        if main:
            log.info(
                "SD4Match-%s: %d training pairs, %d validation pairs, %d steps of %d pairs (%d process(es) x "
                "%d accumulation x %d), validation every %d steps",
                s.variant,
                len(self.train_pairs),
                len(self.val_pairs),
                s.steps,
                s.batch_size,
                self.accelerator.num_processes,
                self.accumulation,
                s.per_device_batch,
                self.val_interval,
            )
        self.module.train()
        started, last = time.monotonic(), p.step
        with tqdm(
            total=s.steps, initial=p.step, desc=f"train {s.variant}", unit="step", disable=not main
        ) as bar:
            for step in range(p.step + 1, s.steps + 1):
                loss = self.train_step(step)
                p.step = step
                p.losses.append(loss)
                self.after_step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if main and (step % s.log_every == 0 or step == s.steps):
                    self.log_line(step, (step - last) / max(time.monotonic() - started, 1e-9))
                    started, last = time.monotonic(), step
                if stop_after is not None and step == stop_after:
                    raise TrainingStopped(f"stopped after step {step} (stop_after hook)")
        if p.best_state is None:
            raise RuntimeError(f"training {self.job.out_dir}: no validation ran, nothing to save")
        self.save_best()
        if main:
            self.write_curve()
            log.info("best step %d: val PCK@0.1 %.2f -> %s", p.best_step, p.best_val_pck, self.job.output)
        return TrainResult(p.best_step, p.best_val_pck, p.step, str(self.job.output))


def train_prompt(job: TrainJob, accelerator: Any = None, *, stop_after: int | None = None) -> TrainResult:
    """Train (or resume) the prompt of ``job`` and save the best one by validation PCK@0.1 to ``job.output``.

    ``stop_after`` is a test hook: raise ``TrainingStopped`` right after that step (simulates a kill).
    """
    return PromptTrainer(job, accelerator).run(stop_after=stop_after)


# ----------------------------------------------------------------------------------------------------- launch


def free_port() -> int:
    """A free TCP port for the rendezvous of a multi-GPU launch (concurrent jobs must not share one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(job_path: str | os.PathLike[str], n_gpus: int, precision: str) -> list[str]:
    """``accelerate launch`` command running ``python -m sd4match.training <job.json>`` on ``n_gpus`` GPUs."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(n_gpus),
        "--num_machines",
        "1",
        "--mixed_precision",
        ACCELERATE_PRECISION[precision],
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "sd4match.training",
        str(job_path),
    ]


def _run_streaming(command: list[str]) -> None:
    """Run ``command``, copying its output line by line to ``sys.stderr`` (the job log); raise on failure."""
    log.info("running %s", " ".join(command))
    with subprocess.Popen(  # pass_fds: the child shares the job's GPU locks, which then outlive this process
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=lease_fds()
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)


def launch(job_path: str | os.PathLike[str], n_gpus: int) -> TrainResult | None:
    """Run the job on ``n_gpus`` GPUs (the rule's gpu resource): ``accelerate launch`` when n_gpus > 1 and
    CUDA is available, else in this process. Returns the result of an in-process run."""
    job = read_job(job_path)
    if n_gpus > 1 and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible < n_gpus:
            raise ValueError(f"launch {job_path}: {n_gpus} GPUs requested but only {visible} visible")
        _run_streaming(launch_command(job_path, n_gpus, job.settings.precision))
        return None
    return train_prompt(job)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sd4match.training <job.json>``: run one training job (each accelerate process runs it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sd4match.training <job.json>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    join_gpu_lease()  # accelerate's workers do not inherit the job's lock fds: take a share
    train_prompt(read_job(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
