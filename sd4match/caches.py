"""Per-image caches shared by every prompt variant: VAE posteriors (latents) and DINOv2 tokens.

The frozen VAE and DINOv2 see the same images in every training step and every prompt variant, so their
outputs are computed once per distinct image key ``"<relpath>|<flip 0/1>"`` and stored in one safetensors file
per (dataset, split), tensors named ``<key>::mean``/``<key>::std`` (latents, float32) or
``<key>::tokens``/``<key>::global`` (DINOv2, float16). A JSON sidecar ``<file>.json`` records the model
revision, the preprocessing and the keys; the same record is embedded in the safetensors header so a sidecar
that does not belong to its file is detected. Loading with different expectations raises "stale cache".

The test splits' latent caches (``run_test_latent_cache``) are built with the SD model loaded as the
evaluations load it and record that encoder (weights dtype, memory format, device type): sampling from them
gives the very latents the evaluation's own VAE pass would give, so every evaluation of a test split reads one
cache instead of running the VAE again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from sd4match.data_sources import read_location
from sd4match.datasets import load_image, read_pairs_table
from sd4match.features import SDFeaturizer, load_sd_featurizer, preprocess, sample_latents
from sd4match.io import write_json_atomic
from sd4match.models import (
    ModelRecord,
    SDComponents,
    load_dinov2,
    load_stable_diffusion,
    read_model_record,
)
from sd4match.tensor_files import save_tensors

CACHE_KINDS = ("latents", "dino")
KIND_FIELDS: dict[str, tuple[str, ...]] = {"latents": ("mean", "std"), "dino": ("tokens", "global")}
NAME_SEPARATOR = "::"
HEADER_META_KEY = "sd4match_meta"
RESERVED_META_KEYS = ("keys",)
PAIR_IMAGE_COLUMNS = ("src_image", "trg_image", "flip")
VAE_DOWNSAMPLING = 8

PathLike = str | os.PathLike[str]
CacheT = TypeVar("CacheT", bound="TensorCache")


def image_key(relpath: str, flip: bool) -> str:
    """Cache key of an image as it is fed: ``"<relpath>|<flip 0/1>"``."""
    return f"{relpath}|{int(bool(flip))}"


def tensor_name(key: str, field: str) -> str:
    """Name of one cached tensor in the safetensors file: ``"<key>::<field>"``."""
    return f"{key}{NAME_SEPARATOR}{field}"


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a cache file: ``<path>.json``."""
    return Path(f"{os.fspath(path)}.json")


def distinct_images(pairs_df: pd.DataFrame) -> list[tuple[str, bool]]:
    """Distinct ``(relpath, flip)`` images of a pairs table in first-appearance order (row by row, src then
    trg), with each row's ``flip`` applying to both of its images."""
    missing = [column for column in PAIR_IMAGE_COLUMNS if column not in pairs_df.columns]
    if missing:
        raise ValueError(f"distinct_images: pairs table lacks columns {missing}")
    seen: dict[tuple[str, bool], None] = {}
    for src, trg, flip in zip(pairs_df["src_image"], pairs_df["trg_image"], pairs_df["flip"], strict=True):
        seen.setdefault((str(src), bool(flip)), None)
        seen.setdefault((str(trg), bool(flip)), None)
    return list(seen)


def _distinct_over(pairs_tables: Sequence[pd.DataFrame] | pd.DataFrame) -> list[tuple[str, bool]]:
    """Distinct images over several pairs tables, in table order; an empty result is an error."""
    tables = [pairs_tables] if isinstance(pairs_tables, pd.DataFrame) else list(pairs_tables)
    seen: dict[tuple[str, bool], None] = {}
    for table in tables:
        seen.update(dict.fromkeys(distinct_images(table)))
    if not seen:
        raise ValueError("cache: the pairs tables hold no image (nothing to cache)")
    return list(seen)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists): meta compares equal after a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True))


def processor_config(processor: Any) -> dict[str, Any]:
    """The image processor's configuration as a JSON object (resize, crop, normalisation, ...)."""
    return json.loads(processor.to_json_string())


def encoder_meta(featurizer: SDFeaturizer) -> dict[str, Any]:
    """How a featurizer's VAE computes a posterior: weights dtype, channels_last, device type. A test-split
    latent cache records it, so its samples equal the evaluation's own VAE pass only with the same encoder."""
    return {
        "dtype": str(featurizer.vae.dtype).removeprefix("torch."),
        "channels_last": bool(featurizer.channels_last),
        "device_type": featurizer.device.type,
    }


