"""FLOPs of the project's network calls at real shapes, counted with torch's flop counter on the meta device.

Each unit is one call of the project's own function (``SDFeaturizer.truncated_unet``, ``vae.encode``,
``encode_sequence``, ``capture_decoder_features``, the SD+DINO co-PCA, a whole training micro-batch with its
backward pass...) on the real architecture of ``sd4match.architectures``, with no weights and no compute:
the counter reads shapes only. Attention runs as batched matmuls on meta and is counted as such (the same
FLOPs as flash attention). ``torch.linalg.svd`` has no formula in torch's registry; the co-PCA's SVD is
counted with the Golub-Van Loan R-SVD cost ``6 m n^2 + 20 n^3`` (m >= n), see ``svd_flops``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sd4match import architectures as A
from sd4match.models import SDComponents

META = A.META
TEXT_LENGTH = 77
N_KPS = 10  # keypoints per pair in the training micro-batch (SPair pairs have up to ~20, most ~10)


def svd_flops(a_shape: Sequence[int], full_matrices: bool = True, *args: Any, **kwargs: Any) -> int:
    """FLOPs of a thin SVD with singular vectors of each (m, n) matrix: ``6 m n^2 + 20 n^3`` for m >= n
    (Golub & Van Loan, Matrix Computations, R-SVD), times the batch."""
    *batch, m, n = a_shape
    m, n = max(m, n), min(m, n)
    count = 1
    for size in batch:
        count *= size
    return count * (6 * m * n * n + 20 * n**3)


CUSTOM_FLOPS = {torch.ops.aten._linalg_svd: svd_flops}


def count_flops(fn: Callable[[], Any], grad: bool = False) -> int:
    """Total FLOPs of ``fn()`` (forward, and backward when ``fn`` runs it) under torch's flop counter."""
    guard = contextlib.nullcontext() if grad else torch.no_grad()
    with guard, FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        fn()
    return int(counter.get_total_flops())


