"""Tiny, seeded, randomly initialised models of the real classes (SD, DINOv2, DINO, CLIP vision).

They are saved with ``save_pretrained`` in the hub layouts, so tests and the demo pipeline load them with the
same ``from_pretrained`` code as the real hub models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from sd4match.datasets import PFPASCAL_CLASSES, PFWILLOW_CLASSES, SPAIR_CATEGORIES
from sd4match.io import owner_tag, sweep_leftovers, temp_prefix, write_json_atomic, write_text_atomic
from sd4match.prompts import category_phrase

# The category words the tiny tokenizer must know: the three benchmarks' categories (sd4match.datasets).
PFPASCAL_CATEGORIES = PFPASCAL_CLASSES
PFWILLOW_CATEGORIES = PFWILLOW_CLASSES
PROMPT_WORDS = ("a", "an", "photo", "of", "the")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_TEXT_LENGTH = 77
TEXT_HIDDEN_SIZE = 32
UNET_CHANNELS = (32, 32, 64, 64)
VAE_CHANNELS = (32, 32, 64, 64)
SD_SCALING_FACTOR = 0.18215
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIL_BILINEAR = 2
PIL_BICUBIC = 3
VARIANTS = ("sd21", "sd15")


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; move it onto ``out_dir`` only if the block succeeds.
    Folders a killed writer of ``out_dir`` left (``.<name>.<host>-<pid>.*``) are swept first."""
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target.parent, temp_prefix(target), ".tmp")
    sweep_leftovers(target.parent, temp_prefix(target), ".old")
    prefix = f"{temp_prefix(target)}{owner_tag()}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (the base alphabet of byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def tokenizer_words() -> list[str]:
    """Lower-cased words the tiny tokenizer encodes as single tokens: prompt words and dataset categories."""
    words: set[str] = set(PROMPT_WORDS)
    for category in SPAIR_CATEGORIES + PFPASCAL_CATEGORIES + PFWILLOW_CATEGORIES:
        words.update(category_phrase(category).lower().split())
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply CLIP's BPE to one word (last symbol carries ``</w>``), merging the lowest-ranked pair first."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        ranked = [ranks[pair] for pair in zip(symbols, symbols[1:], strict=False) if pair in ranks]
        if not ranked:
            break
        best = min(ranked)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and ranks.get((symbols[i], symbols[i + 1])) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE training: add merges until each word is one token; later merges leave earlier words."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _bpe(word, ranks)
    return merges


def build_clip_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary: 256 byte chars, their ``</w>`` forms, the merge results, then SOS and EOS."""
    alphabet = list(bytes_to_unicode().values())
    merges = build_bpe_merges(words)
    tokens = (
        alphabet + [c + END_OF_WORD for c in alphabet] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    )
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tiny_clip_tokenizer(out_dir: Path, pad_token: str) -> CLIPTokenizer:
    """Write the hub SD tokenizer layout (vocab.json, merges.txt, configs) offline and load it back."""
    vocab, merges = build_clip_vocab(tokenizer_words())
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TEXT_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    write_json_atomic(out_dir / "vocab.json", vocab)
    write_text_atomic(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_json_atomic(out_dir / "special_tokens_map.json", special)
    write_json_atomic(out_dir / "tokenizer_config.json", config)
    return CLIPTokenizer.from_pretrained(out_dir)


def tiny_text_encoder(tokenizer: CLIPTokenizer, variant: str, seed: int) -> CLIPTextModel:
    """CLIPTextModel with 32 hidden units and 2 layers; SD 2-1 uses gelu, SD 1-5 quick_gelu."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_LENGTH,
        hidden_act="gelu" if variant == "sd21" else "quick_gelu",
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_unet(variant: str, seed: int) -> UNet2DConditionModel:
    """UNet2DConditionModel with SD 2-1's (or SD 1-5's) block structure and tiny channels (32, 32, 64, 64)."""
    sd21 = variant == "sd21"
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=(2, 2, 4, 4) if sd21 else 8,
        use_linear_projection=sd21,
        upcast_attention=sd21,
        flip_sin_to_cos=True,
        freq_shift=0,
    ).eval()


