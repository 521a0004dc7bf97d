"""What one evaluation job reads, applies and writes, as records: the test split, the config it applies and
its output files. The rules ``evaluate_prompt`` (and its timestep and released-prompt variants) and
``evaluate_zero_shot`` fill them (``from_rule``); ``evaluation.run_prompt_evaluation`` and
``zero_shot.run_zero_shot`` take them, and so do the tests and ``sd4match match``'s equality checks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sd4match.evaluation import MatchingSettings
from sd4match.io import write_table_atomic
from sd4match.metrics import summarise
from sd4match.predictions import PredictionLog

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SplitInputs:
    """A test split as an evaluation reads it: its pairs table, the dataset's location record and the
    split's latent cache (the VAE posteriors of its images, ``caches.run_test_latent_cache``; None: the VAE
    encodes each distinct image in the job)."""

    pairs: PathLike
    location: PathLike
    latent_cache: PathLike | None = None

    @classmethod
    def from_rule(cls, inputs: Any) -> SplitInputs:
        """From an evaluation rule's named inputs ``pairs``, ``data`` and optional ``latent_cache``."""
        return cls(inputs.pairs, inputs.data, inputs.get("latent_cache"))


@dataclass(frozen=True)
class JobSettings:
    """The config an evaluation job applies: ``features`` (precision, UNet block and batch), the ``matching``
    block (methods, kernel sigma, softmax temperature), the PCK ``alphas``, ``max_pairs`` (None: every pair),
    the image size S, the seed of its noise and the device it runs on."""

    features: dict[str, Any]
    matching: dict[str, Any]
    alphas: Sequence[float]
    max_pairs: int | None
    image_size: int
    seed: int
    device: str = "cpu"

    @classmethod
    def from_rule(cls, params: Any, device: str) -> JobSettings:
        """From an evaluation rule's params ``features``, ``matching``, ``alphas``, ``max_pairs``,
        ``image_size`` and ``seed``, on the device its GPU lease gives."""
        return cls(
            params.features,
            params.matching,
            list(params.alphas),
            params.max_pairs,
            int(params.image_size),
            int(params.seed),
            device,
        )

    def matching_settings(self) -> MatchingSettings:
        """MatchingSettings of the ``matching`` block, the alphas and S."""
        return MatchingSettings.from_config(self.matching, self.image_size, self.alphas)


@dataclass(frozen=True)
class JobOutputs:
    """The files an evaluation job writes: the per-pair table, its summary and (when given) the per-keypoint
    predictions (``sd4match.predictions``)."""

    per_pair: PathLike
    summary: PathLike
    predictions: PathLike | None = field(default=None)

    @classmethod
    def from_rule(cls, outputs: Any) -> JobOutputs:
        """From an evaluation rule's named outputs ``per_pair``, ``summary`` and ``predictions``."""
        return cls(outputs.per_pair, outputs.summary, outputs.predictions)

    def prediction_log(self, image_size: int) -> PredictionLog | None:
        """A log to record the job's predictions into, or None when the job writes none."""
        return None if self.predictions is None else PredictionLog(image_size)

    def write(self, per_pair: pd.DataFrame, predictions: PredictionLog | None) -> pd.DataFrame:
        """Write the predictions (when recorded), the per-pair table and its summary, each atomically;
        returns the summary."""
        if predictions is not None:
            if self.predictions is None:
                raise ValueError(f"predictions recorded for {self.summary} but no predictions file to write")
            predictions.write(self.predictions)
        write_table_atomic(per_pair, self.per_pair)
        summary = summarise(per_pair)
        write_table_atomic(summary, self.summary)
        return summary
