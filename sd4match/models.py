"""Model registry: a hub id + revision or a local folder, resolved to a folder with a recorded revision.

Hub models disappear (SD 1-5 in 2024, SD 2-1 in Nov 2025), so every run records which revision it used and
any model can be replaced by a local folder in the hub layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import (
    AutoImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    Dinov2Model,
    ViTModel,
)

from sd4match.io import write_json_atomic

MODEL_KINDS = ("stable_diffusion", "dinov2", "dino", "clip_vision")
SOURCES = ("local", "hub")
SHORT_HASH_LENGTH = 16
FINGERPRINT_BYTES = 1 << 20
TEXT_SUFFIXES = (".json", ".txt")
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_STRINGS = ("1", "true", "yes", "on")

SD_CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
)
TRANSFORMERS_CONFIG_FILES = ("config.json", "preprocessor_config.json")
# Weight files per kind: (safetensors name, fallback PyTorch pickle name).
WEIGHT_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "stable_diffusion": (
        ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
        ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
    ),
    "dinov2": (("model.safetensors", "pytorch_model.bin"),),
    "dino": (("model.safetensors", "pytorch_model.bin"),),
    "clip_vision": (("model.safetensors", "pytorch_model.bin"),),
}


class ModelUnavailableError(FileNotFoundError):
    """A hub model that is neither reachable nor cached (the message says how to use a local folder)."""


@dataclass
class ModelSpec:
    """What the config asks for: a name, a hub id or local folder, the model kind and a hub revision."""

    name: str
    id: str
    kind: str
    revision: str = "main"

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model {self.name!r}: kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if not self.id:
            raise ValueError(f"model {self.name!r}: empty id (give a hub id or a local folder)")


@dataclass
class ModelRecord:
    """What a run actually used: the resolved revision (hub commit or folder hash) and the local folder."""

    name: str
    id: str
    revision_requested: str
    revision_resolved: str
    local_path: str
    source: str


@dataclass
class SDComponents:
    """The frozen Stable Diffusion parts SD4Match needs (no pipeline object)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler


def is_local_id(model_id: str) -> bool:
    """True when ``model_id`` names an existing folder (a local model) rather than a hub repo id."""
    return Path(model_id).expanduser().is_dir()


def looks_like_path(model_id: str) -> bool:
    """True when ``model_id`` cannot be a hub id ``org/name`` (leading / . ~, a backslash, 2+ slashes)."""
    return model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1


def offline_from_env() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value, read at call time."""
    return any(os.environ.get(name, "").strip().lower() in TRUE_STRINGS for name in OFFLINE_ENV_VARS)


def folder_revision(folder: str | os.PathLike[str]) -> str:
    """Short sha256 over a local model folder: full content of its json/txt files, size and ends of the rest.

    Weights are fingerprinted (size, first and last MiB), not hashed whole, to stay fast on 5 GB folders.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(root))):
        digest.update(str(path.relative_to(root).as_posix()).encode() + b"\0")
        if path.suffix in TEXT_SUFFIXES:
            digest.update(path.read_bytes())
        else:
            digest.update(_fingerprint(path))
        digest.update(b"\0")
    return digest.hexdigest()[:SHORT_HASH_LENGTH]


def _is_hidden(relative: Path) -> bool:
    """True for dot-files and anything inside dot-folders (e.g. ``.cache``), which are not model content."""
    return any(part.startswith(".") for part in relative.parts)


def _fingerprint(path: Path) -> bytes:
    """Size plus the first and last MiB of a (weight) file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(FINGERPRINT_BYTES)
        handle.seek(max(size - FINGERPRINT_BYTES, 0))
        tail = handle.read(FINGERPRINT_BYTES)
    return str(size).encode() + b"\0" + head + tail


def config_patterns(kind: str) -> list[str]:
    """``allow_patterns`` for the configs, tokenizer and processor files a model kind needs."""
    if kind == "stable_diffusion":
        return list(SD_CONFIG_FILES)
    return list(TRANSFORMERS_CONFIG_FILES)


def missing_weights(folder: Path, kind: str) -> list[tuple[str, str]]:
    """(safetensors, fallback) weight pairs of ``kind`` of which neither file exists in ``folder``."""
    return [pair for pair in WEIGHT_FILES[kind] if not any((folder / name).is_file() for name in pair)]


def resolve_model(
    spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool | None = None
) -> ModelRecord:
    """Resolve a model spec to a local folder: a local folder is used as is, a hub id is snapshot-downloaded.

    ``local_files_only=None`` follows HF_HUB_OFFLINE. Safetensors weights are fetched; .bin only if missing.
    """
    if is_local_id(spec.id):
        return resolve_local(spec)
    if looks_like_path(spec.id):
        raise FileNotFoundError(f"model {spec.name!r}: local model folder {spec.id} does not exist")
    offline = offline_from_env() if local_files_only is None else local_files_only
    folder = _snapshot(
        spec, config_patterns(spec.kind) + [pair[0] for pair in WEIGHT_FILES[spec.kind]], cache_dir, offline
    )
    missing = missing_weights(folder, spec.kind)
    if missing:
        folder = _snapshot(spec, [pair[1] for pair in missing], cache_dir, offline)
        still_missing = missing_weights(folder, spec.kind)
        if still_missing:
            raise FileNotFoundError(
                f"model {spec.name!r} ({spec.id}@{spec.revision}): snapshot {folder} has no weights "
                f"{[pair[0] for pair in still_missing]} (nor .bin fallbacks)"
            )
    return ModelRecord(
        name=spec.name,
        id=spec.id,
        revision_requested=spec.revision,
        revision_resolved=folder.name,
        local_path=str(folder),
        source="hub",
    )


def resolve_local(spec: ModelSpec) -> ModelRecord:
    """Record for a local model folder; the resolved revision is a hash of the folder's content."""
    folder = Path(spec.id).expanduser().resolve()
    missing = missing_weights(folder, spec.kind)
    if missing:
        raise FileNotFoundError(
            f"model {spec.name!r}: local folder {folder} lacks weights {[pair[0] for pair in missing]} "
            f"for kind {spec.kind!r}"
        )
    return ModelRecord(
        name=spec.name,
        id=spec.id,
        revision_requested=spec.revision,
        revision_resolved=folder_revision(folder),
        local_path=str(folder),
        source="local",
    )