class FlopMeter:
    """FLOPs per call of each unit at real shapes; every (unit, shape) is counted once and remembered.

    Units are per sample (one latent, image or prompt) unless named otherwise; the work model multiplies
    them by the counts a job's code performs.
    """

    def __init__(self) -> None:
        self._sd: dict[str, SDComponents] = {}
        self._models: dict[str, nn.Module] = {}
        self._flops: dict[tuple[Any, ...], int] = {}
        self._shapes: dict[tuple[Any, ...], list[tuple[int, int, int]]] = {}

    def _cached(self, key: tuple[Any, ...], fn: Callable[[], Any], grad: bool = False) -> int:
        if key not in self._flops:
            self._flops[key] = count_flops(fn, grad)
        return self._flops[key]

    def sd(self, arch: str) -> SDComponents:
        """The SD components of ``arch`` on meta (built on first use)."""
        if arch not in self._sd:
            self._sd[arch] = A.build_sd_components(arch)
        return self._sd[arch]

    def _model(self, name: str) -> nn.Module:
        builders = {
            "dinov2": lambda: A.build_dinov2()[0],
            "vitb8": lambda: A.build_dino("vitb8")[0],
            "vits8": lambda: A.build_dino("vits8")[0],
            "clip_l14_336": lambda: A.build_clip_vision()[0],
        }
        if name not in builders:
            raise ValueError(f"FlopMeter: unknown network {name!r}; expected one of {sorted(builders)}")
        if name not in self._models:
            self._models[name] = builders[name]()
        return self._models[name]

    def _context(self, arch: str, batch: int = 1) -> Tensor:
        width = int(self.sd(arch).text_encoder.config.hidden_size)
        return torch.empty(batch, TEXT_LENGTH, width, device=META)

    @staticmethod
    def _latent(size: int, batch: int = 1) -> Tensor:
        return torch.empty(batch, 4, size // 8, size // 8, device=META)

    # -- SD

    def unet_truncated(self, arch: str, size: int, up_block: int = 1) -> int:
        """One latent through the UNet stopped after ``up_blocks[up_block]`` (DIFT / SD4Match features)."""
        from sd4match.features import SDFeaturizer

        featurizer = SDFeaturizer(self.sd(arch), up_block_index=up_block, device=META)
        return self._cached(
            ("unet_truncated", arch, size, up_block),
            lambda: featurizer.truncated_unet(self._latent(size), 50, self._context(arch)),
        )

    def unet_decoder(self, arch: str, size: int, blocks: Sequence[int]) -> int:
        """One latent through the UNet up to the last SD+DINO decoder layer (``capture_decoder_features``)."""
        from sd4match.baselines import capture_decoder_features

        unet = self.sd(arch).unet
        return self._cached(
            ("unet_decoder", arch, size, tuple(blocks)),
            lambda: capture_decoder_features(unet, self._latent(size), 100, self._context(arch), blocks),
        )

    def decoder_map_shapes(self, arch: str, size: int, blocks: Sequence[int]) -> list[tuple[int, int, int]]:
        """(C, h, w) of the SD+DINO decoder maps of ``blocks`` at image size ``size``."""
        from sd4match.baselines import capture_decoder_features

        key = ("decoder_shapes", arch, size, tuple(blocks))
        if key not in self._shapes:
            with torch.no_grad():
                maps = capture_decoder_features(
                    self.sd(arch).unet, self._latent(size), 100, self._context(arch), blocks
                )
            self._shapes[key] = [tuple(m.shape[1:]) for m in maps]
        return self._shapes[key]

    def unet_full(self, arch: str, size: int) -> int:
        """One latent through the whole UNet (a sampling step of generation)."""
        unet = self.sd(arch).unet
        t = torch.tensor(50, device=META)
        return self._cached(
            ("unet_full", arch, size),
            lambda: unet(self._latent(size), t, encoder_hidden_states=self._context(arch)),
        )

    def vae_encode(self, arch: str, size: int) -> int:
        """One image through the VAE encoder (the posterior of a ``size`` x ``size`` image)."""
        vae = self.sd(arch).vae
        pixels = torch.empty(1, 3, size, size, device=META)
        return self._cached(("vae_encode", arch, size), lambda: vae.encode(pixels))

    def vae_decode(self, arch: str, size: int) -> int:
        """One latent through the VAE decoder (generation)."""
        vae = self.sd(arch).vae
        return self._cached(("vae_decode", arch, size), lambda: vae.decode(self._latent(size)))

    def text(self, arch: str) -> int:
        """One 77-token prompt through the frozen CLIP text transformer (``encode_sequence``)."""
        from sd4match.prompts import encode_sequence

        encoder = self.sd(arch).text_encoder
        return self._cached(("text", arch), lambda: encode_sequence(encoder, self._context(arch)))

    # -- ViTs

    def vit(self, name: str, size: int) -> int:
        """One ``size`` x ``size`` image through a ViT (dinov2, vitb8, vits8 or clip_l14_336)."""
        model = self._model(name)
        pixels = torch.empty(1, 3, size, size, device=META)
        kwargs = {"interpolate_pos_encoding": True} if name in ("vitb8", "vits8") else {}
        return self._cached(("vit", name, size), lambda: model(pixel_values=pixels, **kwargs))

    # -- pair-level work

    def co_pca(self, arch: str, size: int, blocks: Sequence[int], dims: Sequence[int]) -> int:
        """The SD+DINO per-pair part: co-PCA of each decoder map of the two images and the pyramid fusion."""
        from sd4match.baselines import co_pca_fusion

        shapes = self.decoder_map_shapes(arch, size, blocks)
        maps = [torch.empty(2, *shape, device=META) for shape in shapes]
        return self._cached(
            ("co_pca", arch, size, tuple(blocks), tuple(dims)), lambda: co_pca_fusion(maps, tuple(dims))
        )

    def cpm_prompt(self, arch: str, cpm: dict[str, Any] | None) -> int:
        """One pair's CPM prompt from its DINOv2 tokens (g_d, g_n, pooling, assembly)."""
        module = self._prompt("cpm", arch, cpm, None)
        batch = _prompt_batch(module, 1)
        return self._cached(("cpm_prompt", arch, _freeze(cpm)), lambda: module.prompt_pair(batch))

    def _prompt(self, kind: str, arch: str, cpm: dict[str, Any] | None, categories: list[str] | None) -> Any:
        from sd4match.prompt_learning import build_prompt_module, cpm_config_from_dict

        components = self.sd(arch)
        config = None if kind != "cpm" else cpm_config_from_dict(cpm or {}, "FlopMeter cpm options")
        return build_prompt_module(
            kind, components.text_encoder, components.tokenizer, categories=categories, cpm=config
        ).to(META)

    def train_chunk(
        self,
        arch: str,
        size: int,
        kind: str,
        cpm: dict[str, Any] | None,
        pairs: int,
        prompts: int | None = None,
    ) -> int:
        """One training micro-batch of ``pairs`` pairs, forward and backward: prompt, text encoder, truncated
        UNet on both images (one draw), the matching loss, gradients into the prompt.

        ``prompts`` distinct prompts go through the text encoder (default ``2 * pairs``: source and target
        encoded separately, as ``PromptTrainer.pair_features`` does); fewer models encoding each distinct
        prompt once and expanding the encodings.
        """
        from sd4match.features import SDFeaturizer
        from sd4match.loss import matching_loss
        from sd4match.prompts import encode_sequence

        prompts = 2 * pairs if prompts is None else prompts
        if not 1 <= prompts <= 2 * pairs:
            raise ValueError(f"FlopMeter.train_chunk: prompts must be in [1, {2 * pairs}], got {prompts}")
        key = ("train_chunk", arch, size, kind, _freeze(cpm), pairs, prompts)
        if key in self._flops:
            return self._flops[key]
        module = self._prompt(kind, arch, cpm, ["cat", "dog"] if kind == "class" else None)
        components = self.sd(arch)
        featurizer = SDFeaturizer(components, device=META, max_batch=2 * pairs)
        latents = self._latent(size, 2 * pairs)
        kps = torch.empty(pairs, N_KPS, 2, device=META)
        valid = torch.empty(pairs, N_KPS, dtype=torch.bool, device=META)

        def step() -> None:
            src, trg = module.prompt_pair(_prompt_batch(module, pairs))
            distinct = encode_sequence(components.text_encoder, torch.cat([src, trg])[:prompts])
            hidden = distinct[torch.arange(2 * pairs, device=META) % prompts]
            feats = featurizer.extract_from_latents(latents, hidden, 261, 1, torch.Generator().manual_seed(0))
            matching_loss(feats[:pairs], feats[pairs:], kps, kps, valid, size).backward()

        return self._cached(key, step, grad=True)


def _prompt_batch(module: Any, pairs: int) -> Any:
    """A PromptBatch of ``pairs`` pairs with meta DINOv2 tokens of the CPM's configured shape."""
    from sd4match.prompt_learning import PromptBatch

    categories = ["cat"] * pairs
    if not module.needs_dino:
        return PromptBatch(categories)
    cfg = module.config
    tokens = torch.empty(pairs, cfg.n_patches, cfg.dino_dim, device=META)
    descriptor = torch.empty(pairs, cfg.dino_dim, device=META)
    return PromptBatch(categories, tokens, tokens, descriptor, descriptor)


def _freeze(options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """A hashable form of CPM options for the cache key."""
    return None if options is None else tuple(sorted(options.items()))
