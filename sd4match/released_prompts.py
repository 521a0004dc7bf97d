"""The authors' released prompts (``pretrained_prompts.zip``), imported into our prompt format.

The release holds one folder per prompt (protocol.md "The authors' released prompts"):
``Single_<ds>_sd2-1_TokenEmbeds75/caption.pt`` ``{"dataset": T}``,
``Class_<ds>_sd2-1_TokenEmbeds75/caption.pt`` ``{<category>: T}``, T (1, 77, D) being the full
input-embedding sequence [SOS, 75 learned, EOS], and ``CPM_<ds>_sd2-1_Pair-DINO-Feat-G25-C50/ckpt.pt``,
the CPM state dict. Each prompt is loaded safely (``weights_only``), checked (keys, shapes, finite values,
SOS/EOS against our text encoder), mapped onto our modules through their public construction API and saved
with ``save_prompt`` and a sidecar saying where it came from. Unknown or missing folders are reported, not
fatal. ``sd4match.released_demo`` writes the same format for the demo world and the tests.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoImageProcessor, CLIPTextModel, CLIPTokenizer

from sd4match.datasets import PFPASCAL_CLASSES, SPAIR_CATEGORIES
from sd4match.fetch import fetch_archive, link_local_copy, sha256_file
from sd4match.io import write_json_atomic
from sd4match.models import ModelRecord, read_model_record
from sd4match.prompt_learning import (
    ClassPrompt,
    ConditionalPromptModule,
    CPMConfig,
    LearnedPrompt,
    SinglePrompt,
    build_prompt_module,
    save_prompt,
)
from sd4match.prompts import hidden_size, sequence_length, sos_eos_embeddings

log = logging.getLogger(__name__)

ORIGIN = "authors_release"
RELEASE_SETS = ("spair", "pfpascal")
RELEASE_VARIANTS = ("single", "class", "cpm")
SD_TAG = "sd2-1"
SD_TAG_MODELS = {"sd2-1": "stable-diffusion-2-1"}
N_GLOBAL, N_COND = 25, 50
SINGLE_KEY = "dataset"
SEQUENCE_FILE = "caption.pt"
CPM_FILE = "ckpt.pt"
DDP_PREFIX = "module."
IGNORED_ENTRIES = ("__MACOSX",)
ROOT_SEARCH_DEPTH = 2
SET_CATEGORIES = {"spair": tuple(SPAIR_CATEGORIES), "pfpascal": tuple(PFPASCAL_CLASSES)}


# ----------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class ReleasedFolder:
    """One prompt folder of the release: its training set and variant give its name and file."""

    trainset: str
    variant: str

    def __post_init__(self) -> None:
        if self.trainset not in RELEASE_SETS or self.variant not in RELEASE_VARIANTS:
            raise ValueError(
                f"released prompt ({self.trainset!r}, {self.variant!r}): training set must be one of "
                f"{RELEASE_SETS} and variant one of {RELEASE_VARIANTS}"
            )

    @property
    def name(self) -> str:
        """The folder name in the release, e.g. ``CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50``."""
        if self.variant == "cpm":
            return f"CPM_{self.trainset}_{SD_TAG}_Pair-DINO-Feat-G{N_GLOBAL}-C{N_COND}"
        return f"{self.variant.capitalize()}_{self.trainset}_{SD_TAG}_TokenEmbeds{N_GLOBAL + N_COND}"

    @property
    def file(self) -> str:
        """The prompt file inside the folder: ``caption.pt`` (Single/Class) or ``ckpt.pt`` (CPM)."""
        return CPM_FILE if self.variant == "cpm" else SEQUENCE_FILE


KNOWN_FOLDERS = {f.name: f for f in (ReleasedFolder(t, v) for t in RELEASE_SETS for v in RELEASE_VARIANTS)}


def cpm_shapes(width: int, n_patches: int, dino_dim: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released CPM ``ckpt.pt``: text width D, N DINOv2 patches of ``dino_dim`` channels."""
    return {
        "global_embeds": (1, N_GLOBAL, width),
        "positional_embedding": (1, N_COND, width),
        "alpha_cond": (1, N_COND, width),
        "linear_C.weight": (width, 2 * dino_dim),
        "linear_C.bias": (width,),
        "linear_N.weight": (n_patches, n_patches),
        "linear_N.bias": (n_patches,),
    }


# ------------------------------------------------------------------------------------------ reading a file


