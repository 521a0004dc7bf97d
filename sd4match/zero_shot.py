"""Zero-shot baselines computed by the DAG: DIFT (SD text prompt), DINO/DINOv2 (ViT), SD+DINO and SD+DINO*.

One entry point, :func:`run_zero_shot`, dispatches on the method's ``kind`` and ``protocol``:

- ``squashed`` (default, every kind): this pipeline's (SD4Match's) protocol, the S x S squashed frame, every
  matching method, ``d <= alpha * theta``;
- ``original`` (kind sd): DIFT's own evaluation (``peer_protocols.OriginalFrameScorer``), original frame;
- ``padded`` (kinds sd_dino, vit): sd-dino's own (``peer_protocols.PaddedFrameScorer``), padded square.

The peers' protocols match by nearest neighbour only; their per-pair rows carry method ``nn``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sd4match.data_sources import read_location
from sd4match.datasets import read_pairs_table
from sd4match.evaluation import (
    evaluate_pairs,
    limit_pairs,
    sd_text_prompt_features,
)
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.models import load_clip_vision, load_dino, load_dinov2, load_stable_diffusion, read_model_record
from sd4match.prompts import TextPrompt

log = logging.getLogger(__name__)

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
PROTOCOLS = {"sd": ("squashed", "original"), "vit": ("squashed", "padded"), "sd_dino": ("squashed", "padded")}


def method_protocol(method: dict[str, Any]) -> str:
    """The method's evaluation protocol (``squashed`` unless configured), checked against its kind."""
    protocol = method.get("protocol", "squashed")
    allowed = PROTOCOLS.get(method["kind"], ())
    if protocol not in allowed:
        raise ValueError(
            f"zero-shot method of kind {method['kind']!r}: protocol {protocol!r} is not one of {allowed}"
        )
    return protocol


def _sd_features(method, records, root, pairs, split: SplitInputs, settings: JobSettings):
    """DIFT's features: normalised maps of the S x S image (latents from the split's latent cache when it has
    one), or (protocol ``original``) DIFT's raw maps of its own resize."""
    from sd4match.evaluation import open_test_latents
    from sd4match.features import load_sd_featurizer
    from sd4match.peer_protocols import dift_feature_fn

    image_size, seed = settings.image_size, settings.seed
    local_path = read_model_record(records["model"]).local_path
    featurizer = load_sd_featurizer(local_path, settings.features, settings.device)
    prompt = TextPrompt(method["prompt"], featurizer.text_encoder, featurizer.tokenizer)
    if method_protocol(method) == "original":  # DIFT's own resize and a VAE sample per ensemble copy
        return dift_feature_fn(
            featurizer, prompt, root, image_size, method["timestep"], method["ensemble"], seed
        )
    latents = open_test_latents(
        split.latent_cache, records["model"], image_size, featurizer, pairs, split.pairs
    )
    return sd_text_prompt_features(
        featurizer, prompt, root, image_size, method["timestep"], method["ensemble"], seed, latents
    )


def _vit_model(method, records, settings: JobSettings):
    from sd4match.features import KernelSettings, enable_tf32

    device = settings.device
    loader = {"dino": load_dino, "dinov2": load_dinov2}[method["family"]]
    dtype = KernelSettings.from_config(settings.features).weights_dtype(device)
    enable_tf32(device)
    model, _ = loader(read_model_record(records["model"]).local_path, device=device, dtype=dtype)
    return model


def _vit_scorer(model, method, alphas, predictions=None):
    """sd-dino's padded-frame scorer of a ViT's strided patch grid."""
    from sd4match.baselines import VitFacet, patch_size, vit_grid_side
    from sd4match.peer_protocols import PaddedFrameScorer, PatchGrid

    size, stride = method["image_size"], VitFacet.from_method(method).stride
    patch = patch_size(model)
    grid = PatchGrid(size, vit_grid_side(model, size, stride), stride or patch, patch)
    return PaddedFrameScorer(size, tuple(alphas), grid, predictions)