def tiny_vae(seed: int) -> AutoencoderKL:
    """AutoencoderKL with 4 blocks (downsampling factor 8 like SD's VAE) and SD's scaling factor 0.18215."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=SD_SCALING_FACTOR,
    ).eval()


def sd_scheduler(variant: str) -> DDPMScheduler:
    """DDPMScheduler with SD's training schedule: 1000 steps, scaled_linear 0.00085..0.012."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if variant == "sd21" else "epsilon",
        steps_offset=1,
    )


def sd_model_index() -> dict[str, object]:
    """``model_index.json`` of a StableDiffusionPipeline folder with the components written here."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_stable_diffusion(
    out_dir: str | os.PathLike[str], seed: int = 0, variant: str = "sd21"
) -> Path:
    """Build a tiny SD 2-1 (``variant="sd21"``) or SD 1-5 (``"sd15"``) folder in the hub layout."""
    if variant not in VARIANTS:
        raise ValueError(f"build_tiny_stable_diffusion: variant must be one of {VARIANTS}, got {variant!r}")
    with _atomic_dir(out_dir) as tmp:
        tokenizer = write_tiny_clip_tokenizer(
            tmp / "tokenizer", pad_token="!" if variant == "sd21" else EOS_TOKEN
        )
        tiny_unet(variant, seed).save_pretrained(tmp / "unet", safe_serialization=True)
        tiny_vae(seed).save_pretrained(tmp / "vae", safe_serialization=True)
        tiny_text_encoder(tokenizer, variant, seed).save_pretrained(
            tmp / "text_encoder", safe_serialization=True
        )
        sd_scheduler(variant).save_pretrained(tmp / "scheduler")
        write_json_atomic(tmp / "model_index.json", sd_model_index())
    return Path(out_dir)


def build_tiny_dinov2(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Tiny Dinov2Model (hidden 32, 2 layers, patch 14) with DINOv2's processor (resize 256, crop 224)."""
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
    )
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=PIL_BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    torch.manual_seed(seed)
    model = Dinov2Model(config).eval()
    return _save_model_and_processor(out_dir, model, processor)


def build_tiny_dino_vit(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Tiny DINO v1 style ViTModel (patch 8, no pooler) with DINO's processor (224x224 bilinear)."""
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        patch_size=8,
        image_size=224,
        qkv_bias=True,
    )
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=PIL_BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False).eval()
    return _save_model_and_processor(out_dir, model, processor)


def build_tiny_clip_vision(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Tiny CLIPVisionModelWithProjection (ViT-L/14-336 layout: patch 14, 336 px) with CLIP's processor."""
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=336,
        projection_dim=TEXT_HIDDEN_SIZE,
        hidden_act="quick_gelu",
    )
    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 336},
        resample=PIL_BICUBIC,
        do_center_crop=True,
        crop_size={"height": 336, "width": 336},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    return _save_model_and_processor(out_dir, model, processor)


def _save_model_and_processor(out_dir: str | os.PathLike[str], model, processor) -> Path:
    """Save a transformers model and its image processor side by side into ``out_dir`` atomically."""
    with _atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return Path(out_dir)


TINY_MODEL_NAMES = ("sd21", "sd15", "dinov2", "dino", "clip_vision")


def build_tiny_model(name: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny model ``name`` (one of TINY_MODEL_NAMES) into ``out_dir``; used by the demo workflow."""
    if name in VARIANTS:
        return build_tiny_stable_diffusion(out_dir, seed=seed, variant=name)
    builders = {
        "dinov2": build_tiny_dinov2,
        "dino": build_tiny_dino_vit,
        "clip_vision": build_tiny_clip_vision,
    }
    if name not in builders:
        raise ValueError(f"build_tiny_model: unknown tiny model {name!r}; expected one of {TINY_MODEL_NAMES}")
    return builders[name](out_dir, seed=seed)


def build_tiny_world_models(out_dir: str | os.PathLike[str], seed: int = 0) -> dict[str, Path]:
    """Build every tiny model into ``out_dir/{sd21,sd15,dinov2,dino,clip_vision}``; returns name -> folder."""
    root = Path(out_dir)
    return {name: build_tiny_model(name, root / name, seed=seed) for name in TINY_MODEL_NAMES}


def folder_size(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
