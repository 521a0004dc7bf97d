"""Tiny models: hub layouts, real classes, SD block structures, offline CLIP tokenizer, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import AutoImageProcessor, CLIPTextModel, CLIPTokenizer

from sd4match.tiny_models import (
    PFPASCAL_CATEGORIES,
    PFWILLOW_CATEGORIES,
    SPAIR_CATEGORIES,
    build_bpe_merges,
    build_clip_vocab,
    build_tiny_model,
    build_tiny_stable_diffusion,
    build_tiny_world_models,
    bytes_to_unicode,
    folder_size,
    tokenizer_words,
)

SD_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
TRANSFORMERS_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
MAX_SD_BYTES = 16 * 2**20
MAX_VISION_BYTES = 2**20


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_world_models(tmp_path_factory.mktemp("tiny_world"), seed=0)


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bytes_to_unicode_is_gpt2_table() -> None:
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[ord("a")] == "a" and table[ord("~")] == "~"
    assert table[0] == chr(256)
    assert table[ord(" ")] == chr(256 + 32) == "Ġ"


def test_bpe_merges_build_words_left_to_right() -> None:
    assert build_bpe_merges(["photo"]) == [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]
    assert build_bpe_merges(["ab", "abc"]) == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]
    assert build_bpe_merges(["a"]) == []


def test_vocab_layout_is_clip_like() -> None:
    vocab, merges = build_clip_vocab(["ab"])
    assert len(vocab) == 256 + 256 + 1 + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["ab</w>"] == 512
    assert vocab["<|startoftext|>"] == 513 and vocab["<|endoftext|>"] == 514
    assert merges == [("a", "b</w>")]


def test_tokenizer_words_cover_prompts_and_categories() -> None:
    words = tokenizer_words()
    for word in ("a", "photo", "of", "sofa", "diningtable", "winebottle", "duck", "tvmonitor"):
        assert word in words
    assert "car(g)" not in words and "car" in words
    assert len(SPAIR_CATEGORIES) == 18 and len(PFPASCAL_CATEGORIES) == 20 and len(PFWILLOW_CATEGORIES) == 10


def test_world_has_hub_layouts(world: dict[str, Path]) -> None:
    assert sorted(world) == ["clip_vision", "dino", "dinov2", "sd15", "sd21"]
    for name in ("sd21", "sd15"):
        assert _relative_files(world[name]) == SD_FILES
        assert folder_size(world[name]) < MAX_SD_BYTES
    for name in ("dinov2", "dino", "clip_vision"):
        assert _relative_files(world[name]) == TRANSFORMERS_FILES
        assert folder_size(world[name]) < MAX_VISION_BYTES
    index = json.loads((world["sd21"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]


@pytest.mark.parametrize(
    ("variant", "linear", "prediction"), [("sd21", True, "v_prediction"), ("sd15", False, "epsilon")]
)
def test_sd_block_structure(world: dict[str, Path], variant: str, linear: bool, prediction: str) -> None:
    unet = UNet2DConditionModel.from_pretrained(world[variant], subfolder="unet")
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.use_linear_projection is linear
    assert list(unet.config.block_out_channels) == [32, 32, 64, 64]
    assert unet.config.cross_attention_dim == 32
    scheduler = DDPMScheduler.from_pretrained(world[variant], subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.prediction_type == prediction
    text_encoder = CLIPTextModel.from_pretrained(world[variant], subfolder="text_encoder")
    assert text_encoder.config.hidden_size == 32 and text_encoder.config.num_hidden_layers == 2
    assert text_encoder.config.max_position_embeddings == 77


def test_vae_downsamples_by_eight(world: dict[str, Path]) -> None:
    vae = AutoencoderKL.from_pretrained(world["sd21"], subfolder="vae")
    assert vae.config.scaling_factor == 0.18215
    assert len(vae.config.block_out_channels) == 4
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
    assert tuple(latent.shape) == (1, 4, 8, 6)


@pytest.mark.parametrize(("variant", "pad"), [("sd21", "!"), ("sd15", "<|endoftext|>")])
def test_tokenizer_encodes_categories_as_single_tokens(
    world: dict[str, Path], variant: str, pad: str
) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(world[variant], subfolder="tokenizer")
    vocab = json.loads((world[variant] / "tokenizer" / "vocab.json").read_text())
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (bos, eos, vocab[pad])
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    words = [vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"], vocab["cat</w>"]]
    assert ids == [bos, *words, eos] + [vocab[pad]] * 70
    for category in SPAIR_CATEGORIES + PFPASCAL_CATEGORIES:
        assert tokenizer(category).input_ids == [bos, vocab[category + "</w>"], eos]
    assert tokenizer("car(G)").input_ids == [
        bos,
        vocab["car</w>"],
        vocab["(</w>"],
        vocab["g</w>"],
        vocab[")</w>"],
        eos,
    ]


def test_vision_processors_have_reference_settings(world: dict[str, Path]) -> None:
    dinov2 = json.loads((world["dinov2"] / "preprocessor_config.json").read_text())
    assert dinov2["size"] == {"shortest_edge": 256}
    assert dinov2["crop_size"] == {"height": 224, "width": 224}
    assert dinov2["image_mean"] == [0.485, 0.456, 0.406] and dinov2["image_std"] == [0.229, 0.224, 0.225]
    config = json.loads((world["dinov2"] / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"]) == (32, 2, 14)
    dino = json.loads((world["dino"] / "config.json").read_text())
    assert dino["model_type"] == "vit" and dino["patch_size"] == 8
    clip = json.loads((world["clip_vision"] / "preprocessor_config.json").read_text())
    assert clip["crop_size"] == {"height": 336, "width": 336}
    processor = AutoImageProcessor.from_pretrained(world["dinov2"])
    pixels = processor(images=[Image.new("RGB", (400, 300), (255, 0, 0))], return_tensors="pt")[
        "pixel_values"
    ]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    assert pixels[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-5)


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = build_tiny_stable_diffusion(tmp_path / "a", seed=3)
    second = build_tiny_stable_diffusion(tmp_path / "b", seed=3)
    other = build_tiny_stable_diffusion(tmp_path / "c", seed=4)
    for name in SD_FILES:
        assert _sha256(first / name) == _sha256(second / name), name
    assert _sha256(first / "unet/diffusion_pytorch_model.safetensors") != _sha256(
        other / "unet/diffusion_pytorch_model.safetensors"
    )


def test_rebuild_replaces_folder_and_bad_variant_fails(tmp_path: Path) -> None:
    target = tmp_path / "sd"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    build_tiny_stable_diffusion(target, seed=0, variant="sd15")
    assert not (target / "stale.txt").exists()
    assert _relative_files(target) == SD_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # no temporary folders left behind
    with pytest.raises(ValueError, match="variant"):
        build_tiny_stable_diffusion(tmp_path / "x", variant="sdxl")
    with pytest.raises(ValueError, match="unknown tiny model 'sdxl'"):
        build_tiny_model("sdxl", tmp_path / "x")
    assert _relative_files(build_tiny_model("dino", tmp_path / "dino", seed=1)) == TRANSFORMERS_FILES


def test_a_killed_builds_staging_folders_are_swept_by_the_next_build(tmp_path: Path) -> None:
    """A tiny-model job killed mid-write leaves `.sd.<host>-<pid>.*.tmp` (and a replaced folder's `.old`):
    the next build of the same folder removes those of dead processes on this host, and nothing else."""
    import subprocess
    import sys

    from sd4match.io import owner_tag

    host = owner_tag().rsplit("-", 1)[0]
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)  # fmt: skip
    killed = tmp_path / f".sd.{host}-{dead}.k2j4x9_a.tmp"
    trash = tmp_path / f".sd.{host}-{dead}.q8w7e6r5.old"
    other_host = tmp_path / ".sd.node17-4242.abcdefgh.tmp"
    for folder in (killed, trash, other_host):
        (folder / "unet").mkdir(parents=True)
    build_tiny_stable_diffusion(tmp_path / "sd", seed=0, variant="sd15")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sd", other_host.name])