def _sd_dino_featurizer(method, records, captioner: Captioner | None, settings: JobSettings):
    from sd4match.baselines import (
        SDDinoFeaturizer,
        SDDinoSettings,
        build_implicit_captioner,
        captioner_conditioning,
        load_implicit_captioner_weights,
        text_conditioning,
    )

    device, features = settings.device, settings.features
    components = load_stable_diffusion(read_model_record(records["model"]).local_path, device=device)
    if method["prompt"] == "implicit":
        clip, processor = load_clip_vision(read_model_record(records["clip_model"]).local_path, device=device)
        module = build_implicit_captioner(clip, processor, components)
        load_implicit_captioner_weights(module, captioner.path, prefix=captioner.config["prefix"])
        conditioning = captioner_conditioning(module.eval())
    else:
        conditioning = text_conditioning(
            TextPrompt(method["prompt"], components.text_encoder, components.tokenizer)
        )
    dino = None
    if method.get("dino_model"):
        dino, _ = load_dinov2(read_model_record(records["dino_model"]).local_path, device=device)
    noise_seed = method.get("noise_seed")
    sd_dino = SDDinoSettings(
        sd_image_size=method["image_size"],
        timestep=method["timestep"],
        ensemble=method["ensemble"],
        dino_image_size=method["dino_image_size"],
        seed=settings.seed if noise_seed is None else noise_seed,
        max_batch=features["max_unet_batch"],
        preprocess="pad" if method_protocol(method) == "padded" else "squash",
    )
    return SDDinoFeaturizer(
        components,
        conditioning,
        dino,
        sd_dino,
        device=device,
        autocast_dtype=AUTOCAST[features["precision"]] if device.startswith("cuda") else None,
    )


@dataclass(frozen=True)
class Captioner:
    """SD+DINO*'s implicit captioner: its weights file and its config block."""

    path: str | Path
    config: dict[str, Any]


def run_zero_shot(
    method: dict[str, Any],
    records: dict[str, str | Path],
    split: SplitInputs,
    settings: JobSettings,
    outputs: JobOutputs,
    captioner: Captioner | None = None,
) -> pd.DataFrame:
    """Evaluate one zero-shot method on one test set (its ``protocol``, module docstring); ``records`` maps
    model roles to model-record files. ``split.latent_cache`` (DIFT in the squashed frame): the test split's
    latent cache, read instead of running the VAE. The predicted points of the squashed-frame protocol go to
    ``outputs.predictions`` (parquet, ``sd4match.predictions``) when given; a peer's own protocol
    (``original``, ``padded``) records its nearest-neighbour points, mapped from its frame to the original
    target frame."""
    from sd4match.frames import evaluate_with_scorer
    from sd4match.peer_protocols import PEER_METHODS, OriginalFrameScorer, PaddedFrameScorer

    pairs = limit_pairs(read_pairs_table(split.pairs), settings.max_pairs)
    root = read_location(split.location).root
    device, alphas = settings.device, tuple(settings.alphas)
    matching = settings.matching_settings()
    predictions = outputs.prediction_log(settings.image_size)
    protocol = method_protocol(method)
    if protocol != "squashed":
        log.info("protocol %s matches by %s only (the config's matching methods do not apply)", protocol,
                 PEER_METHODS)  # fmt: skip
    log.info("zero-shot %s on %s: %d pairs", method, split.pairs, len(pairs))
    if method["kind"] == "sd":
        feature_fn = _sd_features(method, records, root, pairs, split, settings)
        if protocol == "original":
            scorer = OriginalFrameScorer(alphas, predictions)
            per_pair = evaluate_with_scorer(pairs, feature_fn, scorer, device)
        else:
            per_pair = evaluate_pairs(pairs, feature_fn, matching, device=device, predictions=predictions)
    elif method["kind"] == "vit":
        from sd4match.baselines import VitFacet, vit_feature_fn

        model = _vit_model(method, records, settings)
        padded = protocol == "padded"
        feature_fn = vit_feature_fn(
            model, root, method["image_size"], device=device, facet=VitFacet.from_method(method), pad=padded
        )
        if padded:
            scorer = _vit_scorer(model, method, alphas, predictions)
            per_pair = evaluate_with_scorer(pairs, feature_fn, scorer, device)
        else:
            per_pair = evaluate_pairs(pairs, feature_fn, matching, device=device, predictions=predictions)
    elif method["kind"] == "sd_dino":
        from sd4match.baselines import evaluate_sd_dino

        if method["prompt"] == "implicit" and captioner is None:
            raise ValueError("zero-shot SD+DINO with the implicit captioner needs its weights (captioner)")
        featurizer = _sd_dino_featurizer(method, records, captioner, settings)
        scorer = None
        if protocol == "padded":  # keypoints in DINO's padded square, as sd-dino
            scorer = PaddedFrameScorer(method["dino_image_size"], alphas, predictions=predictions)
        # the networks run once per distinct image; the co-PCA and the scoring per pair
        per_pair = evaluate_sd_dino(pairs, featurizer, matching, root, scorer=scorer, predictions=predictions)
    else:
        raise ValueError(f"zero-shot method kind {method['kind']!r} is unknown (sd, vit, sd_dino)")
    return outputs.write(per_pair, predictions)
