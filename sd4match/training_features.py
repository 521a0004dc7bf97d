"""Features of a batch of pairs under a learned prompt, as training and validation compute them: both images
of every pair in one truncated-UNet batch, conditioned on ``module.prompt_pair`` (DINOv2 tokens from the
cache when the prompt needs them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sd4match.caches import DinoCache
from sd4match.features import SDFeaturizer
from sd4match.prompt_learning import PromptBatch
from sd4match.prompts import encode_sequence
from sd4match.training_data import PairBatch

PromptFn = Callable[[PromptBatch], tuple[Tensor, Tensor]]


class PairFeatures:
    """Source and target features of pair batches: frozen featurizer and text encoder, DINOv2 cache."""

    def __init__(
        self,
        featurizer: SDFeaturizer,
        text_encoder: nn.Module,
        dino: DinoCache | None,
        device: torch.device,
    ) -> None:
        self.featurizer, self.text_encoder, self.dino, self.device = featurizer, text_encoder, dino, device

    def prompt_batch(self, batch: PairBatch) -> PromptBatch:
        """PromptBatch of a pair batch, with cached DINOv2 tokens/descriptors when the prompt needs them."""
        if self.dino is None:
            return PromptBatch(batch.categories)
        return PromptBatch(
            batch.categories,
            src_tokens=self.dino.tokens(batch.src_keys, self.device),
            trg_tokens=self.dino.tokens(batch.trg_keys, self.device),
            src_global=self.dino.global_(batch.src_keys, self.device),
            trg_global=self.dino.global_(batch.trg_keys, self.device),
        )

    def __call__(
        self, prompt_fn: PromptFn, batch: PairBatch, latents: Tensor, t: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Source and target features (B, C, s, s): both images in one UNet batch, one noise draw each."""
        src_embeds, trg_embeds = prompt_fn(self.prompt_batch(batch))
        hidden = encode_sequence(self.text_encoder, torch.cat([src_embeds, trg_embeds]))
        feats = self.featurizer.extract_from_latents(latents, hidden, t, ensemble=1, generator=generator)
        n = len(batch.categories)
        return feats[:n], feats[n:]
