"""Latent and DINOv2 caches on the tiny models: cache == direct computation, flips, meta checks, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file

from sd4match.caches import (
    DinoCache,
    LatentCache,
    build_dino_cache,
    build_latent_cache,
    cache_meta,
    distinct_images,
    image_key,
    sidecar_path,
)
from sd4match.features import SDFeaturizer, preprocess
from sd4match.models import ModelRecord, load_dinov2, load_stable_diffusion
from sd4match.tiny_models import SD_SCALING_FACTOR, build_tiny_dinov2, build_tiny_stable_diffusion

S = 64
IMAGES = {"cat/a.png": (48, 40), "cat/b.png": (30, 52), "dog/c.png": (37, 37)}
SD_RECORD = ModelRecord("sd21", "/models/sd21", "main", "abc123", "/models/sd21", "local")
DINO_RECORD = ModelRecord("dinov2", "/models/dinov2", "main", "def456", "/models/dinov2", "local")


@pytest.fixture(scope="session")
def featurizer(tmp_path_factory: pytest.TempPathFactory) -> SDFeaturizer:
    folder = build_tiny_stable_diffusion(tmp_path_factory.mktemp("caches_sd") / "sd21", seed=0)
    return SDFeaturizer(load_stable_diffusion(folder))


@pytest.fixture(scope="session")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return load_dinov2(build_tiny_dinov2(tmp_path_factory.mktemp("caches_dino") / "dinov2", seed=0))


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dataset root with three random RGB images of different sizes (PNG, lossless)."""
    folder = tmp_path_factory.mktemp("caches_images")
    rng = np.random.default_rng(0)
    for relpath, (width, height) in IMAGES.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / relpath)
    return folder


@pytest.fixture(scope="session")
def pairs() -> pd.DataFrame:
    """Three pairs: a-b and b-c unflipped, a-b flipped -> five distinct (image, flip) keys."""
    return pd.DataFrame(
        {
            "src_image": ["cat/a.png", "cat/b.png", "cat/a.png"],
            "trg_image": ["cat/b.png", "dog/c.png", "cat/b.png"],
            "flip": [False, False, True],
        }
    )


KEYS = ["cat/a.png|0", "cat/b.png|0", "dog/c.png|0", "cat/a.png|1", "cat/b.png|1"]


@pytest.fixture(scope="session")
def latent_cache(tmp_path_factory: pytest.TempPathFactory, featurizer, root, pairs) -> Path:
    out = tmp_path_factory.mktemp("caches_latents") / "latents.safetensors"
    build_latent_cache([pairs], root, featurizer, S, out, cache_meta(SD_RECORD, S, "latents"), batch_size=2)
    return out


@pytest.fixture(scope="session")
def dino_cache(tmp_path_factory: pytest.TempPathFactory, dinov2, root, pairs) -> Path:
    model, processor = dinov2
    out = tmp_path_factory.mktemp("caches_dino_out") / "dino.safetensors"
    build_dino_cache(
        [pairs], root, model, processor, out, cache_meta(DINO_RECORD, None, "dino", processor), 2
    )
    return out


def _image(root: Path, relpath: str, flip: bool) -> Image.Image:
    """The image as fed, loaded independently of sd4match.datasets."""
    image = Image.open(root / relpath).convert("RGB")
    return ImageOps.mirror(image) if flip else image


def _split(key: str) -> tuple[str, bool]:
    """(relpath, flip) of an image key."""
    relpath, flip = key.split("|")
    return relpath, flip == "1"


def _chunks_of_two(keys: list[str]) -> list[list[str]]:
    return [keys[i : i + 2] for i in range(0, len(keys), 2)]


