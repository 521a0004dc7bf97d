"""How many pairs one training forward + backward call holds on a device (``per_device_batch: auto``).

Memory model (peak bytes of one process): ``weights + pairs x per_pair``.
- ``weights``: the frozen UNet, VAE and text encoder as training loads them (fp32), counted from their
  configs on the meta device.
- ``per_pair``: the authors' figure, about 22 GiB per GPU at 3 pairs (SD 2-1, 768 px, fp32 weights under fp16
  autocast, the whole UNet: ``REFERENCE``), less their fp32 SD 2-1 weights, per pair; scaled to this UNet and
  image size by the activation elements of one forward (every leaf module's output, counted on the meta
  device: the truncated UNet here, the whole UNet for the reference), and doubled without half-precision
  autocast (fp32 training, CPU). Gradient checkpointing is not credited: the estimate stays an upper bound.

The choice is the largest divisor of the pairs per process (``batch_size / processes``) whose peak fits the
device's memory (CUDA: the GPU's total; CPU: physical RAM) less ``RESERVE_BYTES`` (CUDA context, allocator
fragmentation). It changes how a step is computed, never its result: every pair draws its own latents and
noise (``sd4match.training``), so 9 pairs in one call equal 3 x 3 with gradient accumulation to float
rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from sd4match.training_job import AUTO, TrainSettings

log = logging.getLogger(__name__)

GIB = 1024**3
RESERVE_BYTES = 1 * GIB
FP32_BYTES = 4
TEXT_LENGTH = 77


@dataclass(frozen=True)
class Reference:
    """A measured training peak: ``peak_bytes`` per process at ``pairs`` pairs per call (SD ``arch``, image
    size ``image_size``, half-precision autocast, whole UNet)."""

    peak_bytes: int
    pairs: int
    arch: str
    image_size: int
    source: str


REFERENCE = Reference(
    22 * GIB, 3, "sd21", 768, "the authors: about 22 GB per GPU at 3 pairs per GPU (SD 2-1, 768 px, fp16)"
)


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one training process: ``weights_bytes + pairs x per_pair_bytes``."""

    weights_bytes: int
    per_pair_bytes: int

    def peak(self, pairs: int) -> int:
        return self.weights_bytes + pairs * self.per_pair_bytes


# ------------------------------------------------------------------------------------ meta-device counts


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _leaf_output_elements(module: nn.Module, run: callable) -> int:
    """Elements of every tensor a leaf module (one without children) outputs while ``run()`` runs."""
    total = 0

    def count(_module: nn.Module, _args: tuple, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, tuple | list) else (output,)
        total += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total


@lru_cache(maxsize=16)
def _activation_elements(config_items: tuple, image_size: int, up_block_index: int | None) -> int:
    from sd4match.features import _StopForward, stop_after

    config = dict(config_items)
    unet = _meta_unet(config)
    size = image_size // 8
    sample = torch.empty(1, config["in_channels"], size, size, device="meta")
    context = torch.empty(1, TEXT_LENGTH, config["cross_attention_dim"], device="meta")
    timestep = torch.tensor(261, device="meta")

    def run() -> None:
        if up_block_index is None:
            unet(sample, timestep, encoder_hidden_states=context)
            return
        with stop_after(unet.up_blocks[up_block_index]):
            try:
                unet(sample, timestep, encoder_hidden_states=context)
            except _StopForward:
                pass

    return _leaf_output_elements(unet, run)


