"""Validation of a prompt during tuning: mean per-pair PCK@0.1 (nearest neighbour) on the validation pairs.

Each image's latent (a posterior sample, as ``latent_dist.sample()`` at test time) and, for per-image prompts,
its noise come from a generator seeded with ``evaluation.image_seed``; each CPM pair draws its noise from a
generator seeded by its pair id. Validation is therefore the same at every evaluation, independent of
training randomness and of how many pairs go through the UNet at once, and (per-image prompts) equal to the
test-time evaluation of the same prompt. It runs the evaluation's machinery: each distinct prompt encoded once
per validation pass (``CategoryPromptEncoder``), pairs matched on the device (``iter_predictions``,
``score_pairs``), only predictions moved to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sd4match.evaluation import (
    FeatureFn,
    ImageKey,
    MatchingSettings,
    image_seed,
    iter_predictions,
    score_pairs,
    score_predictions,
)
from sd4match.prompt_learning import LearnedPrompt
from sd4match.prompts import CategoryPromptEncoder
from sd4match.training_data import TrainingData, cache_key, collate_pairs, pair_chunk_seed
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

    def image_features(self, conditioning: CategoryPromptEncoder) -> FeatureFn:
        """Validation features (B, C, s, s) of images (per-image prompt), on the device; each image's latent
        and noise from its own seeded generator, its prompt encoded once per validation pass."""
        featurizer, t = self.features.featurizer, self.settings.val_timestep

        def features_for(keys: Sequence[ImageKey]) -> Tensor:
            out = []
            for key in keys:
                generator = torch.Generator().manual_seed(image_seed(self.settings.seed, key))
                latent = self.latent(key, generator)
                out.append(
                    featurizer.extract_from_latents(latent, conditioning([key.category]), t, 1, generator)
                )
            return torch.cat(out)

        return features_for

    def per_image(self, module: LearnedPrompt) -> tuple[float, int]:
        """Sum and count of pair PCKs, features once per distinct image (categories split over processes),
        each category's pairs matched on the device in batches."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        categories = list(dict.fromkeys(self.data.val["category"]))  # first-appearance order
        mine = [c for index, c in enumerate(categories) if index % world == rank]
        pairs = self.data.val[self.data.val["category"].isin(mine)]
        features_for = self.image_features(CategoryPromptEncoder(self.features.text_encoder, module))
        total, count = 0.0, 0
        for rows, _, predictions in iter_predictions(pairs, features_for, self.matching):
            for row, preds in zip(rows, predictions, strict=True):
                total += score_predictions(row, preds, self.matching)[0].pck
                count += 1
        return total, count

    def per_pair(self, module: LearnedPrompt) -> tuple[float, int]:
        """Sum and count of pair PCKs with a prompt per pair (CPM), chunks split over processes and matched on
        the device; each pair's noise from a generator seeded by its pair id."""
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
            noise = [
                torch.Generator().manual_seed(pair_chunk_seed(self.settings.seed, [i]))
                for i in batch.pair_ids
            ]
            src, trg = self.features(
                module.prompt_pair, batch, latents, self.settings.val_timestep, [*noise, *noise]
            )
            scores = score_pairs(rows[start : start + size], src, trg, self.matching)
            total += sum(score.pck for score in scores)
            count += len(scores)
        return total, count

    @torch.no_grad()
    def __call__(self, module: LearnedPrompt) -> float:
        """Mean per-pair PCK@0.1 (percent, nearest neighbour) on the validation pairs at t = val_timestep."""
        total, count = self.per_image(module) if module.per_image else self.per_pair(module)
        summed = self.accelerator.reduce(
            torch.tensor([total, count], dtype=torch.float64, device=self.features.device)
        )
        return float(summed[0] / summed[1])
