"""What one prompt-tuning run is: its settings (paper Sec. 4.1) and the job (settings, inputs, outputs) that
runs in-process or under ``accelerate launch``, serialised as ``<out_dir>/job.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sd4match.io import write_json_atomic
from sd4match.prompt_learning import VARIANTS

PRECISIONS = ("fp16", "bf16", "fp32")
# What one optimiser step averages the gradient over (docs/TRAINING.md): "paper", batch_size pairs (the paper
# text's batch 9); "authors_code", per_device_batch pairs: the released scripts' DDP is bypassed, each of the
# 3 GPUs trained its own copy on its 3 pairs and rank 0's copy was validated and saved. A run with
# "authors_code" is that rank-0 copy: the pair stream and epochs of the 3-GPU run, the first
# per_device_batch pairs of each step's batch_size, in one process.
BATCH_SEMANTICS = ("paper", "authors_code")
VAL_EPOCH = "epoch"
AUTO = "auto"  # per_device_batch chosen from the device's memory (sd4match.training_memory)
CHECKPOINT_NAME = "checkpoint.pt"
JOB_NAME = "job.json"
# Metadata keys the trainer writes into the saved prompt's sidecar; job.metadata must not use them.
RESERVED_METADATA = (
    "variant",
    "training_set",
    "step",
    "val_pck",
    "val_pairs",
    "val_timestep",
    "effective_batch",
    "batch_semantics",
    "steps_done",
    "skipped_steps",
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

    ``batch_size`` is the number of pairs drawn per step; with ``batch_semantics="paper"`` every one of them
    enters the step's gradient, over all processes and gradient-accumulation steps (``batch_size =
    per_device_batch x num_processes x accumulation``); with ``"authors_code"`` only the first
    ``per_device_batch`` do (rank 0's share of the authors' 3-GPU run, one process). ``per_device_batch`` is a
    number or ``"auto"`` (paper semantics only: the largest that fits the device,
    ``training_memory.resolve_per_device_batch``; it never changes the result). ``val_every`` is a number of
    steps or ``"epoch"`` (ceil(N / batch_size) steps, the authors' choice); validation runs at
    ``val_timestep`` (261, the training timestep, as the authors validate).
    """

    variant: str
    steps: int = 30000
    batch_size: int = 9
    per_device_batch: int | str = 3
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
    batch_semantics: str = "paper"

    def __post_init__(self) -> None:
        bad = self._bad_fields()
        if bad:
            raise ValueError("TrainSettings: " + "; ".join(bad))
        if self.per_device_batch != AUTO and self.batch_size % self.per_device_batch:
            raise ValueError(
                f"TrainSettings: batch_size ({self.batch_size}) must be a multiple of per_device_batch "
                f"({self.per_device_batch})"
            )

    def _bad_fields(self) -> list[str]:
        """One message per invalid field."""
        bad = []
        if self.variant not in VARIANTS:
            bad.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if not _positive_int(getattr(self, name)):
                bad.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.per_device_batch != AUTO and not _positive_int(self.per_device_batch):
            bad.append(
                f"per_device_batch must be a positive integer or {AUTO!r}, got {self.per_device_batch!r}"
            )
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
        if self.batch_semantics not in BATCH_SEMANTICS:
            bad.append(f"batch_semantics must be one of {BATCH_SEMANTICS}, got {self.batch_semantics!r}")
        elif self.batch_semantics == "authors_code" and self.per_device_batch == AUTO:
            bad.append(
                "per_device_batch must be a number with batch_semantics 'authors_code' (it is the effective "
                "batch there, the authors' 3), not 'auto'"
            )
        return bad

    @property
    def effective_batch(self) -> int:
        """Pairs whose gradient one optimiser step averages: batch_size (paper) or per_device_batch."""
        return self.batch_size if self.batch_semantics == "paper" else int(self.per_device_batch)

    def pairs_per_process(self, num_processes: int) -> int:
        """Pairs each process computes per optimiser step: ``batch_size / num_processes`` (paper), or the
        ``per_device_batch`` pairs of the one ``authors_code`` process."""
        if self.batch_semantics == "authors_code":
            self._check_authors_code(num_processes)
            return int(self.per_device_batch)
        if not _positive_int(num_processes) or self.batch_size % num_processes:
            raise ValueError(
                f"TrainSettings: batch_size ({self.batch_size}) must be split evenly over num_processes "
                f"({num_processes})"
            )
        return self.batch_size // num_processes

    def _check_authors_code(self, num_processes: int) -> None:
        if num_processes != 1:
            raise ValueError(
                f"TrainSettings: batch_semantics 'authors_code' trains one copy (rank 0 of the authors' "
                f"run) in one process, not {num_processes}; set the config's gpu.train to 1"
            )

    def accumulation_steps(self, num_processes: int) -> int:
        """Gradient-accumulation steps A with ``batch_size = per_device_batch x num_processes x A`` (paper);
        1 for ``authors_code``, which trains one copy in one process."""
        if self.batch_semantics == "authors_code":
            self._check_authors_code(num_processes)
            return 1
        if self.per_device_batch == AUTO:
            raise ValueError(
                "TrainSettings: per_device_batch is 'auto': choose it for the device first "
                "(sd4match.training_memory.resolve_per_device_batch)"
            )
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
