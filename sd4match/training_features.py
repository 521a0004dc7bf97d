"""Features of a batch of pairs under a learned prompt, as training and validation compute them: both images
of every pair in one truncated-UNet batch, conditioned on ``module.prompt_pair`` (DINOv2 tokens from the
cache when the prompt needs them), each distinct prompt of the batch through the text encoder once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from sd4match.caches import DinoCache
from sd4match.features import SDFeaturizer
from sd4match.prompt_learning import PromptBatch
from sd4match.prompts import encode_prompt_pair, encode_sequence
from sd4match.training_data import PairBatch

PromptFn = Callable[[PromptBatch], tuple[Tensor, Tensor]]


def distinct_rows(embeds: Tensor) -> tuple[list[int], list[int]]:
    """Indices of the first occurrence of each distinct (77, D) row of ``embeds`` and, per row, the position
    of its distinct row among them (one comparison matrix, read once)."""
    flat = embeds.detach().flatten(1)
    same = (flat[:, None] == flat[None]).all(dim=-1) | torch.eye(
        len(flat), dtype=torch.bool, device=flat.device
    )
    first = same.to(torch.uint8).argmax(dim=1).tolist()  # the first equal row (itself at the latest)
    index = sorted(set(first))
    position = {row: i for i, row in enumerate(index)}
    return index, [position[row] for row in first]


def encode_distinct(text_encoder: nn.Module, embeds: Tensor) -> Tensor:
    """``encode_sequence`` of (N, 77, D) prompts with each distinct prompt encoded once and expanded (Single:
    one per batch; Class: one per category present); gradients reach every row they came from."""
    index, inverse = distinct_rows(embeds)
    if len(index) == len(embeds):
        return encode_sequence(text_encoder, embeds)
    return encode_sequence(text_encoder, embeds[index])[inverse]


def encode_pair_prompts(text_encoder: nn.Module, src_embeds: Tensor, trg_embeds: Tensor) -> Tensor:
    """UNet conditioning (2B, 77, D) of B pairs' source and target prompts: a prompt shared by both images
    (Single, Class, CPM on a pair) encoded once per pair (``encode_prompt_pair``), and identical prompts
    within the batch (Single, Class) once per batch."""
    if src_embeds is trg_embeds or (
        src_embeds.shape == trg_embeds.shape and torch.equal(src_embeds, trg_embeds)
    ):
        hidden = encode_distinct(text_encoder, src_embeds)
        return torch.cat([hidden, hidden])
    return encode_prompt_pair(text_encoder, src_embeds, trg_embeds)


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
        self,
        prompt_fn: PromptFn,
        batch: PairBatch,
        latents: Tensor,
        t: int,
        generator: torch.Generator | Sequence[torch.Generator],
    ) -> tuple[Tensor, Tensor]:
        """Source and target features (B, C, s, s): both images in one UNet batch, one noise draw each
        (``generator``: one for the batch, or one per image row, sources then targets)."""
        src_embeds, trg_embeds = prompt_fn(self.prompt_batch(batch))
        hidden = encode_pair_prompts(self.text_encoder, src_embeds, trg_embeds)
        rows = generator if isinstance(generator, torch.Generator) else list(generator)
        feats = self.featurizer.extract_from_latents(latents, hidden, t, ensemble=1, generator=rows)
        n = len(batch.categories)
        return feats[:n], feats[n:]
