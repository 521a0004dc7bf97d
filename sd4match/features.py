"""SD features for matching (DIFT-style): VAE latent, noise at step t, UNet stopped after ``up_blocks[1]``.

The UNet is the diffusers model itself; a forward hook on the chosen up block stores its output and raises
``_StopForward`` so nothing after the block is computed. Features are averaged over an ensemble of noise
draws and L2-normalised along channels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor, nn

from sd4match.models import SDComponents, load_stable_diffusion

log = logging.getLogger(__name__)

PIXEL_SCALE = 127.5
DEFAULT_MAX_BATCH = 8
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
SDPA_PROCESSORS = ("AttnProcessor2_0",)


def half_precision_device(device: str | torch.device) -> bool:
    """True where the frozen networks run in the configured half precision: CUDA devices (CPU stays fp32)."""
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class KernelSettings:
    """How the frozen networks run (config ``features``): ``precision`` of their weights and autocast on
    GPU (CPU always fp32), ``compile`` of the UNet blocks the feature needs, ``channels_last`` memory format.

    Prompts and the CPM module are never cast: they stay fp32 (only the text encoder's input is cast).
    """

    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_DTYPES:
            raise ValueError(
                f"features.precision must be one of {sorted(PRECISION_DTYPES)}, got {self.precision!r}"
            )

    @classmethod
    def from_config(cls, features: Mapping[str, Any]) -> KernelSettings:
        """From the config's ``features`` block (``compile``/``channels_last`` default to false)."""
        return cls(
            precision=features["precision"],
            compile=bool(features.get("compile", False)),
            channels_last=bool(features.get("channels_last", False)),
        )

    def weights_dtype(self, device: str | torch.device) -> torch.dtype:
        """dtype to load the frozen UNet/VAE/text encoder/ViTs in: the configured one on GPU, else fp32."""
        return PRECISION_DTYPES[self.precision] if half_precision_device(device) else torch.float32

    def autocast_dtype(self, device: str | torch.device) -> torch.dtype | None:
        """Autocast dtype around the frozen networks (None: no autocast), half precision on GPU only."""
        dtype = self.weights_dtype(device)
        return None if dtype == torch.float32 else dtype


def enable_tf32(device: str | torch.device) -> bool:
    """On CUDA, let fp32 matmuls/convolutions (what stays fp32: the CPM module, an fp32 UNet) use TF32.

    The matching correlation turns it off locally (``matching.ieee_fp32_matmul``). Returns whether it was set.
    """
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return True


def attention_backends(modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """The attention implementation of each network: diffusers processor class names (UNet, VAE) or the
    transformers ``attn_implementation`` (CLIP, DINOv2), e.g. ``{"unet": "AttnProcessor2_0"}``."""
    out = {}
    for name, module in modules.items():
        processors = getattr(module, "attn_processors", None)
        if processors is not None:
            out[name] = ",".join(sorted({type(p).__name__ for p in processors.values()})) or "none"
        else:
            out[name] = str(getattr(module.config, "_attn_implementation", None))
    return out


def uses_sdpa(backends: Mapping[str, str]) -> bool:
    """True when every network runs PyTorch SDPA (scaled_dot_product_attention: flash/efficient kernels)."""
    return all(b in SDPA_PROCESSORS or b in ("sdpa", "none") for b in backends.values())


def compile_blocks(unet: nn.Module, up_block_index: int, backend: str = "inductor") -> list[str]:
    """``torch.compile`` each UNet block the feature needs (time embedding, conv_in, down/mid blocks,
    ``up_blocks[:up_block_index + 1]``) in place; the UNet's own forward and the stop hook stay eager.

    Returns the names of the compiled blocks.
    """
    compiled = []

    def wrap(module: nn.Module) -> nn.Module:
        return torch.compile(module, backend=backend, dynamic=False)

    for name in ("conv_in", "time_embedding", "mid_block"):
        if getattr(unet, name, None) is not None:
            setattr(unet, name, wrap(getattr(unet, name)))
            compiled.append(name)
    for i in range(len(unet.down_blocks)):
        unet.down_blocks[i] = wrap(unet.down_blocks[i])
        compiled.append(f"down_blocks.{i}")
    for i in range(up_block_index + 1):
        unet.up_blocks[i] = wrap(unet.up_blocks[i])
        compiled.append(f"up_blocks.{i}")
    return compiled


class _StopForward(Exception):
    """Raised by the hook on the feature block once its output is stored; stops the UNet forward there."""


def preprocess(images: list[Image.Image], image_size: int) -> Tensor:
    """Resize images anisotropically to S x S (S = ``image_size``) and scale to [-1, 1]: (B, 3, S, S).

    PIL bilinear resampling (with PIL's antialiasing on downscale); flipping is the caller's job.
    """
    if image_size < 1:
        raise ValueError(f"preprocess: image_size must be a positive integer, got {image_size}")
    if not images:
        raise ValueError("preprocess: empty image list")
    arrays = [
        np.asarray(image.convert("RGB").resize((image_size, image_size), Image.BILINEAR), dtype=np.float32)
        for image in images
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return pixels / PIXEL_SCALE - 1.0


def sample_latents(
    mean: Tensor, std: Tensor, scaling_factor: float, generator: torch.Generator | None
) -> Tensor:
    """One latent ``(mean + std * eps) * scaling_factor``, drawn as diffusers' ``latent_dist.sample`` does.

    Lets training sample latents from a cache of VAE posteriors (mean, std) instead of re-running the VAE.
    """
    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


@contextlib.contextmanager
def stop_after(block: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Hook ``block`` so that its output lands in the yielded dict under ``"feature"`` and the forward stops.

    The caller catches ``_StopForward``; the hook is removed on exit, also when an error escapes.
    """
    store: dict[str, Tensor] = {}

    def capture_and_stop(module: nn.Module, args: tuple, output: Tensor) -> None:
        store["feature"] = output
        raise _StopForward

    handle = block.register_forward_hook(capture_and_stop)
    try:
        yield store
    finally:
        handle.remove()


class SDFeaturizer:
    """SD feature extractor: ``up_blocks[up_block_index]`` output, ensemble-averaged, L2-normalised.

    ``unet_passes`` counts truncated UNet forward calls, ``unet_samples`` the latents they processed.
    Autocast (if any) covers the UNet only; the VAE runs in its own dtype so latents do not depend on it.
    """

    def __init__(
        self,
        components: SDComponents,
        up_block_index: int = 1,
        device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        kernels: KernelSettings | None = None,
    ) -> None:
        n_blocks = len(components.unet.up_blocks)
        if not 0 <= up_block_index < n_blocks:
            raise ValueError(f"SDFeaturizer: up_block_index must be in [0, {n_blocks}), got {up_block_index}")
        if max_batch < 1:
            raise ValueError(f"SDFeaturizer: max_batch must be >= 1, got {max_batch}")
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.up_block_index = up_block_index
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.max_batch = max_batch
        self.unet_passes = 0
        self.unet_samples = 0
        self.channels_last = kernels is not None and kernels.channels_last
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if kernels is not None and kernels.compile:
            log.info(
                "torch.compile (%s): %s", kernels.compile_backend, compile_blocks(self.unet, up_block_index)
            )

    @property
    def scaling_factor(self) -> float:
        """The VAE's latent scaling factor (0.18215 for SD 1-5 and 2-1)."""
        return float(self.vae.config.scaling_factor)

    @staticmethod
    def preprocess(images: list[Image.Image], image_size: int) -> Tensor:
        """Anisotropic resize to S x S and scaling to [-1, 1] (see ``preprocess``)."""
        return preprocess(images, image_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context of the frozen networks (fp16/bf16 autocast on GPU), or a no-op."""
        return self._autocast()

    def _memory_format(self, tensor: Tensor) -> Tensor:
        """``tensor`` in channels_last when the networks are (a no-op otherwise)."""
        return tensor.contiguous(memory_format=torch.channels_last) if self.channels_last else tensor

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the UNet (fp32 weights under fp16/bf16 autocast), or a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def latent_distribution(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """VAE posterior (mean, std) of pixels in [-1, 1], each (B, 4, S/8, S/8), unscaled, float32."""
        posterior = self.vae.encode(self._memory_format(pixels.to(self.device, self.vae.dtype))).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def encode_latents(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One VAE latent sample per image times the scaling factor, (B, 4, S/8, S/8) float32."""
        posterior = self.vae.encode(self._memory_format(pixels.to(self.device, self.vae.dtype))).latent_dist
        return (posterior.sample(generator) * self.scaling_factor).float()

    def _check_timestep(self, t: int) -> None:
        """Reject timesteps outside the scheduler's training range."""
        n_steps = int(self.scheduler.config.num_train_timesteps)
        if not 0 <= int(t) < n_steps:
            raise ValueError(f"SDFeaturizer: timestep t must be in [0, {n_steps}), got {t}")

    def add_noise(self, latents: Tensor, noise: Tensor, t: int) -> Tensor:
        """Forward diffusion to step t with the model's own scheduler (``scheduler.add_noise``)."""
        self._check_timestep(t)
        timesteps = torch.full((latents.shape[0],), int(t), dtype=torch.long, device=latents.device)
        return self.scheduler.add_noise(latents, noise, timesteps)

    def truncated_unet(self, noisy_latents: Tensor, t: int, encoder_hidden_states: Tensor) -> Tensor:
        """Raw output of ``unet.up_blocks[up_block_index]`` (float32); nothing after the block runs."""
        self._check_timestep(t)
        dtype = self.unet.dtype
        sample = self._memory_format(noisy_latents.to(self.device, dtype))
        context = encoder_hidden_states.to(self.device, dtype)
        timestep = torch.tensor(int(t), device=self.device)
        with stop_after(self.unet.up_blocks[self.up_block_index]) as store:
            try:
                with self._autocast():
                    self.unet(sample, timestep, encoder_hidden_states=context)
            except _StopForward:
                pass
        if "feature" not in store:
            raise RuntimeError(f"SDFeaturizer: unet.up_blocks[{self.up_block_index}] never ran")
        self.unet_passes += 1
        self.unet_samples += sample.shape[0]
        return store["feature"].float()

    def _expand_context(self, encoder_hidden_states: Tensor, batch: int) -> Tensor:
        """Check the (B or 1, 77, D) prompt encodings and broadcast a single one to the batch."""
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] not in (1, batch):
            raise ValueError(
                f"SDFeaturizer: encoder_hidden_states must be ({batch} or 1, L, D), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        return encoder_hidden_states.expand(batch, -1, -1)

    def extract_from_latents(
        self,
        latents: Tensor,
        encoder_hidden_states: Tensor,
        t: int,
        ensemble: int = 1,
        generator: torch.Generator | None = None,
        max_batch: int | None = None,
    ) -> Tensor:
        """Features (B, C, s, s) of scaled latents: E noise draws each, UNet in chunks, mean, L2 norm.

        Noise copy e (e = 0..E-1) is drawn for the whole batch in turn from ``generator``; ``max_batch``
        (default: the constructor's) bounds the latents per UNet call.
        """
        max_batch = self.max_batch if max_batch is None else max_batch
        if ensemble < 1 or max_batch < 1:
            raise ValueError(
                f"SDFeaturizer: ensemble and max_batch must be >= 1, got {ensemble}, {max_batch}"
            )
        if latents.ndim != 4:
            raise ValueError(f"SDFeaturizer: latents must be (B, 4, h, w), got {tuple(latents.shape)}")
        batch = latents.shape[0]
        context = self._expand_context(encoder_hidden_states, batch).repeat(ensemble, 1, 1)
        latents = latents.to(self.device, torch.float32)
        noise = [
            randn_tensor(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
            for _ in range(ensemble)
        ]
        noisy = self.add_noise(latents.repeat(ensemble, 1, 1, 1), torch.cat(noise), t)
        chunks = [
            self.truncated_unet(noisy[start : start + max_batch], t, context[start : start + max_batch])
            for start in range(0, noisy.shape[0], max_batch)
        ]
        features = torch.cat(chunks).unflatten(0, (ensemble, batch)).mean(dim=0)
        return F.normalize(features, dim=1)

    def __call__(
        self,
        pixels: Tensor,
        encoder_hidden_states: Tensor,
        t: int,
        ensemble: int = 1,
        generator: torch.Generator | None = None,
        max_batch: int | None = None,
    ) -> Tensor:
        """Features of pixels (B, 3, S, S) in [-1, 1] (an S/16 grid for up_blocks[1]), E noise draws each."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"SDFeaturizer: pixels must be (B, 3, S, S), got {tuple(pixels.shape)}")
        latents = self.encode_latents(pixels, generator)
        return self.extract_from_latents(latents, encoder_hidden_states, t, ensemble, generator, max_batch)


def load_sd_featurizer(
    local_path: str, features: Mapping[str, Any], device: str | torch.device = "cpu"
) -> SDFeaturizer:
    """Frozen SD loaded for feature extraction as the config's ``features`` block says: weights in the
    configured half precision on GPU (fp32 on CPU), TF32 for what stays fp32, SDPA attention checked and
    logged, the ``compile`` / ``channels_last`` switches applied."""
    kernels = KernelSettings.from_config(features)
    enable_tf32(device)
    components = load_stable_diffusion(local_path, device=device, dtype=kernels.weights_dtype(device))
    backends = attention_backends(
        {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
    )
    log.info("SD weights %s on %s, attention %s", kernels.weights_dtype(device), device, backends)
    if not uses_sdpa(backends):
        log.warning("attention does not use PyTorch SDPA (flash/memory-efficient kernels): %s", backends)
    return SDFeaturizer(
        components,
        up_block_index=features["up_block_index"],
        device=device,
        autocast_dtype=kernels.autocast_dtype(device),
        max_batch=features["max_unet_batch"],
        kernels=kernels,
    )