def cache_meta(
    model_record: ModelRecord,
    image_size: int | None,
    kind: str,
    processor: Any = None,
    encoder: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metadata a cache must match: kind, model name, resolved revision, image size (latents; ``None`` for
    DINOv2, whose preprocessing is the processor's), the processor configuration (DINOv2) and, for the test
    splits' latents, the VAE's ``encoder_meta`` (absent from the training caches' records)."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache_meta: kind must be one of {CACHE_KINDS}, got {kind!r}")
    if kind == "latents" and (image_size is None or image_size < VAE_DOWNSAMPLING):
        raise ValueError(f"cache_meta: latents need image_size >= {VAE_DOWNSAMPLING}, got {image_size}")
    if kind == "dino" and processor is None:
        raise ValueError("cache_meta: a DINOv2 cache needs its image processor (its preprocessing)")
    if encoder is not None and kind != "latents":
        raise ValueError(f"cache_meta: only a latent cache records its VAE encoder, not a {kind!r} cache")
    meta = {
        "kind": kind,
        "model": model_record.name,
        "revision_resolved": model_record.revision_resolved,
        "image_size": image_size,
        "processor": None if processor is None else processor_config(processor),
    }
    if encoder is not None:
        meta["encoder"] = encoder
    return _jsonable(meta)


def _build_meta(meta: dict[str, Any], kind: str, keys: list[str], image_size: int | None) -> dict[str, Any]:
    """The record written with a cache: the caller's meta plus kind, keys and (latents) the image size;
    a caller meta that contradicts them is an error."""
    record = _jsonable(meta)
    reserved = [key for key in RESERVED_META_KEYS if key in record]
    if reserved:
        raise ValueError(f"cache meta must not set reserved keys {reserved}")
    if record.get("kind", kind) != kind:
        raise ValueError(f"cache meta has kind {record['kind']!r} but a {kind!r} cache is being built")
    if image_size is not None and record.get("image_size", image_size) != image_size:
        raise ValueError(
            f"cache meta has image_size {record['image_size']} but the cache is built at {image_size}"
        )
    record.update(kind=kind, keys=keys)
    if image_size is not None:
        record["image_size"] = image_size
    return record


def _write_cache(tensors: dict[str, Tensor], out_path: PathLike, meta: dict[str, Any]) -> None:
    """Write the tensors (with the meta in the header) atomically and reproducibly, then the JSON sidecar."""
    save_tensors(tensors, out_path, {HEADER_META_KEY: json.dumps(meta, sort_keys=True)})
    write_json_atomic(sidecar_path(out_path), meta)


def _chunks(items: list[tuple[str, bool]], size: int) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive chunks of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"cache: batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _row(tensor: Tensor, dtype: torch.dtype, out_path: PathLike, name: str) -> Tensor:
    """A standalone CPU copy of one batch row as stored (safetensors refuses tensors sharing storage); a
    NaN/inf value, or one the storage dtype cannot hold, stops the build naming the cache and tensor."""
    row = tensor.detach().to("cpu", dtype).contiguous().clone()
    if not bool(torch.isfinite(row).all()):
        raise FloatingPointError(
            f"cache {out_path}: tensor {name!r} is not finite in {dtype} (NaN/inf from the model, or beyond "
            f"the range of {dtype}); nothing written"
        )
    return row


def build_latent_cache(
    pairs_tables: Sequence[pd.DataFrame] | pd.DataFrame,
    root: PathLike,
    featurizer: SDFeaturizer | SDComponents,
    image_size: int,
    out_path: PathLike,
    meta: dict[str, Any],
    batch_size: int = 4,
) -> dict[str, Any]:
    """Cache the VAE posterior (mean, std), float32 ``(4, S/8, S/8)``, of every distinct image of the pairs
    tables (loaded from ``root``, flipped per row, resized to S x S); returns the metadata written."""
    if isinstance(featurizer, SDComponents):
        featurizer = SDFeaturizer(featurizer)
    images = _distinct_over(pairs_tables)
    tensors: dict[str, Tensor] = {}
    for chunk in _chunks(images, batch_size):
        pixels = preprocess([load_image(root, relpath, flip) for relpath, flip in chunk], image_size)
        mean, std = featurizer.latent_distribution(pixels)
        for (relpath, flip), mean_row, std_row in zip(chunk, mean, std, strict=True):
            key = image_key(relpath, flip)
            for field, row in (("mean", mean_row), ("std", std_row)):
                name = tensor_name(key, field)
                tensors[name] = _row(row, torch.float32, out_path, name)
    record = _build_meta(meta, "latents", [image_key(*image) for image in images], image_size)
    _write_cache(tensors, out_path, record)
    return record


def _patch_token_offset(model: nn.Module) -> int:
    """Number of leading non-patch tokens in ``last_hidden_state``: CLS plus any register tokens."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


@torch.no_grad()
def dino_features(model: nn.Module, processor: Any, images: list) -> tuple[Tensor, Tensor]:
    """DINOv2 patch tokens ``(B, N, D)`` (CLS dropped) and pooler output ``(B, D)`` of PIL images after the
    processor's default preprocessing (resize 256, centre crop 224 for facebook/dinov2-base)."""
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    param = next(model.parameters())
    output = model(pixel_values=pixel_values.to(param.device, param.dtype))
    return output.last_hidden_state[:, _patch_token_offset(model) :], output.pooler_output


def build_dino_cache(
    pairs_tables: Sequence[pd.DataFrame] | pd.DataFrame,
    root: PathLike,
    model: nn.Module,
    processor: Any,
    out_path: PathLike,
    meta: dict[str, Any],
    batch_size: int = 8,
) -> dict[str, Any]:
    """Cache DINOv2 patch tokens and global descriptors (float16) of every distinct image of the pairs tables,
    flipped images flipped before the processor; returns the metadata written."""
    images = _distinct_over(pairs_tables)
    tensors: dict[str, Tensor] = {}
    for chunk in _chunks(images, batch_size):
        tokens, global_ = dino_features(
            model, processor, [load_image(root, rel, flip) for rel, flip in chunk]
        )
        for (relpath, flip), tokens_row, global_row in zip(chunk, tokens, global_, strict=True):
            key = image_key(relpath, flip)
            for field, row in (("tokens", tokens_row), ("global", global_row)):
                name = tensor_name(key, field)
                tensors[name] = _row(row, torch.float16, out_path, name)
    record = _build_meta(meta, "dino", [image_key(*image) for image in images], None)
    _write_cache(tensors, out_path, record)
    return record


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The JSON sidecar of cache ``path``; missing or unreadable is an error naming it."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise FileNotFoundError(f"cache sidecar {sidecar} of {path} does not exist")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"cache sidecar {sidecar}: invalid JSON ({error})") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("keys"), list):
        raise ValueError(f"cache sidecar {sidecar}: expected a JSON object with a 'keys' list")
    return meta


def check_meta(
    path: PathLike, meta: dict[str, Any], expect_meta: dict[str, Any], source: PathLike | None = None
) -> None:
    """Raise "stale cache" naming the file and the first key whose recorded value differs from
    ``expect_meta`` (every key of ``expect_meta`` but the key list is compared); ``source`` is the model
    record the expectation comes from, named in the message."""
    origin = "" if source is None else f" from model record {source}"
    for key, expected in _jsonable(expect_meta).items():
        if key in RESERVED_META_KEYS:
            continue
        if key not in meta or meta[key] != expected:
            raise ValueError(
                f"stale cache {path}: {key!r} is {meta.get(key, '<absent>')!r} in {sidecar_path(path)}, "
                f"expected {expected!r}{origin}; rebuild the cache"
            )


def require_finite(path: PathLike, tensors: dict[str, Tensor]) -> None:
    """Raise naming the cache file and the first tensor holding NaN/inf."""
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"cache {path}: tensor {name!r} holds NaN/inf values; rebuild the cache")


def tensors_digest(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """sha256 over the meta record and every tensor (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors of a safetensors cache file and the metadata embedded in its header."""
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read cache {path}: {error}") from error
    if HEADER_META_KEY not in header:
        raise ValueError(f"cache {path}: header has no {HEADER_META_KEY!r} record (not an sd4match cache)")
    return tensors, json.loads(header[HEADER_META_KEY])


class TensorCache:
    """Per-image tensors of one cache file, read whole into memory and checked against the expected meta."""

    kind: str = ""

    def __init__(self, path: Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        self.path = path
        self.meta = meta
        self._tensors = tensors
        self._digest: str | None = None

    @classmethod
    def load(
        cls: type[CacheT], path: PathLike, expect_meta: dict[str, Any], source: PathLike | None = None
    ) -> CacheT:
        """Open a cache file: sidecar present and matching ``expect_meta`` (derived from the model record
        ``source``, named in errors), header and tensors consistent, every value finite."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cache file {path} does not exist")
        meta = _read_sidecar(path)
        if meta.get("kind") != cls.kind:
            raise ValueError(f"cache {path}: kind is {meta.get('kind')!r}, expected {cls.kind!r}")
        check_meta(path, meta, expect_meta, source)
        tensors, header_meta = _read_tensors(path)
        if header_meta != meta:
            raise ValueError(
                f"stale cache {path}: sidecar {sidecar_path(path)} does not match the file's header record"
            )
        names = [tensor_name(key, field) for key in meta["keys"] for field in KIND_FIELDS[cls.kind]]
        absent = [name for name in names if name not in tensors]
        if absent:
            raise ValueError(f"cache {path}: tensors {absent[:3]} listed in the sidecar are missing")
        require_finite(path, tensors)
        return cls(path, meta, tensors)

    @property
    def digest(self) -> str:
        """sha256 of the cache's content (meta and tensors): what a training run's identity records."""
        if self._digest is None:
            self._digest = tensors_digest(self._tensors, self.meta)
        return self._digest

    @property
    def keys(self) -> list[str]:
        """Image keys in the order they were cached."""
        return list(self.meta["keys"])

    def __contains__(self, key: str) -> bool:
        return tensor_name(key, KIND_FIELDS[self.kind][0]) in self._tensors

    def __len__(self) -> int:
        return len(self.meta["keys"])

    def stack(self, keys: Sequence[str], field: str, device: torch.device | str | None = None) -> Tensor:
        """Stack one field of the given image keys to ``(B, ...)`` float32; an unknown key is a KeyError."""
        if isinstance(keys, str):
            raise TypeError(
                f"cache {self.path}: keys must be a sequence of image keys, got the string {keys!r}"
            )
        if not keys:
            raise ValueError(f"cache {self.path}: no image keys requested")
        rows = []
        for key in keys:
            name = tensor_name(key, field)
            if name not in self._tensors:
                raise KeyError(f"image key {key!r} is not in {self.kind} cache {self.path}")
            rows.append(self._tensors[name])
        stacked = torch.stack(rows).to(torch.float32)
        return stacked if device is None else stacked.to(device)


class LatentCache(TensorCache):
    """VAE posteriors (mean, std) per image key; training samples latents from them instead of the VAE."""

    kind = "latents"

    def mean(self, keys: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Posterior means ``(B, 4, S/8, S/8)`` float32 (unscaled)."""
        return self.stack(keys, "mean", device)

    def std(self, keys: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Posterior standard deviations ``(B, 4, S/8, S/8)`` float32 (unscaled)."""
        return self.stack(keys, "std", device)

    @property
    def posterior_dtype(self) -> torch.dtype:
        """dtype the VAE computed the posterior in (its weights' dtype, recorded by test-split caches; float32
        for the training caches): samples are drawn and formed in it, as ``latent_dist.sample()`` does."""
        encoder = self.meta.get("encoder") or {}
        name = encoder.get("dtype", "float32")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"cache {self.path}: encoder dtype {name!r} in its sidecar is not a float dtype")
        return dtype

    def sample(
        self,
        keys: Sequence[str],
        scaling_factor: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """One latent per key, ``(mean + std * eps) * scaling_factor`` as float32, drawn as
        ``latent_dist.sample()`` draws it: eps (one generator, or one per key) and the arithmetic in the
        posterior's dtype, so a half-precision VAE's sample is reproduced bit for bit."""
        dtype = self.posterior_dtype
        mean, std = self.mean(keys, device).to(dtype), self.std(keys, device).to(dtype)
        return sample_latents(mean, std, scaling_factor, generator).float()

    def require(self, keys: Sequence[str], what: str) -> None:
        """Raise naming the cache file and the first keys of ``what`` (e.g. a pairs table) it lacks."""
        absent = [key for key in keys if key not in self]
        if absent:
            raise KeyError(
                f"latent cache {self.path} lacks {len(absent)} image(s) of {what}, e.g. {absent[:3]}; "
                f"rebuild the cache from that pairs table"
            )


class DinoCache(TensorCache):
    """DINOv2 patch tokens and global descriptors per image key (CPM's input)."""

    kind = "dino"

    def tokens(self, keys: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Patch tokens ``(B, N, D)`` float32 (``(B, 256, 768)`` for DINOv2-B/14 at 224)."""
        return self.stack(keys, "tokens", device)

    def global_(self, keys: Sequence[str], device: torch.device | str | None = None) -> Tensor:
        """Global descriptors (pooler output) ``(B, D)`` float32."""
        return self.stack(keys, "global", device)


def open_dino_cache(cache_path: PathLike, record_path: PathLike) -> DinoCache:
    """A DINOv2 cache checked against the model record actually used: revision and the processor's
    preprocessing (read from the record's folder); a mismatch names the cache's sidecar and the record."""
    from transformers import AutoImageProcessor

    record = read_model_record(record_path)
    processor = AutoImageProcessor.from_pretrained(record.local_path)
    return DinoCache.load(cache_path, cache_meta(record, None, "dino", processor), source=record_path)


def run_latent_cache(
    pairs_paths: Sequence[PathLike],
    location_path: PathLike,
    model_record_path: PathLike,
    image_size: int,
    out_path: PathLike,
    device: str = "cpu",
) -> dict[str, Any]:
    """Snakemake entry: the latent cache of every image of some pairs tables of one dataset."""
    record = read_model_record(model_record_path)
    components = load_stable_diffusion(record.local_path, device=device)
    tables = [read_pairs_table(p) for p in pairs_paths]
    meta = cache_meta(record, image_size, "latents")
    root = read_location(location_path).root
    return build_latent_cache(
        tables, root, SDFeaturizer(components, device=device), image_size, out_path, meta
    )


def open_latent_cache(
    cache_path: PathLike, record_path: PathLike, image_size: int, featurizer: SDFeaturizer
) -> LatentCache:
    """A test-split latent cache checked against what the evaluation would compute itself: the model record's
    revision, the evaluation's image size and its featurizer's VAE (``encoder_meta``)."""
    record = read_model_record(record_path)
    expect = cache_meta(record, image_size, "latents", encoder=encoder_meta(featurizer))
    return LatentCache.load(cache_path, expect, source=record_path)


def encoder_features(encoder: Mapping[str, Any]) -> dict[str, Any]:
    """A config ``features`` block for loading SD as the evaluations do, from the keys that change the VAE
    (``precision``, ``channels_last``); the UNet-only keys get values that do not touch the VAE."""
    return {
        "precision": encoder["precision"],
        "channels_last": bool(encoder.get("channels_last", False)),
        "compile": False,
        "up_block_index": 1,
        "max_unet_batch": 1,
    }


def run_test_latent_cache(
    pairs_path: PathLike,
    location_path: PathLike,
    model_record_path: PathLike,
    image_size: int,
    encoder: Mapping[str, Any],
    out_path: PathLike,
    device: str = "cpu",
) -> dict[str, Any]:
    """Snakemake entry: the latent cache of a test split, one VAE pass per distinct image for every
    evaluation of the DAG. SD is loaded as the evaluations load it (``load_sd_featurizer``; ``encoder`` holds
    the config's ``features.precision`` and ``channels_last``) and each image is encoded alone, as the
    evaluation's own pass would, so the cached posterior is bitwise the one the evaluation would compute."""
    record = read_model_record(model_record_path)
    featurizer = load_sd_featurizer(record.local_path, encoder_features(encoder), device)
    meta = cache_meta(record, image_size, "latents", encoder=encoder_meta(featurizer))
    root = read_location(location_path).root
    table = read_pairs_table(pairs_path)
    return build_latent_cache(table, root, featurizer, image_size, out_path, meta, batch_size=1)


def run_dino_cache(
    pairs_paths: Sequence[PathLike],
    location_path: PathLike,
    model_record_path: PathLike,
    out_path: PathLike,
    device: str = "cpu",
) -> dict[str, Any]:
    """Snakemake entry: the DINOv2 token cache of every image of some pairs tables of one dataset."""
    record = read_model_record(model_record_path)
    model, processor = load_dinov2(record.local_path, device=device)
    tables = [read_pairs_table(p) for p in pairs_paths]
    meta = cache_meta(record, None, "dino", processor=processor)
    root = read_location(location_path).root
    return build_dino_cache(tables, root, model, processor, out_path, meta)