def load_release_file(path: Path) -> dict[str, Tensor]:
    """A released ``.pt`` as a dict of tensors, read with ``torch.load(weights_only=True)`` (no code runs)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(
            f"released prompt file {path}: cannot be read with torch.load(weights_only=True) ({error})"
        ) from error
    if not isinstance(data, Mapping):
        raise ValueError(
            f"released prompt file {path}: expected a dict of tensors, got {type(data).__name__}"
        )
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"released prompt file {path}: key {key!r} is not a string")
        if not torch.is_tensor(value):
            raise ValueError(
                f"released prompt file {path}: key {key!r} holds {type(value).__name__}, not a tensor"
            )
    return dict(data)


def checked_tensor(path: Path, data: Mapping[str, Tensor], key: str, shape: tuple[int, ...]) -> Tensor:
    """``data[key]`` as float32 after checking it exists, is floating point, has ``shape`` and is finite."""
    if key not in data:
        raise ValueError(f"released prompt file {path}: missing key {key!r} (keys: {sorted(data)})")
    value = data[key].detach()
    if not value.is_floating_point():
        raise ValueError(
            f"released prompt file {path}: key {key!r} has dtype {value.dtype}, not floating point"
        )
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"released prompt file {path}: key {key!r} has shape {tuple(value.shape)}, "
            f"expected {tuple(shape)}"
        )
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise ValueError(f"released prompt file {path}: key {key!r} holds {bad} non-finite values (NaN/inf)")
    return value.float().clone()


@dataclass(frozen=True)
class Framing:
    """Our text encoder's SOS/EOS input embeddings (D,), its sequence length and the SOS/EOS tolerance."""

    sos: Tensor
    eos: Tensor
    length: int
    atol: float

    def learned_rows(self, path: Path, key: str, sequence: Tensor) -> tuple[Tensor, float]:
        """The 75 learned rows of a released (77, D) sequence, once its SOS/EOS rows match ours."""
        diff = max(float((sequence[0] - self.sos).abs().max()), float((sequence[-1] - self.eos).abs().max()))
        if diff > self.atol:
            raise ValueError(
                f"released prompt file {path}: key {key!r}: its SOS/EOS rows differ from the configured text "
                f"encoder's by up to {diff:.4g} (tolerance {self.atol:g}); the prompt was made with another "
                "text encoder than the configured SD model's"
            )
        return sequence[1:-1], diff


def framing_for(text_encoder: nn.Module, tokenizer: Any, atol: float) -> Framing:
    """The Framing of a CLIP text encoder (SOS/EOS with the positional embeddings of positions 0 and 76)."""
    with torch.no_grad():
        sos, eos = sos_eos_embeddings(text_encoder, tokenizer)
    return Framing(
        sos.detach().float().cpu(), eos.detach().float().cpu(), sequence_length(text_encoder), atol
    )


# ---------------------------------------------------------------------- mapping onto our modules (one each)


def single_state(module: SinglePrompt, learned: Tensor) -> dict[str, Tensor]:
    """SinglePrompt state dict from the 75 learned rows (75, D)."""
    return {"prompt": learned}


