"""Model registry: a hub id + revision or a local folder, resolved to a folder with a recorded revision.

Hub models disappear (SD 1-5 in 2024, SD 2-1 in Nov 2025), so every run records which revision it used and
any model can be replaced by a local folder in the hub layout. Records hold no machine-specific absolute
path: a hub model is found again in this machine's Hugging Face cache by id and commit, a local folder given
by a relative id is stored relative to the record, so a moved project (or a colleague's copy) still works.
Frozen networks may be fetched as their fp16 variant (``variant: fp16``) where the repo has one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import constants as hf_constants
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
VARIANTS = ("fp16",)  # weight variants a hub repo may ship beside the fp32 files (`*.fp16.safetensors`)
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
    variant: str | None = None  # "fp16": download the fp16 weight files where the repo has them

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model {self.name!r}: kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if not self.id:
            raise ValueError(f"model {self.name!r}: empty id (give a hub id or a local folder)")
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(
                f"model {self.name!r}: variant must be null or one of {VARIANTS}, got {self.variant!r}"
            )


@dataclass
class ModelRecord:
    """What a run used: the resolved revision (hub commit or folder hash), the local folder (absolute on this
    machine, never written so), the weight files the loaders read and the hub cache folder."""

    name: str
    id: str
    revision_requested: str
    revision_resolved: str
    local_path: str
    source: str
    weight_files: tuple[str, ...] = ()
    cache_dir: str | None = None

    def weights_precision(self) -> str:
        """ "fp16" or "fp32" (the weight files read), "mixed", or "" for a record that lists none."""
        if not self.weight_files:
            return ""
        halves = {f".{VARIANTS[0]}." in Path(name).name for name in self.weight_files}
        return "mixed" if len(halves) > 1 else ("fp16" if halves == {True} else "fp32")


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


def variant_name(filename: str, variant: str) -> str:
    """The name of ``filename``'s variant file: ``unet/x.safetensors`` -> ``unet/x.fp16.safetensors``."""
    path = Path(filename)
    return str(path.with_name(f"{path.stem}.{variant}{path.suffix}").as_posix())


def weight_candidates(pair: tuple[str, str], variant: str | None = None) -> list[str]:
    """The files that can hold one component's weights, in the order resolution downloads them."""
    safetensors, pickle = pair
    half = [variant_name(safetensors, variant)] if variant else []
    return [*half, safetensors, pickle]


def weight_file(folder: Path, pair: tuple[str, str]) -> str | None:
    """The weight file the loaders read for one component: fp32 safetensors, else the .bin, else an fp16
    variant; None when the folder has none of them."""
    for name in (pair[0], pair[1], *(variant_name(pair[0], v) for v in VARIANTS)):
        if (folder / name).is_file():
            return name
    return None


def weight_files(folder: Path, kind: str) -> tuple[str, ...]:
    """The weight file of every component of ``kind`` that ``folder`` has (see ``weight_file``)."""
    found = (weight_file(folder, pair) for pair in WEIGHT_FILES[kind])
    return tuple(name for name in found if name is not None)


def loading_variant(folder: str | os.PathLike[str], kind: str, index: int = 0) -> str | None:
    """The ``variant=`` to pass ``from_pretrained`` for component ``index`` of ``kind`` in ``folder``: None
    when fp32 (or .bin) weights are there, else the variant whose files are."""
    name = weight_file(Path(folder), WEIGHT_FILES[kind][index])
    if name is None:
        return None
    return next((v for v in VARIANTS if Path(name).name.endswith(f".{v}.safetensors")), None)


def missing_weights(folder: Path, kind: str) -> list[tuple[str, str]]:
    """(safetensors, fallback) weight pairs of ``kind`` for which ``folder`` has no file (nor a variant)."""
    return [pair for pair in WEIGHT_FILES[kind] if weight_file(folder, pair) is None]


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
    pairs = WEIGHT_FILES[spec.kind]
    candidates = [weight_candidates(pair, spec.variant) for pair in pairs]
    # configs + the preferred weight file of every component, then the next candidate of those still missing
    patterns = config_patterns(spec.kind) + [files[0] for files in candidates]
    folder = _snapshot(spec, patterns, cache_dir, offline)
    for level in range(1, max(len(files) for files in candidates)):
        lacking = zip(pairs, candidates, strict=True)
        missing = [files[level] for pair, files in lacking if _lacks(folder, pair)]
        if not missing:
            break
        folder = _snapshot(spec, missing, cache_dir, offline)
    still_missing = missing_weights(folder, spec.kind)
    if still_missing:
        raise FileNotFoundError(
            f"model {spec.name!r} ({spec.id}@{spec.revision}): snapshot {folder} has no weights "
            f"{[pair[0] for pair in still_missing]} (nor .bin fallbacks or fp16 variants)"
        )
    return ModelRecord(
        name=spec.name,
        id=spec.id,
        revision_requested=spec.revision,
        revision_resolved=folder.name,
        local_path=str(folder),
        source="hub",
        weight_files=weight_files(folder, spec.kind),
        cache_dir=None if cache_dir is None else str(cache_dir),
    )


def _lacks(folder: Path, pair: tuple[str, str]) -> bool:
    return weight_file(folder, pair) is None


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
        weight_files=weight_files(folder, spec.kind),
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


