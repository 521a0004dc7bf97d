"""Zero-shot baselines of Tables 1-3: DINO / DINOv2 patch features, the ODISE implicit captioner and
SD+DINO / SD+DINO* (Zhang et al. 2023, "A Tale of Two Features").

Peer code followed (facts, re-implemented here):
- ODISE implicit captioner: NVlabs/ODISE ``odise/modeling/meta_arch/ldm.py`` (``PositionalLinear``,
  ``LdmImplicitCaptionerExtractor``: ``cond_inputs = uncond_inputs + tanh(alpha_cond) * clip_project(embed)``,
  ``cond_emb = tanh(alpha_cond_time_embed) * time_embed_project(embed)`` added to the UNet time embedding),
  ``odise/modeling/meta_arch/clip.py`` (``ClipAdapter(normalize=False)``: the projected CLS embedding) and
  ``configs/common/models/odise_with_label.py`` (ViT-L-14-336, ``learnable_time_embed=True``,
  ``num_timesteps=1``, ``unet_block_indices=(2, 5, 8, 11)``).
- SD+DINO: Junyi42/sd-dino ``pck_spair_pascal.py`` (SD 1-5 at 960 px, t=100, PCA dims 256/256/256,
  DINOv2-B/14 at 840 px, last block's tokens, SD and DINO parts L2-normalised and concatenated with equal
  weight), ``utils/utils_correspondence.py`` (``co_pca``: one PCA over the stacked cells of both images per
  map, s5 upsampled to s4, ``[s4, s5]`` upsampled to s3, channel order ``[s3, s4, s5]``),
  ``third_party/ODISE/odise/modeling/meta_arch/ldm.py`` (``decoder_only``: the feature of LDM output block
  ``idx`` is ``h`` *before* its skip concatenation) and ``.../backbone/feature_extractor.py`` (raw features:
  output blocks 2, 5, 8 -> s5, s4, s3).

In diffusers terms LDM output blocks ``3 i .. 3 i + 2`` are the layers of ``unet.up_blocks[i]``, so the
``decoder_only`` feature before output block ``3 i + 2`` is the output of the second-to-last layer
(resnet + attention) of ``up_blocks[i]``, before its last resnet and upsampler: s5 = ``up_blocks[0]``
(1/64 of the image, 1280 ch), s4 = ``up_blocks[1]`` (1/32, 1280 ch), s3 = ``up_blocks[2]`` (1/16, 640 ch).
"""

from __future__ import annotations

import contextlib
import math
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm
from transformers import CLIPVisionConfig, ViTModel

from sd4match.datasets import load_image
from sd4match.evaluation import FeatureFn, ImageKey, MatchingSettings, score_pair
from sd4match.features import SDFeaturizer
from sd4match.frames import PairScorer, pad_image
from sd4match.io import atomic_path
from sd4match.metrics import PairScore, per_pair_frame
from sd4match.models import SDComponents
from sd4match.prompts import TextPrompt, encode_sequence, encode_text
from sd4match.tiny_models import UNET_CHANNELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ODISE_PREFIX = "backbone.feature_extractor."
POSITIONAL_INIT_STD = 0.02
SD_DINO_BLOCKS = (0, 1, 2)
SD_DINO_PCA_DIMS = (256, 256, 256)
SD_DINO_PREPROCESS = ("squash", "pad")  # this pipeline's squashed S x S input, or sd-dino's padded square
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_WRAPPERS = ("model", "state_dict")
TINY_TIME_EMBED_DIM = 4 * UNET_CHANNELS[0]  # diffusers' time embedding width of the tiny UNet

PairFeatureFn = Callable[[Image.Image, Image.Image, str], tuple[Tensor, Tensor]]
"""Maps (source image, target image, category) to their feature maps ``(C, h, w)`` each."""


# ---------------------------------------------------------------------------------------------------------
# DINO / DINOv2 patch features
# ---------------------------------------------------------------------------------------------------------


def patch_token_offset(model: nn.Module) -> int:
    """Number of leading non-patch tokens of a ViT: the CLS token plus DINOv2's register tokens (if any)."""
    return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)