def _hashable(config: dict) -> tuple:
    """The config as a hashable key (lists as tuples) for the memoised meta counts."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


def activation_elements(unet_config: dict, image_size: int, up_block_index: int | None = 1) -> int:
    """Activation elements of one latent through the UNet (to ``up_blocks[up_block_index]``; None: whole),
    counted on the meta device: what a forward keeps for the backward, up to which tensors autograd frees."""
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    return _activation_elements(_hashable(config), image_size, up_block_index)


def _reference_counts() -> tuple[int, int]:
    """(fp32 weight bytes, whole-UNet activation elements per image) of the reference architecture."""
    from sd4match import architectures as A

    unet = A.build_unet(REFERENCE.arch)
    params = sum(
        A.parameter_count(m)
        for m in (unet, A.build_vae(REFERENCE.arch), A.build_text_encoder(REFERENCE.arch))
    )
    return FP32_BYTES * params, activation_elements(unet.config, REFERENCE.image_size, None)


@lru_cache(maxsize=1)
def bytes_per_activation_element() -> float:
    """The reference's activation bytes per counted element (half-precision autocast)."""
    weights, elements = _reference_counts()
    per_pair = (REFERENCE.peak_bytes - weights) / REFERENCE.pairs
    return per_pair / (2 * elements)


# ------------------------------------------------------------------------------------------- the choice


def model_weights_bytes(local_path: str | os.PathLike[str]) -> tuple[int, dict]:
    """fp32 bytes of the SD folder's UNet, VAE and text encoder (built from their configs on meta) and the
    UNet config."""
    folder = Path(local_path)
    unet_config = dict(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    vae_config = dict(AutoencoderKL.load_config(folder, subfolder="vae"))
    text_config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")
    with torch.device("meta"):
        modules = (
            UNet2DConditionModel.from_config(unet_config),
            AutoencoderKL.from_config(vae_config),
            CLIPTextModel(text_config),
        )
    params = sum(p.numel() for m in modules for p in m.parameters())
    return FP32_BYTES * params, unet_config


def memory_model(
    local_path: str | os.PathLike[str], image_size: int, half_autocast: bool, up_block_index: int = 1
) -> MemoryModel:
    """The memory model of training the SD model at ``local_path`` at ``image_size``."""
    weights, unet_config = model_weights_bytes(local_path)
    elements = activation_elements(unet_config, image_size, up_block_index)
    per_pair = 2 * elements * bytes_per_activation_element() * (1 if half_autocast else 2)
    return MemoryModel(weights, int(per_pair))


def device_memory_bytes(device: torch.device | str) -> int:
    """Memory of the device: a CUDA GPU's total, else the machine's physical RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_per_device_batch(pairs_per_process: int, model: MemoryModel, memory_bytes: int) -> int:
    """The largest divisor of ``pairs_per_process`` whose estimated peak fits ``memory_bytes`` less the
    reserve; 1 when none does (a warning: training may run out of memory)."""
    budget = memory_bytes - RESERVE_BYTES
    divisors = [d for d in range(pairs_per_process, 0, -1) if pairs_per_process % d == 0]
    for pairs in divisors:
        if model.peak(pairs) <= budget:
            return pairs
    log.warning(
        "per_device_batch auto: even 1 pair needs an estimated %.1f GiB, more than %.1f GiB of device memory "
        "less the reserve; training may run out of memory (gradient_checkpointing: true saves activations)",
        model.peak(1) / GIB,
        budget / GIB,
    )
    return 1


def resolve_per_device_batch(
    settings: TrainSettings,
    num_processes: int,
    device: torch.device | str,
    sd_local_path: str | os.PathLike[str],
) -> TrainSettings:
    """``settings`` with ``per_device_batch: auto`` replaced by the choice for ``device`` (unchanged when the
    config gives a number)."""
    if settings.per_device_batch != AUTO:
        return settings
    half = torch.device(device).type == "cuda" and settings.precision != "fp32"
    model = memory_model(sd_local_path, settings.image_size, half)
    memory = device_memory_bytes(device)
    pairs = choose_per_device_batch(settings.pairs_per_process(num_processes), model, memory)
    log.info(
        "per_device_batch auto: %d pair(s) per call on %s (%.1f GiB; estimated peak %.1f GiB = weights "
        "%.1f + %d x %.2f GiB per pair)",
        pairs,
        device,
        memory / GIB,
        model.peak(pairs) / GIB,
        model.weights_bytes / GIB,
        pairs,
        model.per_pair_bytes / GIB,
    )
    return dataclasses.replace(settings, per_device_batch=pairs)