def hub_snapshot_folder(repo_id: str, commit: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where this machine's Hugging Face cache holds ``repo_id`` at ``commit`` (default: ``HF_HUB_CACHE``)."""
    cache = Path(hf_constants.HF_HUB_CACHE if cache_dir is None else cache_dir).expanduser()
    return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def _stored_path(path: str | None, base: Path, relative: bool) -> str | None:
    """A path as a record stores it: relative to the record's folder when ``relative``, else absolute."""
    if path is None:
        return None
    if not relative:
        return str(Path(path).expanduser().absolute())
    return os.path.relpath(Path(path).absolute(), base.absolute())


def _is_relative_setting(value: str | None) -> bool:
    """True for a path the user configured relatively (it moves with the project)."""
    return value is not None and not Path(value).expanduser().is_absolute()


def write_model_record(record: ModelRecord, path: str | os.PathLike[str]) -> None:
    """Write a model record as JSON atomically, without machine-specific absolute paths.

    A hub model is stored by id + commit (+ the configured cache folder): it is found again in whatever
    Hugging Face cache the reading machine has. A local folder (and a cache folder) configured by a relative
    path is stored relative to the record's folder; one configured absolutely stays absolute.
    """
    base = Path(path).parent
    data = asdict(record)
    data["weight_files"] = list(record.weight_files)
    data["cache_dir"] = _stored_path(record.cache_dir, base, _is_relative_setting(record.cache_dir))
    if record.source == "hub":
        data["local_path"] = None
    else:
        data["local_path"] = _stored_path(record.local_path, base, _is_relative_setting(record.id))
    write_json_atomic(path, data)


REQUIRED_RECORD_KEYS = ("name", "id", "revision_requested", "revision_resolved", "local_path", "source")
OPTIONAL_RECORD_KEYS = ("weight_files", "cache_dir")


def read_model_record(path: str | os.PathLike[str]) -> ModelRecord:
    """Read a model record written by ``write_model_record``; a missing or extra key is an error naming it.

    ``local_path`` comes back absolute for this machine (records of older versions stored it absolute).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"model record {source} does not exist")
    try:
        data: Any = json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"model record {source}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"model record {source}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(set(REQUIRED_RECORD_KEYS) - data.keys())
    extra = sorted(data.keys() - {*REQUIRED_RECORD_KEYS, *OPTIONAL_RECORD_KEYS})
    if missing or extra:
        raise ValueError(f"model record {source}: missing keys {missing}, unexpected keys {extra}")
    if data["source"] not in SOURCES:
        raise ValueError(
            f"model record {source}: key 'source' must be one of {SOURCES}, got {data['source']!r}"
        )
    base = source.parent.absolute()
    cache_dir = data.get("cache_dir")
    if cache_dir is not None:
        cache_dir = str(Path(os.path.normpath(base / cache_dir)))
    stored = data["local_path"]
    if stored is None:
        if data["source"] != "hub":
            raise ValueError(f"model record {source}: key 'local_path' is null for a local model")
        local_path = str(hub_snapshot_folder(str(data["id"]), str(data["revision_resolved"]), cache_dir))
    else:
        local_path = os.path.normpath(base / str(stored))
    return ModelRecord(
        **{key: str(data[key]) for key in REQUIRED_RECORD_KEYS if key != "local_path"},
        local_path=local_path,
        weight_files=tuple(str(name) for name in data.get("weight_files") or ()),
        cache_dir=cache_dir,
    )


def _frozen(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move a module to ``device``, switch it to eval mode and freeze every parameter."""
    module.requires_grad_(False)
    return module.to(device).eval()


def _require_folder(local_path: str | os.PathLike[str], what: str) -> Path:
    """The folder ``local_path`` or a FileNotFoundError naming it."""
    folder = Path(local_path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: model folder {folder} does not exist (a hub model not in this machine's Hugging Face "
            "cache, or a moved local folder: rerun the model's resolution, `snakemake --forcerun "
            "resolve_model`, or point its config id at the folder)"
        )
    return folder


def load_stable_diffusion(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SDComponents:
    """Load the frozen UNet, VAE, CLIP text encoder, tokenizer and noise scheduler from an SD folder.

    The scheduler is read as DDPMScheduler whatever class the folder names: only ``add_noise`` is used.
    """
    folder = _require_folder(local_path, "load_stable_diffusion")
    kind = "stable_diffusion"
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=dtype, variant=loading_variant(folder, kind, 0)
    )
    vae = AutoencoderKL.from_pretrained(
        folder, subfolder="vae", torch_dtype=dtype, variant=loading_variant(folder, kind, 1)
    )
    text_encoder = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", dtype=dtype, variant=loading_variant(folder, kind, 2)
    )
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
    model = Dinov2Model.from_pretrained(folder, dtype=dtype, variant=loading_variant(folder, "dinov2"))
    return _frozen(model, device), AutoImageProcessor.from_pretrained(folder)


def load_dino(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ViTModel, Any]:
    """Load a frozen DINO (v1) ViT without pooler and its image processor."""
    folder = _require_folder(local_path, "load_dino")
    model = ViTModel.from_pretrained(
        folder, add_pooling_layer=False, dtype=dtype, variant=loading_variant(folder, "dino")
    )
    return _frozen(model, device), AutoImageProcessor.from_pretrained(folder)


def load_clip_vision(
    local_path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[CLIPVisionModelWithProjection, Any]:
    """Load a frozen CLIP vision tower with projection (the implicit captioner's encoder) and processor."""
    folder = _require_folder(local_path, "load_clip_vision")
    model = CLIPVisionModelWithProjection.from_pretrained(
        folder, dtype=dtype, variant=loading_variant(folder, "clip_vision")
    )
    return _frozen(model, device), AutoImageProcessor.from_pretrained(folder)