def _snapshot(
    spec: ModelSpec, allow_patterns: list[str], cache_dir: str | os.PathLike[str] | None, offline: bool
) -> Path:
    """``snapshot_download`` of ``allow_patterns``; a hub/cache miss becomes an error that says what to do."""
    try:
        path = snapshot_download(
            repo_id=spec.id,
            revision=spec.revision,
            allow_patterns=allow_patterns,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as error:
        mode = "offline (HF_HUB_OFFLINE / local_files_only)" if offline else "the hub could not be reached"
        raise ModelUnavailableError(
            f"model {spec.name!r}: cannot resolve hub id {spec.id!r} at revision {spec.revision!r}: {mode} "
            f"and no cached snapshot was found (cache_dir={cache_dir}). Download it on a machine with "
            f"network access, or set this model's id in config.yaml to a local folder in the hub layout. "
            f"({error})"
        ) from error
    return Path(path)


def write_model_record(record: ModelRecord, path: str | os.PathLike[str]) -> None:
    """Write a model record as JSON atomically."""
    write_json_atomic(path, asdict(record))


def read_model_record(path: str | os.PathLike[str]) -> ModelRecord:
    """Read a model record written by ``write_model_record``; a missing or extra key is an error naming it."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"model record {source} does not exist")
    try:
        data: Any = json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"model record {source}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"model record {source}: expected a JSON object, got {type(data).__name__}")
    expected = {f.name for f in fields(ModelRecord)}
    missing, extra = sorted(expected - data.keys()), sorted(data.keys() - expected)
    if missing or extra:
        raise ValueError(f"model record {source}: missing keys {missing}, unexpected keys {extra}")
    if data["source"] not in SOURCES:
        raise ValueError(
            f"model record {source}: key 'source' must be one of {SOURCES}, got {data['source']!r}"
        )
    return ModelRecord(**{key: str(data[key]) for key in expected})


def _frozen(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a module to ``device``, switch it to eval mode and freeze every parameter."""
    module.requires_grad_(False)
    return module.to(device).eval()


def _require_folder(local_path: str | os.PathLike[str], what: str) -> Path:
    """The folder ``local_path`` or a FileNotFoundError naming it."""
    folder = Path(local_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: model folder {folder} does not exist")
    return folder


def load_stable_diffusion(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Load the frozen UNet, VAE, CLIP text encoder, tokenizer and noise scheduler from an SD folder.

    The scheduler is read as DDPMScheduler whatever class the folder names: only ``add_noise`` is used.
    """
    folder = _require_folder(local_path, "load_stable_diffusion")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
    return SDComponents(
        unet=_frozen(unet, device),
        vae=_frozen(vae, device),
        text_encoder=_frozen(text_encoder, device),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def load_dinov2(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Dinov2Model, Any]:
    """Load a frozen DINOv2 backbone and its image processor."""
    folder = _require_folder(local_path, "load_dinov2")
    model = Dinov2Model.from_pretrained(folder, dtype=dtype)
    return _frozen(model, device), AutoImageProcessor.from_pretrained(folder)


def load_dino(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ViTModel, Any]:
    """Load a frozen DINO (v1) ViT without pooler and its image processor."""
    folder = _require_folder(local_path, "load_dino")
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False, dtype=dtype)
    return _frozen(model, device), AutoImageProcessor.from_pretrained(folder)


def load_clip_vision(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CLIPVisionModelWithProjection, Any]:
    """Load a frozen CLIP vision tower with projection (the implicit captioner's encoder) and processor."""
    folder = _require_folder(local_path, "load_clip_vision")
    model = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    return _frozen(model, device), AutoImageProcessor.from_pretrained(folder)