def class_state(module: ClassPrompt, learned: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ClassPrompt state dict from the release's category -> learned rows (75, D): one tensor per category
    (``prompts.<category>``), as the authors' ``{<category>: T}`` file and their training hold them."""
    return module.state_for(learned)


def cpm_state(module: ConditionalPromptModule, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our CPM state dict from the released keys: g_d = linear_C, g_n = linear_N, Omega_pos, Omega_alpha.

    Both store Omega_alpha before the tanh and compute (pool(g_n(g_d(F))) + Omega_pos) * tanh(Omega_alpha).
    """
    return {
        "g_d.weight": weights["linear_C.weight"],
        "g_d.bias": weights["linear_C.bias"],
        "g_n.weight": weights["linear_N.weight"],
        "g_n.bias": weights["linear_N.bias"],
        "global_prompt": weights["global_embeds"][0],
        "omega_pos": weights["positional_embedding"][0],
        "omega_alpha": weights["alpha_cond"][0],
    }


def _loaded(module: LearnedPrompt, state: dict[str, Tensor], path: Path) -> LearnedPrompt:
    """Load ``state`` strictly; a mismatch with the module's parameter names raises naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"released prompt file {path}: does not map onto our {module.variant} module: {error}"
        ) from error
    return module


# ------------------------------------------------------------------------------------------- one prompt


@dataclass
class ImportedPrompt:
    """A released prompt as our module, with what the import checked (for the sidecar and the report)."""

    module: LearnedPrompt
    sos_eos_max_abs_diff: float | None
    ignored_keys: list[str] = field(default_factory=list)


def _sequence(
    path: Path, data: Mapping[str, Tensor], key: str, framing: Framing, width: int
) -> tuple[Tensor, float]:
    tensor = checked_tensor(path, data, key, (1, framing.length, width))
    return framing.learned_rows(path, key, tensor[0])


def import_single(
    path: Path, data: dict[str, Tensor], text_encoder: nn.Module, tokenizer: Any, framing: Framing
) -> ImportedPrompt:
    """SD4Match-Single from ``{"dataset": T}``."""
    learned, diff = _sequence(path, data, SINGLE_KEY, framing, hidden_size(text_encoder))
    module = build_prompt_module("single", text_encoder, tokenizer)
    module = _loaded(module, single_state(module, learned), path)
    return ImportedPrompt(module, diff, sorted(set(data) - {SINGLE_KEY}))


def import_class(
    path: Path,
    data: dict[str, Tensor],
    text_encoder: nn.Module,
    tokenizer: Any,
    framing: Framing,
    trainset: str,
) -> ImportedPrompt:
    """SD4Match-Class from ``{<category>: T}``; every category of the training set must be there."""
    missing = sorted(set(SET_CATEGORIES[trainset]) - set(data))
    if missing:
        raise ValueError(
            f"released prompt file {path}: missing keys {missing} (categories of {trainset} without a prompt)"
        )
    width = hidden_size(text_encoder)
    rows = {category: _sequence(path, data, category, framing, width) for category in sorted(data)}
    module = build_prompt_module("class", text_encoder, tokenizer, categories=sorted(rows))
    learned = {category: value[0] for category, value in rows.items()}
    module = _loaded(module, class_state(module, learned), path)
    return ImportedPrompt(module, max(value[1] for value in rows.values()))


def _strip_ddp_prefix(data: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without the DDP wrapper's ``module.`` prefix when every key carries it."""
    if data and all(key.startswith(DDP_PREFIX) for key in data):
        return {key[len(DDP_PREFIX) :]: value for key, value in data.items()}
    return data


def _cpm_dims(path: Path, data: Mapping[str, Tensor], dino_shape: tuple[int, int] | None) -> tuple[int, int]:
    """(n_patches, dino_dim): the configured DINOv2's, else read from linear_N / linear_C in the file."""
    if dino_shape is not None:
        return dino_shape
    for key in ("linear_N.weight", "linear_C.weight"):
        if key not in data or data[key].ndim != 2:
            raise ValueError(f"released prompt file {path}: missing key {key!r} or it is not a matrix")
    if data["linear_C.weight"].shape[1] % 2:
        raise ValueError(
            f"released prompt file {path}: key 'linear_C.weight' has {data['linear_C.weight'].shape[1]} "
            "input channels, not twice a DINOv2 width (source and target tokens concatenated)"
        )
    return int(data["linear_N.weight"].shape[0]), int(data["linear_C.weight"].shape[1]) // 2


def import_cpm(
    path: Path,
    data: dict[str, Tensor],
    text_encoder: nn.Module,
    tokenizer: Any,
    dino_shape: tuple[int, int] | None,
) -> ImportedPrompt:
    """SD4Match-CPM (pair, local patch tokens, global prompt, g_n) from the released state dict."""
    data = _strip_ddp_prefix(data)
    n_patches, dino_dim = _cpm_dims(path, data, dino_shape)
    shapes = cpm_shapes(hidden_size(text_encoder), n_patches, dino_dim)
    weights = {key: checked_tensor(path, data, key, shape) for key, shape in shapes.items()}
    config = CPMConfig(n_global=N_GLOBAL, n_cond=N_COND, dino_dim=dino_dim, n_patches=n_patches)
    module = build_prompt_module("cpm", text_encoder, tokenizer, cpm=config)
    module = _loaded(module, cpm_state(module, weights), path)
    return ImportedPrompt(module, None, sorted(set(data) - set(shapes)))


def import_folder(
    folder: Path,
    spec: ReleasedFolder,
    text_encoder: nn.Module,
    tokenizer: Any,
    framing: Framing,
    dino_shape: tuple[int, int] | None,
) -> ImportedPrompt:
    """Read and check the prompt file of one released folder and return it as our module."""
    path = folder / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"released prompt folder {folder} has no {spec.file}")
    data = load_release_file(path)
    if spec.variant == "single":
        return import_single(path, data, text_encoder, tokenizer, framing)
    if spec.variant == "class":
        return import_class(path, data, text_encoder, tokenizer, framing, spec.trainset)
    return import_cpm(path, data, text_encoder, tokenizer, dino_shape)


# -------------------------------------------------------------------------------------------- the release


@dataclass(frozen=True)
class ReleaseSource:
    """Where the release came from: the URL and sha256 of the archive, or a local extracted copy."""

    url: str | None
    archive_sha256: str | None
    local_path: str | None = None


@dataclass(frozen=True)
class ImportSettings:
    """How strictly a release is checked: SOS/EOS tolerance and the configured DINOv2 token shape (N, C)."""

    sos_eos_atol: float = 1e-3
    dino_shape: tuple[int, int] | None = None


@dataclass
class ImportReport:
    """What an import found: imported prompts, known folders missing, unknown entries, extra files."""

    source: dict[str, Any]
    root: str
    imported: list[dict[str, Any]]
    missing: list[str]
    unknown: list[str]
    extra_files: dict[str, list[str]]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name not in IGNORED_ENTRIES


def find_release_root(extracted: Path) -> Path:
    """The folder holding the prompt folders: ``extracted`` or a single top folder (within two levels)."""
    folder = Path(extracted)
    for _ in range(ROOT_SEARCH_DEPTH + 1):
        entries = [p for p in folder.iterdir() if _visible(p)]
        if any(p.name in KNOWN_FOLDERS and p.is_dir() for p in entries):
            return folder
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    return Path(extracted)


def scan_release(root: Path) -> tuple[dict[str, Path], list[str], dict[str, list[str]]]:
    """Known prompt folders present, unknown entries, and the extra files of each known folder."""
    entries = sorted((p for p in root.iterdir() if _visible(p)), key=lambda p: p.name)
    found = {p.name: p for p in entries if p.name in KNOWN_FOLDERS and p.is_dir()}
    unknown = [p.name for p in entries if p.name not in found]
    extra = {}
    for name, folder in found.items():
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        extra[name] = [f for f in files if f != KNOWN_FOLDERS[name].file]
    return found, unknown, extra


def prompt_relpath(trainset: str, variant: str) -> str:
    """Where an imported prompt lands under the output folder: ``<trainset>/<variant>/prompt.safetensors``."""
    return f"{trainset}/{variant}/prompt.safetensors"


def prompt_metadata(
    spec: ReleasedFolder,
    imported: ImportedPrompt,
    file: Path,
    source: ReleaseSource,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Sidecar metadata of an imported prompt: its origin (URL, hashes, folder) and the models used."""
    metadata = {
        **extra,
        "origin": ORIGIN,
        "variant": spec.variant,
        "training_set": spec.trainset,
        "release": {
            **asdict(source),
            "folder": spec.name,
            "file": spec.file,
            "file_sha256": sha256_file(file),
        },
        "intended_sd_model": SD_TAG_MODELS[SD_TAG],
        "sos_eos_max_abs_diff": imported.sos_eos_max_abs_diff,
        "ignored_keys": imported.ignored_keys,
    }
    if spec.variant != "cpm":
        metadata["dinov2_model"] = None
    return metadata


def _publish_dir(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` folder onto ``target`` (an old ``target`` is removed first)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def import_release(
    root: Path,
    out_dir: Path,
    text_encoder: nn.Module,
    tokenizer: Any,
    source: ReleaseSource,
    settings: ImportSettings,
    metadata: Mapping[str, Any],
) -> ImportReport:
    """Import every known prompt folder under ``root`` into ``out_dir`` (atomically, as a whole folder).

    Unknown entries and missing known folders are logged and reported; a release without any known folder,
    or a malformed prompt file, raises naming the file (and key).
    """
    root, out_dir = Path(root), Path(out_dir)
    found, unknown, extra = scan_release(root)
    missing = [name for name in KNOWN_FOLDERS if name not in found]
    for name in unknown:
        log.warning("released prompts %s: unknown entry %r ignored (not a known prompt folder)", root, name)
    for name in missing:
        log.warning("released prompts %s: no folder %r in this release", root, name)
    if not found:
        raise FileNotFoundError(
            f"released prompts {root}: none of the known prompt folders {sorted(KNOWN_FOLDERS)} is there "
            f"(entries: {unknown})"
        )
    framing = framing_for(text_encoder, tokenizer, settings.sos_eos_atol)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    imported = []
    try:
        for name, folder in found.items():
            spec = KNOWN_FOLDERS[name]
            prompt = import_folder(folder, spec, text_encoder, tokenizer, framing, settings.dino_shape)
            meta = prompt_metadata(spec, prompt, folder / spec.file, source, metadata)
            relpath = prompt_relpath(spec.trainset, spec.variant)
            save_prompt(prompt.module, staging / relpath, meta)
            log.info(
                "imported %s -> %s (sha256 %s)", folder / spec.file, relpath, meta["release"]["file_sha256"]
            )
            imported.append(
                {"folder": name, "trainset": spec.trainset, "variant": spec.variant, "prompt": relpath}
                | {k: meta[k] for k in ("sos_eos_max_abs_diff", "ignored_keys")}
            )
        _publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportReport(asdict(source), str(root), imported, missing, unknown, extra)


def acquire_release(cfg: Mapping[str, Any], downloads: Path, data_dir: Path) -> tuple[Path, ReleaseSource]:
    """Download + extract the release archive (resumable, hash logged) or link the configured local copy."""
    if cfg.get("local_path"):
        folder = link_local_copy(cfg["local_path"], Path(data_dir) / "local")
        return folder, ReleaseSource(None, None, str(cfg["local_path"]))
    url = cfg["url"]
    archive = Path(downloads) / url.rstrip("/").rsplit("/", 1)[-1]
    record = fetch_archive(url, archive, Path(data_dir) / "extracted", sha256=cfg.get("sha256"))
    log.info(
        "%s sha256=%s (pin it as released_prompts.sha256 to verify future downloads)", archive, record.sha256
    )
    return record.extracted_to, ReleaseSource(url, record.sha256)


def write_import_report(report: ImportReport, path: str | os.PathLike[str]) -> None:
    """Write the import report JSON atomically."""
    write_json_atomic(path, asdict(report))


def load_text_encoder(folder: str | os.PathLike[str]) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The frozen CLIP text encoder and tokenizer of an SD folder (the UNet and VAE are not needed here)."""
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    text_encoder.requires_grad_(False)
    return text_encoder.eval(), CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")


def dinov2_token_shape(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """(patch tokens N, channels) of a DINOv2 folder at its processor's default crop (from its configs)."""
    config = AutoConfig.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if not crop or "height" not in crop or "width" not in crop:
        raise ValueError(
            f"DINOv2 folder {folder}: its processor has no fixed center crop; the token count varies"
        )
    patch = int(config.patch_size)
    return (int(crop["height"]) // patch) * (int(crop["width"]) // patch), int(config.hidden_size)


def _record_summary(record: ModelRecord) -> dict[str, str]:
    """The ``{"id", "revision"}`` form training writes into prompt sidecars."""
    return {"id": record.id, "revision": record.revision_resolved}


def run_released_import(
    cfg: Mapping[str, Any],
    sd_record_path: str | os.PathLike[str],
    dino_record_path: str | os.PathLike[str],
    downloads: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    prompts_out: str | os.PathLike[str],
    report_out: str | os.PathLike[str],
    metadata: Mapping[str, Any],
) -> ImportReport:
    """The workflow's fetch + import job: acquire the release, import it with the configured models."""
    extracted, source = acquire_release(cfg, Path(downloads), Path(data_dir))
    root = find_release_root(extracted)
    sd_record, dino_record = read_model_record(sd_record_path), read_model_record(dino_record_path)
    text_encoder, tokenizer = load_text_encoder(sd_record.local_path)
    settings = ImportSettings(float(cfg["sos_eos_atol"]), dinov2_token_shape(dino_record.local_path))
    meta = {**metadata, "sd_model": _record_summary(sd_record), "dinov2_model": _record_summary(dino_record)}
    report = import_release(root, Path(prompts_out), text_encoder, tokenizer, source, settings, meta)
    write_import_report(report, report_out)
    log.info(
        "imported %d released prompts; missing folders %s; unknown entries %s",
        len(report.imported),
        report.missing,
        report.unknown,
    )
    return report
