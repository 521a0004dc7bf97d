"""Validation of a prompt during tuning: mean per-pair PCK@0.1 (nearest neighbour) on the validation pairs.

Each image's latent (a posterior sample, as ``latent_dist.sample()`` at test time) and, for per-image prompts,
its noise come from a generator seeded with ``evaluation.image_seed``; CPM pairs draw their noise from a
generator seeded by the chunk's pair ids. Validation is therefore the same at every evaluation, independent of
training randomness, and equal to the test-time evaluation of the same prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sd4match.evaluation import ImageKey, MatchingSettings, image_seed, score_pair
from sd4match.prompt_learning import LearnedPrompt, PromptBatch
from sd4match.prompts import encode_sequence
from sd4match.training_data import TrainingData, cache_key, collate_pairs, pair_chunk_seed, pair_image_keys
from sd4match.training_features import PairFeatures

VAL_ALPHA = 0.1
VAL_METHOD = "nn"


class Validator:
    """Scores a prompt on the validation pairs; work is split over the accelerator's processes."""

    def __init__(
        self,
        settings: Any,
        data: TrainingData,
        features: PairFeatures,
        scaling_factor: float,
        accelerator: Any,
    ) -> None:
        self.settings, self.data, self.features = settings, data, features
        self.scaling_factor, self.accelerator = scaling_factor, accelerator
        self.matching = MatchingSettings(settings.image_size, (VAL_METHOD,), (VAL_ALPHA,))

    def latent(self, key: ImageKey, generator: torch.Generator) -> Tensor:
        """A posterior sample (1, 4, S/8, S/8) of a validation image drawn from ``generator``."""
        return self.data.latents.sample([cache_key(key)], self.scaling_factor, generator)

    def image_feature(self, module: LearnedPrompt, key: ImageKey) -> Tensor:
        """Validation feature (C, s, s) of one image (per-image prompt); latent and noise seeded per image."""
        generator = torch.Generator().manual_seed(image_seed(self.settings.seed, key))
        latent = self.latent(key, generator)
        embeds = module.prompt_pair(PromptBatch([key.category]))[0]
        hidden = encode_sequence(self.features.text_encoder, embeds)
        feature = self.features.featurizer.extract_from_latents(
            latent, hidden, self.settings.val_timestep, 1, generator
        )
        return feature[0].cpu()

    def score(self, row: Any, src_feat: Tensor, trg_feat: Tensor) -> float:
        """PCK@0.1 (percent, nearest neighbour) of one validation pair."""
        return score_pair(row, src_feat, trg_feat, self.matching)[0].pck

    def per_image(self, module: LearnedPrompt) -> tuple[float, int]:
        """Sum and count of pair PCKs, features once per distinct image (categories split over processes)."""
        total, count = 0.0, 0
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        for index, (_, group) in enumerate(self.data.val.groupby("category", sort=False)):
            if index % world != rank:
                continue
            rows = list(group.itertuples())
            keys = sorted({k for row in rows for k in pair_image_keys(row)}, key=str)
            feats = {key: self.image_feature(module, key) for key in keys}
            for row in rows:
                src, trg = pair_image_keys(row)
                total += self.score(row, feats[src], feats[trg])
                count += 1
        return total, count

    def per_pair(self, module: LearnedPrompt) -> tuple[float, int]:
        """Sum and count of pair PCKs with a prompt per pair (CPM), chunks split over processes."""
        total, count, size = 0.0, 0, self.settings.per_device_batch
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rows = list(self.data.val.itertuples())
        for index, start in enumerate(range(0, len(rows), size)):
            if index % world != rank:
                continue
            pairs = self.data.val_pairs[start : start + size]
            batch = collate_pairs(pairs, self.features.device)
            keys = [p.src for p in pairs] + [p.trg for p in pairs]
            latents = torch.cat(
                [
                    self.latent(k, torch.Generator().manual_seed(image_seed(self.settings.seed, k)))
                    for k in keys
                ]
            )
            generator = torch.Generator().manual_seed(pair_chunk_seed(self.settings.seed, batch.pair_ids))
            src, trg = self.features(
                module.prompt_pair, batch, latents, self.settings.val_timestep, generator
            )
            for i, row in enumerate(rows[start : start + size]):
                total += self.score(row, src[i].cpu(), trg[i].cpu())
                count += 1
        return total, count

    @torch.no_grad()
    def __call__(self, module: LearnedPrompt) -> float:
        """Mean per-pair PCK@0.1 (percent, nearest neighbour) on the validation pairs at t = val_timestep."""
        total, count = self.per_image(module) if module.per_image else self.per_pair(module)
        summed = self.accelerator.reduce(
            torch.tensor([total, count], dtype=torch.float64, device=self.features.device)
        )
        return float(summed[0] / summed[1])