def _direct_dino(dinov2: tuple, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens (CLS dropped) and pooler output of the model on the processor's default output."""
    model, processor = dinov2
    with torch.no_grad():
        out = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    return out.last_hidden_state[:, 1:], out.pooler_output


def test_image_key_and_distinct_images(pairs: pd.DataFrame) -> None:
    assert image_key("JPEGImages/2008_000008.jpg", True) == "JPEGImages/2008_000008.jpg|1"
    assert image_key("a.jpg", np.bool_(False)) == "a.jpg|0"
    assert distinct_images(pairs) == [
        ("cat/a.png", False),
        ("cat/b.png", False),
        ("dog/c.png", False),
        ("cat/a.png", True),
        ("cat/b.png", True),
    ]
    with pytest.raises(ValueError, match="flip"):
        distinct_images(pairs.drop(columns=["flip"]))


def test_cache_meta_from_model_record(dinov2: tuple) -> None:
    assert cache_meta(SD_RECORD, 768, "latents") == {
        "kind": "latents",
        "model": "sd21",
        "revision_resolved": "abc123",
        "image_size": 768,
        "processor": None,
    }
    meta = cache_meta(DINO_RECORD, None, "dino", dinov2[1])
    assert meta["revision_resolved"] == "def456" and meta["image_size"] is None
    assert meta["processor"]["crop_size"] == {"height": 224, "width": 224}
    assert meta["processor"]["size"] == {"shortest_edge": 256}
    with pytest.raises(ValueError, match="kind"):
        cache_meta(SD_RECORD, 768, "vae")
    with pytest.raises(ValueError, match="processor"):
        cache_meta(DINO_RECORD, None, "dino")


def test_latent_cache_files_and_sidecar(latent_cache: Path) -> None:
    assert sorted(p.name for p in latent_cache.parent.iterdir()) == [
        "latents.safetensors",
        "latents.safetensors.json",
    ]
    sidecar = json.loads(sidecar_path(latent_cache).read_text())
    assert sidecar == {**cache_meta(SD_RECORD, S, "latents"), "keys": KEYS}


def test_latent_cache_equals_direct_posterior(
    latent_cache: Path, featurizer: SDFeaturizer, root: Path
) -> None:
    cache = LatentCache.load(latent_cache, cache_meta(SD_RECORD, S, "latents"))
    assert cache.keys == KEYS and len(cache) == 5 and "cat/a.png|1" in cache
    for chunk in _chunks_of_two(KEYS):  # the build's batches (batch_size=2): bit-identical
        mean, std = featurizer.latent_distribution(
            preprocess([_image(root, *_split(key)) for key in chunk], S)
        )
        assert torch.equal(cache.mean(chunk), mean) and torch.equal(cache.std(chunk), std)
    for key in KEYS:  # one image at a time: equal up to float32 rounding of batched convolutions
        mean, std = featurizer.latent_distribution(preprocess([_image(root, *_split(key))], S))
        torch.testing.assert_close(cache.mean([key]), mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(cache.std([key]), std, rtol=0, atol=1e-5)
    both = cache.mean(["dog/c.png|0", "cat/a.png|0"])
    assert both.shape == (2, 4, S // 8, S // 8) and both.dtype == torch.float32
    assert torch.equal(both[1], cache.mean(["cat/a.png|0"])[0])


def test_flipped_latents_differ_from_unflipped(latent_cache: Path) -> None:
    cache = LatentCache.load(latent_cache, cache_meta(SD_RECORD, S, "latents"))
    plain, flipped = cache.mean(["cat/a.png|0"]), cache.mean(["cat/a.png|1"])
    assert (plain - flipped).abs().max() > 1e-3


def test_latent_sample_is_mean_plus_std_noise_scaled(latent_cache: Path) -> None:
    cache = LatentCache.load(latent_cache, cache_meta(SD_RECORD, S, "latents"))
    keys = ["cat/b.png|1", "dog/c.png|0"]
    sample = cache.sample(keys, SD_SCALING_FACTOR, torch.Generator().manual_seed(7))
    eps = torch.randn((2, 4, S // 8, S // 8), generator=torch.Generator().manual_seed(7))
    expected = (cache.mean(keys) + cache.std(keys) * eps) * SD_SCALING_FACTOR
    assert torch.equal(sample, expected)


def test_stale_latent_cache_names_file_and_key(latent_cache: Path) -> None:
    other_revision = ModelRecord("sd21", "/models/sd21", "main", "zzz999", "/models/sd21", "local")
    with pytest.raises(ValueError, match=r"stale cache .*latents\.safetensors.*'revision_resolved'"):
        LatentCache.load(latent_cache, cache_meta(other_revision, S, "latents"))
    with pytest.raises(ValueError, match=r"stale cache .*'image_size'"):
        LatentCache.load(latent_cache, cache_meta(SD_RECORD, 2 * S, "latents"))
    with pytest.raises(ValueError, match="kind is 'latents', expected 'dino'"):
        DinoCache.load(latent_cache, {})


def test_missing_key_names_key_and_file(latent_cache: Path) -> None:
    cache = LatentCache.load(latent_cache, cache_meta(SD_RECORD, S, "latents"))
    with pytest.raises(KeyError, match=r"dog/c\.png\|1.*latents\.safetensors"):
        cache.sample(["cat/a.png|0", "dog/c.png|1"], SD_SCALING_FACTOR)


def test_sidecar_not_matching_file_is_stale(latent_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(latent_cache.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"copy\.safetensors\.json"):
        LatentCache.load(copy, {})
    forged = {**json.loads(sidecar_path(latent_cache).read_text()), "revision_resolved": "zzz999"}
    sidecar_path(copy).write_text(json.dumps(forged))
    with pytest.raises(ValueError, match=r"stale cache .*copy\.safetensors.*header"):
        LatentCache.load(copy, {"revision_resolved": "zzz999"})
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        LatentCache.load(tmp_path / "absent.safetensors", {})


def test_build_rejects_contradicting_meta(
    featurizer: SDFeaturizer, root: Path, pairs, tmp_path: Path
) -> None:
    out = tmp_path / "latents.safetensors"
    with pytest.raises(ValueError, match="kind 'dino'"):
        build_latent_cache([pairs], root, featurizer, S, out, {"kind": "dino"})
    with pytest.raises(ValueError, match="image_size 128"):
        build_latent_cache([pairs], root, featurizer, S, out, cache_meta(SD_RECORD, 128, "latents"))
    with pytest.raises(ValueError, match="no image"):
        build_latent_cache([pairs.iloc[:0]], root, featurizer, S, out, {})
    assert not out.exists()


def test_dino_cache_equals_model_output_in_fp16(dino_cache: Path, dinov2: tuple, root: Path) -> None:
    cache = DinoCache.load(dino_cache, cache_meta(DINO_RECORD, None, "dino", dinov2[1]))
    assert cache.keys == KEYS
    tokens = cache.tokens(KEYS)
    assert tokens.shape == (5, 256, 32) and tokens.dtype == torch.float32
    assert cache.global_(KEYS).shape == (5, 32)
    for chunk in _chunks_of_two(KEYS):  # the build's batches (batch_size=2)
        direct_tokens, direct_global = _direct_dino(dinov2, [_image(root, *_split(key)) for key in chunk])
        assert torch.equal(cache.tokens(chunk), direct_tokens.half().float())
        assert torch.equal(cache.global_(chunk), direct_global.half().float())


def test_dino_flipped_entry_differs_and_processor_change_is_stale(dino_cache: Path, dinov2: tuple) -> None:
    processor = dinov2[1]
    cache = DinoCache.load(dino_cache, cache_meta(DINO_RECORD, None, "dino", processor))
    assert (cache.tokens(["cat/b.png|0"]) - cache.tokens(["cat/b.png|1"])).abs().max() > 1e-2
    meta = cache_meta(DINO_RECORD, None, "dino", processor)
    meta["processor"]["crop_size"] = {"height": 196, "width": 196}
    with pytest.raises(ValueError, match=r"stale cache .*dino\.safetensors.*'processor'"):
        DinoCache.load(dino_cache, meta)


# ------------------------------------------------------------------------------ finite, reproducible, digest


def test_identical_builds_write_byte_identical_caches(
    latent_cache: Path, dino_cache: Path, featurizer: SDFeaturizer, dinov2: tuple, root: Path, pairs, tmp_path
) -> None:
    latents = tmp_path / "latents.safetensors"
    build_latent_cache(
        [pairs], root, featurizer, S, latents, cache_meta(SD_RECORD, S, "latents"), batch_size=2
    )
    model, processor = dinov2
    dino = tmp_path / "dino.safetensors"
    build_dino_cache(
        [pairs], root, model, processor, dino, cache_meta(DINO_RECORD, None, "dino", processor), 2
    )
    for built, reference in ((latents, latent_cache), (dino, dino_cache)):
        assert built.read_bytes() == reference.read_bytes()
        assert sidecar_path(built).read_bytes() == sidecar_path(reference).read_bytes()


def test_non_finite_latents_stop_the_build_naming_file_and_image(
    featurizer: SDFeaturizer, root: Path, pairs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = featurizer.latent_distribution

    def poisoned(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = real(pixels)
        return mean, std.index_fill(0, torch.tensor([1]), float("inf"))  # second image of each batch

    monkeypatch.setattr(featurizer, "latent_distribution", poisoned)
    out = tmp_path / "latents.safetensors"
    with pytest.raises(FloatingPointError, match=r"latents\.safetensors: .*'cat/b\.png\|0::std'.*not finite"):
        build_latent_cache([pairs], root, featurizer, S, out, cache_meta(SD_RECORD, S, "latents"), 2)
    assert list(tmp_path.iterdir()) == []


def test_dino_tokens_overflowing_float16_stop_the_build(
    dinov2: tuple, root: Path, pairs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd4match import caches

    real = caches.dino_features
    monkeypatch.setattr(caches, "dino_features", lambda *a: (real(*a)[0] * 1e6, real(*a)[1]))
    model, processor = dinov2
    out = tmp_path / "dino.safetensors"
    meta = cache_meta(DINO_RECORD, None, "dino", processor)
    with pytest.raises(FloatingPointError, match=r"dino\.safetensors: .*'cat/a\.png\|0::tokens'.*not finite"):
        build_dino_cache([pairs], root, model, processor, out, meta, 2)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_holding_nan_is_refused_when_loaded(latent_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.safetensors"
    with safe_open(latent_cache, framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["dog/c.png|0::mean"][0, 1, 2] = float("nan")
    save_file(tensors, copy, metadata=header)
    sidecar_path(copy).write_text(sidecar_path(latent_cache).read_text())
    with pytest.raises(ValueError, match=r"copy\.safetensors: tensor 'dog/c\.png\|0::mean' holds NaN/inf"):
        LatentCache.load(copy, cache_meta(SD_RECORD, S, "latents"))


def test_digest_identifies_the_content(latent_cache: Path, tmp_path: Path) -> None:
    meta = cache_meta(SD_RECORD, S, "latents")
    cache = LatentCache.load(latent_cache, meta)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(latent_cache.read_bytes())
    sidecar_path(copy).write_text(sidecar_path(latent_cache).read_text())
    assert LatentCache.load(copy, meta).digest == cache.digest and len(cache.digest) == 64
    with safe_open(latent_cache, framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["dog/c.png|0::mean"][0, 1, 2] += 1e-3
    save_file(tensors, copy, metadata=header)
    assert LatentCache.load(copy, meta).digest != cache.digest


def test_stale_cache_names_the_model_record_it_was_checked_against(latent_cache: Path) -> None:
    other = ModelRecord("sd21", "/models/sd21", "main", "zzz999", "/models/sd21", "local")
    with pytest.raises(
        ValueError,
        match=r"stale cache .*latents\.safetensors\.json, expected 'zzz999' from model record "
        r"records/sd21\.json",
    ):
        LatentCache.load(latent_cache, cache_meta(other, S, "latents"), source="records/sd21.json")