def patch_size(model: nn.Module) -> int:
    """The ViT's patch size in pixels (14 for DINOv2-B/14, 8 for DINO ViT-B/8)."""
    size = model.config.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def vit_pixels(
    images: Sequence[Image.Image],
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resample: int = Image.LANCZOS,
) -> Tensor:
    """Images resized anisotropically to S x S and normalised with ImageNet mean/std: (B, 3, S, S).

    Lanczos resampling, as sd-dino's ``utils_correspondence.resize``; no image processor, no crop.
    """
    if not images:
        raise ValueError("vit_pixels: empty image list")
    arrays = [
        np.asarray(image.convert("RGB").resize((image_size, image_size), resample), dtype=np.float32)
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t


def check_vit_size(model: nn.Module, image_size: int) -> int:
    """The token grid side ``S / patch``; raises when S is not a positive multiple of the patch size."""
    patch = patch_size(model)
    if image_size < patch or image_size % patch:
        raise ValueError(
            f"ViT image_size must be a positive multiple of the patch size {patch}, got {image_size}"
        )
    return image_size // patch


@dataclass(frozen=True)
class VitFacet:
    """Which ViT activation is the dense descriptor (Amir et al.'s "facets", as sd-dino's ``ViTExtractor``).

    ``facet``: ``"token"`` (a block's output tokens) or ``"key"`` (a block's attention key projection, the
    heads concatenated; the head/channel order does not change cosine similarities). ``layer``: 0-based block
    index; None = the last block, whose ``"token"`` facet is read after the final LayerNorm
    (``last_hidden_state``, this pipeline's default). ``stride``: patch-embedding stride in pixels (None = the
    patch size); a smaller stride gives overlapping patches, ``1 + (S - patch) // stride`` per side, with the
    position embeddings interpolated (bicubic) to that grid. Only a DINO v1 ``ViTModel`` takes a stride.
    """

    facet: str = "token"
    layer: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        if self.facet not in VIT_FACETS:
            raise ValueError(f"VitFacet: facet must be one of {VIT_FACETS}, got {self.facet!r}")
        if self.facet == "key" and self.layer is None:
            raise ValueError("VitFacet: the key facet needs a layer (0-based block index)")
        if (self.layer is not None and self.layer < 0) or (self.stride is not None and self.stride < 1):
            raise ValueError(f"VitFacet: layer must be >= 0 and stride >= 1, got {self.layer}, {self.stride}")

    @classmethod
    def from_method(cls, method: dict[str, Any]) -> VitFacet:
        """The facet of a ``zero_shot`` method of kind vit (keys ``facet``, ``layer``, ``stride``)."""
        return cls(method.get("facet", "token"), method.get("layer"), method.get("stride"))

    def label(self) -> str:
        """E.g. "key facet, layer 9, stride 4" or "last-layer tokens" for the tables."""
        if self.layer is None:
            text = "last-layer tokens"
        else:
            text = f"{self.facet} facet, layer {self.layer}"
        return text if self.stride is None else f"{text}, stride {self.stride}"


VIT_FACETS = ("token", "key")
LAST_LAYER_TOKENS = VitFacet()


def vit_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a DINO ``ViTModel`` (``layers``) or a ``Dinov2Model`` (``encoder.layer``)."""
    blocks = getattr(model, "layers", None)
    return blocks if blocks is not None else model.encoder.layer


def vit_grid_side(model: nn.Module, image_size: int, stride: int | None = None) -> int:
    """Patch tokens per side: ``S / patch`` (S a positive multiple of the patch), or with an explicit stride
    ``1 + (S - patch) // stride`` (S >= patch)."""
    patch = patch_size(model)
    if stride is None or stride == patch:
        return check_vit_size(model, image_size)
    if not isinstance(model, ViTModel):
        raise ValueError(f"a patch stride ({stride}) is supported for DINO v1 ViTModel only, not "
                         f"{type(model).__name__}")  # fmt: skip
    if image_size < patch:
        raise ValueError(f"ViT image_size must be >= the patch size {patch}, got {image_size}")
    return 1 + (image_size - patch) // stride


def strided_embeddings(model: ViTModel, pixels: Tensor, stride: int) -> Tensor:
    """CLS + patch embeddings of a DINO ``ViTModel`` with the patch projection applied every ``stride`` px
    (overlapping patches) and the library's bicubic interpolation of the position embeddings to that grid."""
    embeddings = model.embeddings
    projection = embeddings.patch_embeddings.projection
    patches = F.conv2d(pixels, projection.weight, projection.bias, stride=stride)
    height, width = patches.shape[-2:]
    tokens = torch.cat(
        [embeddings.cls_token.expand(pixels.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], 1
    )
    patch = patch_size(model)
    return tokens + embeddings.interpolate_pos_encoding(tokens, height * patch, width * patch)


class _StopViT(Exception):
    """Raised by the hook of the facet's layer; nothing after it runs."""


@contextlib.contextmanager
def _facet_hooks(model: nn.Module, facet: VitFacet) -> Iterator[dict[str, Tensor]]:
    """Hooks that swap in strided embeddings (if any) and capture the facet's activation, then stop."""
    store: dict[str, Tensor] = {}
    handles = []
    if facet.stride is not None and facet.stride != patch_size(model):
        stride = facet.stride
        handles.append(model.embeddings.register_forward_hook(
            lambda module, args, output: strided_embeddings(model, args[0], stride)
        ))  # fmt: skip
    if facet.layer is not None:
        blocks = vit_blocks(model)
        if facet.layer >= len(blocks):
            raise ValueError(
                f"ViT facet layer {facet.layer} does not exist: the model has {len(blocks)} blocks"
            )
        target = blocks[facet.layer].attention.k_proj if facet.facet == "key" else blocks[facet.layer]

        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            store["facet"] = _tensor_output(output)
            raise _StopViT

        handles.append(target.register_forward_hook(capture))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def vit_facet_tokens(model: nn.Module, pixels: Tensor, facet: VitFacet) -> Tensor:
    """All tokens (B, N, C) of the facet's activation for normalised pixels (B, 3, S, S)."""
    kwargs: dict[str, Any] = {"interpolate_pos_encoding": True} if isinstance(model, ViTModel) else {}
    with _facet_hooks(model, facet) as store:
        try:
            output = model(pixel_values=pixels, **kwargs)
        except _StopViT:
            return store["facet"]
    return output.last_hidden_state


@torch.no_grad()
def vit_patch_features(
    model: nn.Module,
    images: Sequence[Image.Image],
    image_size: int,
    final_norm: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    facet: VitFacet | None = None,
) -> Tensor:
    """Patch features of a DINO/DINOv2 ViT as an L2-normalised grid (B, C, side, side); CLS and register
    tokens dropped.

    Without ``facet``: last-layer tokens, after the final LayerNorm (``final_norm=True``,
    ``last_hidden_state``) or before it (sd-dino's ``facet='token'`` hook on the last block). With ``facet``:
    that ``VitFacet``.
    """
    if facet is None:
        facet = LAST_LAYER_TOKENS if final_norm else VitFacet("token", len(vit_blocks(model)) - 1)
    side = vit_grid_side(model, image_size, facet.stride)
    param = next(model.parameters())
    pixels = vit_pixels(images, image_size, mean, std).to(param.device, param.dtype)
    patches = vit_facet_tokens(model, pixels, facet)[:, patch_token_offset(model) :].float()
    if patches.shape[1] != side * side:
        raise ValueError(
            f"vit_patch_features: expected {side * side} patch tokens at {image_size} px, "
            f"got {patches.shape[1]}"
        )
    grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
    return F.normalize(grid, dim=1)


def vit_feature_fn(
    model: nn.Module,
    root: str | Path,
    image_size: int,
    device: str | torch.device = "cpu",
    final_norm: bool = True,
    batch_size: int = 8,
    facet: VitFacet | None = None,
    pad: bool = False,
) -> FeatureFn:
    """A ``FeatureFn`` of ViT patch features (DINO / DINOv2 rows of Tables 2/3) for ``evaluate_pairs``.

    Images are loaded from ``root`` (flipped per key), padded to the square first when ``pad`` (sd-dino's
    ``frames.pad_image``; squashed otherwise) and processed ``batch_size`` at a time; CPU output.
    """
    vit_grid_side(model, image_size, None if facet is None else facet.stride)
    if batch_size < 1:
        raise ValueError(f"vit_feature_fn: batch_size must be >= 1, got {batch_size}")
    model = model.to(device).eval()

    def features_for(keys: Sequence[ImageKey]) -> Tensor:
        out = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            images = [load_image(root, key.path, flip=key.flip) for key in chunk]
            if pad:
                images = [pad_image(image, image_size) for image in images]
            out.append(vit_patch_features(model, images, image_size, final_norm, facet=facet).cpu())
        return torch.cat(out)

    return features_for


# ---------------------------------------------------------------------------------------------------------
# ODISE implicit captioner
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SDConditioning:
    """What conditions the UNet: ``encoder_hidden_states`` (B, 77, D) and an optional (B, T) term added to
    the UNet's time embedding (the implicit captioner's ``cond_emb``)."""

    encoder_hidden_states: Tensor
    time_condition: Tensor | None = None


ConditioningFn = Callable[[list[Image.Image], list[str]], SDConditioning]
"""Maps images and their categories to the UNet conditioning of each image."""


class PositionalLinear(nn.Module):
    """ODISE's ``PositionalLinear``: a linear map of a (B, E) vector broadcast to (B, L, out) plus a learned
    positional embedding (1, L, out) (trunc-normal init, std 0.02)."""

    def __init__(self, in_features: int, out_features: int, seq_len: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, out_features))
        nn.init.trunc_normal_(self.positional_embedding, std=POSITIONAL_INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        """(B, E) -> (B, L, out): ``linear(x)`` added to every position's embedding."""
        return self.linear(x).unsqueeze(1) + self.positional_embedding


class ImplicitCaptioner(nn.Module):
    """ODISE implicit captioner: frozen CLIP image embedding -> ``PositionalLinear`` to 77 x D, gated by
    ``tanh(alpha_cond)`` (1, 77, D) and added to the empty-prompt text-encoder output; with
    ``time_embed_dim`` also a gated (B, T) term for the UNet time embedding."""

    def __init__(
        self,
        clip_vision: nn.Module,
        processor: Any,
        empty_encoding: Tensor,
        time_embed_dim: int | None = None,
        num_timesteps: int = 1,
    ) -> None:
        super().__init__()
        if empty_encoding.ndim != 3 or empty_encoding.shape[0] != 1:
            raise ValueError(
                f"ImplicitCaptioner: empty_encoding must be (1, L, D), got {tuple(empty_encoding.shape)}"
            )
        clip_vision.requires_grad_(False)
        self.clip_vision = clip_vision.eval()
        self.processor = processor
        embed_dim = int(clip_vision.config.projection_dim)
        seq_len, width = int(empty_encoding.shape[1]), int(empty_encoding.shape[2])
        self.register_buffer("uncond_inputs", empty_encoding.detach().float().clone(), persistent=False)
        self.clip_project = PositionalLinear(embed_dim, width, seq_len)
        self.alpha_cond = nn.Parameter(torch.zeros(1, seq_len, width))
        self.time_embed_project: PositionalLinear | None = None
        self.alpha_cond_time_embed: nn.Parameter | None = None
        if time_embed_dim is not None:
            self.time_embed_project = PositionalLinear(embed_dim, time_embed_dim, num_timesteps)
            self.alpha_cond_time_embed = nn.Parameter(torch.zeros(time_embed_dim))

    def learned_parameters(self) -> dict[str, nn.Parameter]:
        """The released (learned) tensors by their ODISE names; the frozen CLIP tower is not among them."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("clip_vision.")}

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> Tensor:
        """CLIP ``image_embeds`` (projected CLS, not normalised, as ODISE's ``ClipAdapter(normalize=False)``)
        of images after the CLIP processor (resize shortest edge, centre crop, normalise): (B, E)."""
        pixel_values = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        param = next(self.clip_vision.parameters())
        output = self.clip_vision(pixel_values=pixel_values.to(param.device, param.dtype))
        return output.image_embeds.float()

    def hidden_states_from_embeds(self, image_embeds: Tensor) -> Tensor:
        """``uncond_inputs + tanh(alpha_cond) * (linear(embed) + pos)``: (B, 77, D)."""
        prefix = self.clip_project(image_embeds.to(self.alpha_cond.device, self.alpha_cond.dtype))
        return self.uncond_inputs + torch.tanh(self.alpha_cond) * prefix

    def time_condition_from_embeds(self, image_embeds: Tensor) -> Tensor | None:
        """``tanh(alpha_cond_time_embed) * time_embed_project(embed)`` at the first (only) step: (B, T)."""
        if self.time_embed_project is None or self.alpha_cond_time_embed is None:
            return None
        embeds = image_embeds.to(self.alpha_cond_time_embed.device, self.alpha_cond_time_embed.dtype)
        return (torch.tanh(self.alpha_cond_time_embed) * self.time_embed_project(embeds))[:, 0]

    def condition(self, images: Sequence[Image.Image]) -> SDConditioning:
        """Both conditioning terms of images from one CLIP pass."""
        embeds = self.image_embeds(images)
        return SDConditioning(self.hidden_states_from_embeds(embeds), self.time_condition_from_embeds(embeds))

    def forward(self, images: Sequence[Image.Image]) -> Tensor:
        """UNet ``encoder_hidden_states`` (B, 77, D) of images."""
        return self.hidden_states_from_embeds(self.image_embeds(images))


def build_implicit_captioner(
    clip_vision: nn.Module, processor: Any, components: SDComponents, learnable_time_embed: bool = True
) -> ImplicitCaptioner:
    """An implicit captioner sized for an SD model: its empty-prompt encoding and time-embedding width."""
    with torch.no_grad():
        empty = encode_text(components.text_encoder, components.tokenizer, [""]).float()
    time_dim = int(components.unet.time_embedding.linear_2.out_features) if learnable_time_embed else None
    device = next(components.unet.parameters()).device
    return ImplicitCaptioner(clip_vision, processor, empty, time_embed_dim=time_dim).to(device)


def read_checkpoint_state(path: str | Path) -> dict[str, Tensor]:
    """Flat tensor dict of a ``.safetensors`` file or a torch checkpoint (a detectron2 ``{"model": ...}``
    dict, a ``{"state_dict": ...}`` dict, or a bare state dict), loaded with ``weights_only=True``."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"implicit captioner checkpoint {source} does not exist")
    if source.suffix == SAFETENSORS_SUFFIX:
        try:
            return load_file(str(source))
        except SafetensorError as error:
            raise ValueError(
                f"implicit captioner checkpoint {source}: unreadable safetensors ({error})"
            ) from error
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"implicit captioner checkpoint {source}: cannot load as a torch file ({error})"
        ) from error
    for wrapper in CHECKPOINT_WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(
            f"implicit captioner checkpoint {source}: expected a state dict, got {type(obj).__name__}"
        )
    return {key: value for key, value in obj.items() if isinstance(value, Tensor)}


def load_implicit_captioner_weights(
    module: ImplicitCaptioner, path: str | Path, prefix: str = ODISE_PREFIX
) -> None:
    """Copy the released captioner tensors ``<prefix><name>`` from ``path`` into ``module``.

    Every learned tensor must be present with the module's exact shape; other keys are ignored.
    """
    state = read_checkpoint_state(path)
    wanted = module.learned_parameters()
    missing = sorted(prefix + name for name in wanted if prefix + name not in state)
    if missing:
        raise ValueError(f"implicit captioner checkpoint {path}: missing keys {missing}")
    for name, param in wanted.items():
        tensor = state[prefix + name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"implicit captioner checkpoint {path}: key {prefix + name!r} has shape "
                f"{tuple(tensor.shape)}, the module expects {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor.to(param.device, param.dtype))


def tiny_implicit_captioner_state(
    embed_dim: int, text_hidden: int, time_embed_dim: int | None, seed: int, seq_len: int = 77
) -> dict[str, Tensor]:
    """Random stand-in captioner tensors in ODISE's key layout (without prefix); gates are non-zero so the
    captioner visibly changes the conditioning in the demo world."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "clip_project.linear.weight": randn(text_hidden, embed_dim, scale=1 / math.sqrt(embed_dim)),
        "clip_project.linear.bias": randn(text_hidden, scale=0.02),
        "clip_project.positional_embedding": randn(1, seq_len, text_hidden, scale=POSITIONAL_INIT_STD),
        "alpha_cond": randn(1, seq_len, text_hidden, scale=0.5),
    }
    if time_embed_dim is not None:
        state |= {
            "time_embed_project.linear.weight": randn(
                time_embed_dim, embed_dim, scale=1 / math.sqrt(embed_dim)
            ),
            "time_embed_project.linear.bias": randn(time_embed_dim, scale=0.02),
            "time_embed_project.positional_embedding": randn(1, 1, time_embed_dim, scale=POSITIONAL_INIT_STD),
            "alpha_cond_time_embed": randn(time_embed_dim, scale=0.5),
        }
    return state


def save_checkpoint_state(state: dict[str, Tensor], out_path: str | Path) -> Path:
    """Write tensors atomically: safetensors for ``.safetensors``, else a torch file ``{"model": state}``
    (the detectron2 layout of ODISE's released ``.pth``)."""
    target = Path(out_path)
    tensors = {key: value.contiguous() for key, value in state.items()}
    with atomic_path(target) as tmp:
        if target.suffix == SAFETENSORS_SUFFIX:
            save_file(tensors, str(tmp))
        else:
            torch.save({"model": tensors}, tmp)
    return target


def build_tiny_implicit_captioner_weights(
    out_path: str | Path,
    clip_vision_dir: str | Path,
    text_hidden: int,
    seed: int = 0,
    time_embed_dim: int | None = TINY_TIME_EMBED_DIM,
    prefix: str = ODISE_PREFIX,
) -> Path:
    """Write a tiny stand-in implicit-captioner checkpoint for the demo world, in the released key layout.

    The CLIP embedding width comes from ``clip_vision_dir/config.json`` (``projection_dim``).
    """
    folder = Path(clip_vision_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"build_tiny_implicit_captioner_weights: no CLIP config in {folder}")
    embed_dim = int(CLIPVisionConfig.from_pretrained(folder).projection_dim)
    state = tiny_implicit_captioner_state(embed_dim, text_hidden, time_embed_dim, seed)
    return save_checkpoint_state({prefix + key: value for key, value in state.items()}, out_path)


def implicit_captioner_hidden_states(captioner: ImplicitCaptioner, images: Sequence[Image.Image]) -> Tensor:
    """UNet ``encoder_hidden_states`` (B, 77, D) of images from the implicit captioner (no gradients)."""
    with torch.no_grad():
        return captioner(images)


def captioner_conditioning(captioner: ImplicitCaptioner) -> ConditioningFn:
    """Conditioning from the implicit captioner (SD+DINO's prompt; Table 1 "Implicit Captioner")."""

    def condition(images: list[Image.Image], categories: list[str]) -> SDConditioning:
        with torch.no_grad():
            return captioner.condition(images)

    return condition


def text_conditioning(prompt: TextPrompt) -> ConditioningFn:
    """Conditioning from a text template (Table 1 "Empty String" and "a photo of a {object category}")."""

    def condition(images: list[Image.Image], categories: list[str]) -> SDConditioning:
        with torch.no_grad():
            embeds = prompt.embeddings(categories)
            device = next(prompt.text_encoder.parameters()).device
            return SDConditioning(encode_sequence(prompt.text_encoder, embeds.to(device)))

    return condition


# ---------------------------------------------------------------------------------------------------------
# SD decoder features of several up blocks in one truncated pass
# ---------------------------------------------------------------------------------------------------------


class _StopUNet(Exception):
    """Raised by the hook of the last needed feature layer; stops the UNet forward there."""


def decoder_feature_layer(unet: nn.Module, index: int) -> nn.Module:
    """The layer of ``unet.up_blocks[index]`` whose output is ODISE's ``decoder_only`` feature: the
    second-to-last (resnet, attention) layer, i.e. ``h`` before the block's last skip concatenation."""
    n_blocks = len(unet.up_blocks)
    if not 0 <= index < n_blocks:
        raise ValueError(f"decoder_feature_layer: up block index must be in [0, {n_blocks}), got {index}")
    block = unet.up_blocks[index]
    n_layers = len(block.resnets)
    if n_layers < 2:
        raise ValueError(f"decoder_feature_layer: unet.up_blocks[{index}] has {n_layers} layer(s), need >= 2")
    attentions = getattr(block, "attentions", None)
    return attentions[n_layers - 2] if attentions is not None else block.resnets[n_layers - 2]


def _tensor_output(output: Any) -> Tensor:
    """The hidden states of a layer output (attention layers return a 1-tuple with ``return_dict=False``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


@contextlib.contextmanager
def _capture_layers(layers: Sequence[nn.Module], stop_layer: nn.Module) -> Iterator[dict[int, Tensor]]:
    """Hook ``layers``: output ``i`` lands in the yielded dict under ``i``; ``stop_layer`` stops the pass."""
    store: dict[int, Tensor] = {}

    def make_hook(i: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            store[i] = _tensor_output(output)
            if module is stop_layer:
                raise _StopUNet

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def add_time_condition(unet: nn.Module, condition: Tensor | None) -> Iterator[None]:
    """Add ``condition`` (B, T) to the output of ``unet.time_embedding`` (ODISE's ``emb += cond_emb``)."""
    if condition is None:
        yield
        return

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + condition.to(output.device, output.dtype)

    handle = unet.time_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def capture_decoder_features(
    unet: nn.Module,
    sample: Tensor,
    timestep: int,
    encoder_hidden_states: Tensor,
    block_indices: Sequence[int],
    time_condition: Tensor | None = None,
) -> list[Tensor]:
    """``decoder_feature_layer`` outputs of ``block_indices`` (in that order) from ONE UNet pass that stops
    right after the last of them; nothing after that layer runs."""
    if len(set(block_indices)) != len(block_indices) or not block_indices:
        raise ValueError(
            f"capture_decoder_features: block indices must be distinct, got {tuple(block_indices)}"
        )
    layers = [decoder_feature_layer(unet, index) for index in block_indices]
    stop_layer = layers[max(range(len(layers)), key=lambda i: block_indices[i])]
    timestep_t = torch.tensor(int(timestep), device=sample.device)
    with _capture_layers(layers, stop_layer) as store, add_time_condition(unet, time_condition):
        try:
            unet(sample, timestep_t, encoder_hidden_states=encoder_hidden_states)
        except _StopUNet:
            pass
    missing = [block_indices[i] for i in range(len(layers)) if i not in store]
    if missing:
        raise RuntimeError(f"capture_decoder_features: feature layers of up blocks {missing} never ran")
    return [store[i] for i in range(len(layers))]


# ---------------------------------------------------------------------------------------------------------
# co-PCA and the feature pyramid
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PcaBasis:
    """A PCA fitted on the cells of several feature maps: ``mean`` (C,) and ``components`` (C, k)."""

    mean: Tensor
    components: Tensor


def joint_pca_basis(features: Sequence[Tensor], n_components: int) -> PcaBasis:
    """One PCA over the stacked cells of all maps (C, h, w): exact SVD of the centred (N, C) matrix.

    sd-dino uses ``torch.pca_lowrank`` (randomised, unseeded) for the same top-k basis. Components beyond
    the data's rank (k > min(N, C)) are zero columns, so the output width is always k.
    """
    if not features or any(f.ndim != 3 for f in features):
        raise ValueError("joint_pca_basis: expected one or more (C, h, w) feature maps")
    channels = features[0].shape[0]
    if any(f.shape[0] != channels for f in features):
        raise ValueError(f"joint_pca_basis: channel counts differ: {[f.shape[0] for f in features]}")
    if not 1 <= n_components <= channels:
        raise ValueError(f"joint_pca_basis: n_components must be in [1, {channels}], got {n_components}")
    cells = torch.cat([f.reshape(channels, -1).T for f in features]).float()
    mean = cells.mean(dim=0)
    _, _, vh = torch.linalg.svd(cells - mean, full_matrices=False)
    components = torch.zeros(channels, n_components, dtype=cells.dtype, device=cells.device)
    kept = min(n_components, vh.shape[0])
    components[:, :kept] = vh[:kept].T
    return PcaBasis(mean=mean, components=components)


def pca_project(feature: Tensor, basis: PcaBasis) -> Tensor:
    """Project a (C, h, w) map onto a PCA basis: ``(x - mean) @ components`` per cell -> (k, h, w)."""
    channels, height, width = feature.shape
    cells = feature.reshape(channels, -1).T.float() - basis.mean
    return (cells @ basis.components).T.reshape(-1, height, width)


def co_pca(src: Tensor, trg: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    """sd-dino's co-PCA: both maps (C, h, w) of a pair projected on one PCA fitted on both -> (k, h, w)."""
    basis = joint_pca_basis([src, trg], n_components)
    return pca_project(src, basis), pca_project(trg, basis)


def fuse_pyramid(maps: Sequence[Tensor]) -> Tensor:
    """Maps (B, C_i, h_i, w_i) ordered coarse to fine -> one map at the finest grid, channels fine first.

    As sd-dino: the running concatenation is upsampled (bilinear, align_corners=False) to the next finer map
    and appended after it, so (s5, s4, s3) gives ``[s3, up([s4, up(s5)])]``.
    """
    if not maps:
        raise ValueError("fuse_pyramid: no feature maps")
    fused = maps[0]
    for finer in maps[1:]:
        if finer.shape[-2] < fused.shape[-2] or finer.shape[-1] < fused.shape[-1]:
            raise ValueError(
                f"fuse_pyramid: maps must go from coarse to fine, got {tuple(fused.shape[-2:])} "
                f"before {tuple(finer.shape[-2:])}"
            )
        upsampled = F.interpolate(fused, size=finer.shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([finer, upsampled], dim=1)
    return fused


# ---------------------------------------------------------------------------------------------------------
# SD+DINO / SD+DINO*
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ImageParts:
    """What SD+DINO computes once per image: the raw decoder maps (C_i, h_i, w_i) of ``block_indices``,
    averaged over the ensemble, and the L2-normalised DINO grid (C, h, w) on the SD grid (None for SD+DINO*).

    Only the co-PCA depends on the pair; everything here depends on the image (and its category) alone.
    """

    sd_maps: list[Tensor]
    dino: Tensor | None


def co_pca_fusion(maps: Sequence[Tensor], pca_dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """SD+DINO's per-pair SD part: co-PCA of each pair map (2, C, h, w) to its ``pca_dims`` (capped at C),
    pyramid fusion, L2 normalisation: two (C', h, w) maps."""
    reduced = [co_pca(m[0], m[1], min(dim, m.shape[1])) for m, dim in zip(maps, pca_dims, strict=True)]
    src = fuse_pyramid([r[0][None] for r in reduced])[0]
    trg = fuse_pyramid([r[1][None] for r in reduced])[0]
    return F.normalize(src, dim=0), F.normalize(trg, dim=0)


@dataclass(frozen=True)
class SDDinoSettings:
    """How SD+DINO(*) computes features (sd-dino's values by default): the SD input size, the noise timestep
    and ensemble, the decoder blocks and their co-PCA sizes, DINO's input size and final norm, the noise seed,
    images per UNet call and the input frame (``squash``: this pipeline's S x S; ``pad``: sd-dino's
    square)."""

    sd_image_size: int = 960
    timestep: int = 100
    ensemble: int = 1
    block_indices: tuple[int, ...] = SD_DINO_BLOCKS
    pca_dims: tuple[int, ...] = SD_DINO_PCA_DIMS
    dino_image_size: int = 840
    dino_final_norm: bool = False
    seed: int = 0
    max_batch: int = 8
    preprocess: str = "squash"

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestep", int(self.timestep))
        object.__setattr__(self, "block_indices", tuple(self.block_indices))
        object.__setattr__(self, "pca_dims", tuple(self.pca_dims))
        if self.preprocess not in SD_DINO_PREPROCESS:
            raise ValueError(
                f"SDDinoSettings: preprocess must be one of {SD_DINO_PREPROCESS}, got {self.preprocess!r}"
            )
        if len(self.pca_dims) != len(self.block_indices):
            raise ValueError(
                f"SDDinoSettings: {len(self.pca_dims)} pca_dims for {len(self.block_indices)} blocks "
                f"{self.block_indices}"
            )
        if self.ensemble < 1 or self.max_batch < 1 or min(self.pca_dims) < 1:
            raise ValueError(
                f"SDDinoSettings: ensemble, max_batch and pca_dims must be >= 1, got "
                f"{self.ensemble}, {self.max_batch}, {self.pca_dims}"
            )


class SDDinoFeaturizer:
    """SD+DINO (``dino`` given) or SD+DINO* (``dino=None``) features of an image pair, computed as its
    ``SDDinoSettings`` say (the names below are its fields).

    SD part: latent = VAE posterior mean x scaling factor (ODISE's deterministic encoding); ``ensemble``
    noise draws at ``timestep`` from a generator seeded with ``seed`` and shared by every image (ODISE's
    ``share_noise``); raw decoder maps of ``block_indices`` (coarse to fine) averaged over the draws;
    co-PCA per map to ``pca_dims`` (capped at the map's channels); ``fuse_pyramid``; L2-normalised.
    DINO part: ``vit_patch_features`` at ``dino_image_size``, resized to the SD grid if needed, L2-normalised.
    Fused: ``[SD, DINO]`` L2-normalised, so each part has norm 1/sqrt(2) (equal weight).
    Only the co-PCA depends on the pair: ``image_parts`` runs the networks once per image, ``pair_from_parts``
    does the pair's co-PCA and fusion (``evaluate_sd_dino``); ``pair_features`` does both for one pair.
    """

    def __init__(
        self,
        components: SDComponents,
        conditioning: ConditioningFn,
        dino: nn.Module | None = None,
        settings: SDDinoSettings | None = None,
        *,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        settings = SDDinoSettings() if settings is None else settings
        for index in settings.block_indices:
            decoder_feature_layer(components.unet, index)
        if dino is not None:
            check_vit_size(dino, settings.dino_image_size)
        n_steps = int(components.scheduler.config.num_train_timesteps)
        if not 0 <= settings.timestep < n_steps:
            raise ValueError(f"SDDinoFeaturizer: timestep must be in [0, {n_steps}), got {settings.timestep}")
        self.settings = settings
        self.sd = SDFeaturizer(
            components, device=device, autocast_dtype=autocast_dtype, max_batch=settings.max_batch
        )
        self.unet = components.unet
        self.conditioning = conditioning
        self.dino = dino
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.unet_passes = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the UNet, or a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def latents(self, images: Sequence[Image.Image]) -> Tensor:
        """Scaled VAE posterior means (B, 4, S/8, S/8) of images resized to ``sd_image_size``."""
        pixels = self.sd.preprocess(list(images), self.settings.sd_image_size)
        mean, _ = self.sd.latent_distribution(pixels)
        return mean * self.sd.scaling_factor

    def shared_noise(self, latent_shape: Sequence[int]) -> list[Tensor]:
        """``ensemble`` noise tensors (1, 4, h, w) drawn from ``seed``: the same for every image."""
        generator = torch.Generator(device="cpu").manual_seed(self.settings.seed)
        shape = (1, *latent_shape[1:])
        return [
            randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
            for _ in range(self.settings.ensemble)
        ]

    def _batched(self, conditioning: SDConditioning, batch: int) -> tuple[Tensor, Tensor | None]:
        """Conditioning tensors broadcast to ``batch`` and repeated for every ensemble copy."""
        hidden = conditioning.encoder_hidden_states
        if hidden.ndim != 3 or hidden.shape[0] not in (1, batch):
            raise ValueError(
                f"SDDinoFeaturizer: encoder_hidden_states must be ({batch} or 1, L, D), "
                f"got {tuple(hidden.shape)}"
            )
        hidden = (
            hidden.to(self.device, self.unet.dtype).expand(batch, -1, -1).repeat(self.settings.ensemble, 1, 1)
        )
        cond = conditioning.time_condition
        if cond is not None:
            if cond.ndim != 2 or cond.shape[0] not in (1, batch):
                raise ValueError(
                    f"SDDinoFeaturizer: time_condition must be ({batch} or 1, T), got {tuple(cond.shape)}"
                )
            cond = cond.to(self.device).expand(batch, -1).repeat(self.settings.ensemble, 1)
        return hidden, cond

    @torch.no_grad()
    def sd_maps(self, images: Sequence[Image.Image], categories: Sequence[str]) -> list[Tensor]:
        """Raw decoder maps (B, C_i, h_i, w_i) of ``block_indices``, averaged over the ensemble, float32."""
        latents = self.latents(images).to(self.device)
        batch = latents.shape[0]
        hidden, cond = self._batched(self.conditioning(list(images), list(categories)), batch)
        noise = torch.cat([n.expand_as(latents) for n in self.shared_noise(latents.shape)])
        noisy = self.sd.add_noise(
            latents.repeat(self.settings.ensemble, 1, 1, 1), noise, self.settings.timestep
        )
        chunks: list[list[Tensor]] = []
        for start in range(0, noisy.shape[0], self.settings.max_batch):
            stop = start + self.settings.max_batch
            with self._autocast():
                maps = capture_decoder_features(
                    self.unet,
                    noisy[start:stop].to(self.unet.dtype),
                    self.settings.timestep,
                    hidden[start:stop],
                    self.settings.block_indices,
                    None if cond is None else cond[start:stop],
                )
            chunks.append([m.float() for m in maps])
            self.unet_passes += 1
        per_block = [
            torch.cat([chunk[i] for chunk in chunks]) for i in range(len(self.settings.block_indices))
        ]
        return [m.unflatten(0, (self.settings.ensemble, batch)).mean(dim=0) for m in per_block]

    def sd_part(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The pair's SD part at the settings' ``pca_dims`` (``co_pca_fusion``)."""
        return co_pca_fusion(maps, self.settings.pca_dims)

    def dino_part(self, images: Sequence[Image.Image], grid: Sequence[int]) -> Tensor:
        """DINO patch features (B, C, h, w) on the SD grid (bilinear resize if needed), L2-normalised."""
        if self.dino is None:
            raise ValueError("SDDinoFeaturizer: no DINO model (SD+DINO* has no DINO part)")
        feats = vit_patch_features(
            self.dino, images, self.settings.dino_image_size, self.settings.dino_final_norm
        ).to(self.device)
        if tuple(feats.shape[-2:]) != tuple(grid):
            feats = F.normalize(
                F.interpolate(feats, size=tuple(grid), mode="bilinear", align_corners=False), dim=1
            )
        return feats

    def _inputs(self, images: Sequence[Image.Image], size: int) -> list[Image.Image]:
        """The images as a network sees them: as given (its preprocessing squashes them) or padded to size."""
        return (
            list(images)
            if self.settings.preprocess == "squash"
            else [pad_image(image, size) for image in images]
        )

    @torch.no_grad()
    def image_parts(self, images: Sequence[Image.Image], categories: Sequence[str]) -> list[ImageParts]:
        """The per-image parts of each image (one batch: every network sees each image once). With
        ``preprocess="pad"`` SD and the captioner's CLIP see the image padded to ``sd_image_size``, DINO to
        ``dino_image_size`` (sd-dino's inputs)."""
        maps = self.sd_maps(self._inputs(images, self.settings.sd_image_size), categories)
        dino = None
        if self.dino is not None:
            dino = self.dino_part(self._inputs(images, self.settings.dino_image_size), maps[-1].shape[-2:])
        return [
            ImageParts([m[i] for m in maps], None if dino is None else dino[i]) for i in range(len(images))
        ]

    @torch.no_grad()
    def pair_from_parts(self, src: ImageParts, trg: ImageParts) -> tuple[Tensor, Tensor]:
        """Features (C, h, w) of a pair from its images' parts (the pair's co-PCA, fusion, DINO concat), on
        the featurizer's device."""
        src_sd, trg_sd = self.sd_part(
            [torch.stack([s, t]) for s, t in zip(src.sd_maps, trg.sd_maps, strict=True)]
        )
        if self.dino is None:
            return src_sd, trg_sd
        if src.dino is None or trg.dino is None:
            raise ValueError("SDDinoFeaturizer: image parts lack the DINO grid of an SD+DINO featurizer")
        dino = torch.stack([src.dino, trg.dino])
        fused = F.normalize(torch.cat([torch.stack([src_sd, trg_sd]), dino], dim=1), dim=1)
        return fused[0], fused[1]

    def pair_features(
        self, src_image: Image.Image, trg_image: Image.Image, category: str
    ) -> tuple[Tensor, Tensor]:
        """Features (C, h, w) of one pair on the CPU, both images in one batch (sd-dino's per-pair path)."""
        src, trg = self.pair_from_parts(*self.image_parts([src_image, trg_image], [category, category]))
        return src.cpu(), trg.cpu()


def evaluate_pairs_per_pair(
    pairs: pd.DataFrame, pair_feature_fn: PairFeatureFn, settings: MatchingSettings, root: str | Path
) -> pd.DataFrame:
    """Score every pair with features computed per pair (SD+DINO's co-PCA): load both images (flipped per
    row), call ``pair_feature_fn``, predict and score -> the per-pair table of ``metrics.per_pair_frame``."""
    scores: list[PairScore] = []
    for row in tqdm(list(pairs.itertuples()), desc="pairs", unit="pair"):
        flip = bool(row.flip)
        src_image = load_image(root, row.src_image, flip=flip)
        trg_image = load_image(root, row.trg_image, flip=flip)
        src_feat, trg_feat = pair_feature_fn(src_image, trg_image, row.category)
        scores.extend(score_pair(row, src_feat, trg_feat, settings))
    return per_pair_frame(scores)


def _row_keys(row: Any) -> tuple[ImageKey, ImageKey]:
    """The source and target image keys of a pairs-table row (flip per row, the pair's category)."""
    flip = bool(row.flip)
    return ImageKey(row.src_image, flip, row.category), ImageKey(row.trg_image, flip, row.category)


def image_parts_for(
    featurizer: SDDinoFeaturizer, keys: Sequence[ImageKey], root: str | Path, image_batch: int
) -> dict[ImageKey, ImageParts]:
    """Per-image SD+DINO parts of distinct image keys, ``image_batch`` images per network call."""
    if image_batch < 1:
        raise ValueError(f"image_parts_for: image_batch must be >= 1, got {image_batch}")
    parts: dict[ImageKey, ImageParts] = {}
    for start in range(0, len(keys), image_batch):
        chunk = list(keys[start : start + image_batch])
        images = [load_image(root, key.path, flip=key.flip) for key in chunk]
        parts.update(zip(chunk, featurizer.image_parts(images, [k.category for k in chunk]), strict=True))
    return parts


def evaluate_sd_dino(
    pairs: pd.DataFrame,
    featurizer: SDDinoFeaturizer,
    settings: MatchingSettings,
    root: str | Path,
    image_batch: int | None = None,
    scorer: PairScorer | None = None,
    predictions: Any = None,
) -> pd.DataFrame:
    """Score every pair with SD+DINO(*) features; each distinct image goes through the networks once
    (predicted points recorded in ``predictions``, a ``sd4match.predictions.PredictionLog``, when given).

    Per category, the parts of every distinct image (``ImageParts``) are computed in batches of
    ``image_batch`` images (default: the featurizer's ``max_batch``); per pair only the co-PCA and fusion
    run. Same features as ``featurizer.pair_features`` per pair; rows come out in the pairs table's order.
    ``scorer``: how a pair is scored from its features (default: ``evaluation.score_pair`` with ``settings``,
    the squashed S frame, recording ``predictions``; sd-dino's own: ``peer_protocols.PaddedFrameScorer``).
    One category's parts stay on the device at a time (SD 1-5 at 960 px + DINOv2 at 840 px: ~26 MB per
    image, SPair-71k test categories have 25-30 images).
    """
    image_batch = featurizer.settings.max_batch if image_batch is None else image_batch
    if scorer is None:

        def scorer(row: Any, src: Tensor, trg: Tensor) -> list[PairScore]:
            return score_pair(row, src, trg, settings, predictions)

    table = pairs.reset_index(drop=True)
    by_row: dict[int, list[PairScore]] = {}
    with tqdm(total=len(table), desc="pairs", unit="pair") as bar:
        for _, group in table.groupby("category", sort=False):
            rows = list(group.itertuples())
            keys = sorted({key for row in rows for key in _row_keys(row)}, key=str)
            parts = image_parts_for(featurizer, keys, root, image_batch)
            for row in rows:
                src_key, trg_key = _row_keys(row)
                src_feat, trg_feat = featurizer.pair_from_parts(parts[src_key], parts[trg_key])
                by_row[row.Index] = scorer(row, src_feat, trg_feat)  # matched on the device
                bar.update(1)
    return per_pair_frame([score for index in sorted(by_row) for score in by_row[index]])
