"""Network passes per job, counted with forward hooks while the project's own evaluation code runs (tiny
models, synthetic images): SD+DINO per pair vs per image, and VAE passes of a Single and a CPM evaluation
encoding its images vs reading the test split's latent cache.

A pass here is one sample (image or latent) through a network; counts do not depend on model size, so the
tiny world measures what the real job does, and the ratios carry over to the SPair-71k test set.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from sd4match.evaluation import MatchingSettings

SYNTHETIC_SIZE = (96, 72)  # W x H of the synthetic images (the featurizers resize them)
N_KPS = 4


@contextlib.contextmanager
def count_samples(modules: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Count the samples (leading dimension of the first tensor input) each module's forward receives."""
    seen = dict.fromkeys(modules, 0)

    def counter(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
            seen[name] += int(first.shape[0])

        return hook

    handles = [m.register_forward_pre_hook(counter(n), with_kwargs=True) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def synthetic_pairs(root: Path, categories: int, images_per_category: int, seed: int = 0) -> pd.DataFrame:
    """Random images and every ordered pair of distinct images within each category (PF-Willow's design),
    with random keypoints; a pairs table in the project's layout, images relative to ``root``."""
    rng = np.random.default_rng(seed)
    width, height = SYNTHETIC_SIZE
    rows = []
    for c in range(categories):
        names = []
        for i in range(images_per_category):
            name = f"cat{c}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
            names.append(name)
        for src in names:
            for trg in names:
                if src != trg:
                    kps = (rng.random((N_KPS, 2)) * [width - 1, height - 1]).tolist()
                    rows.append(
                        (f"c{c}", src, trg, kps, (rng.random((N_KPS, 2)) * [width - 1, height - 1]).tolist())
                    )
    return pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(len(rows))],
            "dataset": "spair",
            "split": "test",
            "category": [r[0] for r in rows],
            "src_image": [r[1] for r in rows],
            "trg_image": [r[2] for r in rows],
            "src_width": width,
            "src_height": height,
            "trg_width": width,
            "trg_height": height,
            "src_kps": [r[3] for r in rows],
            "trg_kps": [r[4] for r in rows],
            "src_bbox": [[0.0, 0.0, width - 1.0, height - 1.0]] * len(rows),
            "trg_bbox": [[0.0, 0.0, width - 1.0, height - 1.0]] * len(rows),
            "flip": False,
            "n_kps": N_KPS,
            "threshold_kind": "bbox",
        }
    )


def distinct_images(pairs: pd.DataFrame) -> int:
    """Distinct (image, flip) keys of a pairs table."""
    flips = pairs["flip"].astype(bool)
    keys = set(zip(pairs["src_image"], flips, strict=True)) | set(zip(pairs["trg_image"], flips, strict=True))
    return len(keys)


def _tiny(root: Path) -> dict[str, Any]:
    """Tiny SD 1-5, SD 2-1, DINOv2 and CLIP models and a tiny captioner checkpoint under ``root``."""
    from sd4match.baselines import build_tiny_implicit_captioner_weights
    from sd4match.models import load_clip_vision, load_dinov2, load_stable_diffusion
    from sd4match.tiny_models import (
        TEXT_HIDDEN_SIZE,
        build_tiny_clip_vision,
        build_tiny_dinov2,
        build_tiny_stable_diffusion,
    )

    clip, processor = load_clip_vision(build_tiny_clip_vision(root / "clip"))
    dinov2, dino_processor = load_dinov2(build_tiny_dinov2(root / "dinov2"))
    return {
        "sd15": load_stable_diffusion(build_tiny_stable_diffusion(root / "sd15", variant="sd15")),
        "sd21": load_stable_diffusion(build_tiny_stable_diffusion(root / "sd21", variant="sd21")),
        "dinov2": dinov2,
        "dino_processor": dino_processor,
        "clip": clip,
        "processor": processor,
        "captioner": build_tiny_implicit_captioner_weights(
            root / "captioner.pth", root / "clip", TEXT_HIDDEN_SIZE
        ),
    }


def sd_dino_passes(
    categories: int = 2, images_per_category: int = 4, image_size: int = 64, ensemble: int = 1
) -> dict[str, Any]:
    """Samples through the UNet, VAE encoder, captioner CLIP and DINOv2 of an SD+DINO evaluation, per pair
    (before) and per distinct image (``evaluate_sd_dino``), in one run on the same pairs."""
    from sd4match import baselines as B

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = _tiny(root / "models")
        pairs = synthetic_pairs(root, categories, images_per_category)
        captioner = B.build_implicit_captioner(tiny["clip"], tiny["processor"], tiny["sd15"])
        B.load_implicit_captioner_weights(captioner, tiny["captioner"])
        settings = B.SDDinoSettings(sd_image_size=image_size, dino_image_size=112, ensemble=ensemble)
        featurizer = B.SDDinoFeaturizer(
            tiny["sd15"], B.captioner_conditioning(captioner), tiny["dinov2"], settings
        )
        watched = {
            "unet": tiny["sd15"].unet,
            "vae": tiny["sd15"].vae.encoder,
            "clip": tiny["clip"],
            "dinov2": tiny["dinov2"],
        }
        settings = MatchingSettings(image_size, ("nn",), (0.1,))
        with count_samples(watched) as before:
            old = B.evaluate_pairs_per_pair(pairs, featurizer.pair_features, settings, root)
        with count_samples(watched) as after:
            new = B.evaluate_sd_dino(pairs, featurizer, settings, root)
        identical = bool(old.equals(new))
        return {
            "pairs": len(pairs),
            "images": distinct_images(pairs),
            "before": dict(before),
            "after": dict(after),
            "identical_per_pair_tables": identical,
        }


def vae_passes(
    categories: int = 2,
    images_per_category: int = 4,
    image_size: int = 64,
    ensemble: int = 2,
    pair_batch: int = 4,
) -> dict[str, Any]:
    """VAE-encoder samples of a Single evaluation (``sd_text_prompt_features``) and a CPM evaluation
    (``evaluate_pairs_conditional``) on the same pairs: encoding in the job (``single``, ``cpm``), and reading
    the test split's latent cache (``cache``: its one build; ``single_cached``, ``cpm_cached``: the jobs),
    next to the distinct images they contain. The cached jobs' per-pair tables equal the others'."""
    from sd4match.caches import DinoCache, LatentCache, build_dino_cache, build_latent_cache, encoder_meta
    from sd4match.evaluation import (
        ConditionalFeatures,
        evaluate_pairs,
        evaluate_pairs_conditional,
        sd_text_prompt_features,
    )
    from sd4match.features import SDFeaturizer
    from sd4match.prompt_learning import CPMConfig, build_prompt_module

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = _tiny(root / "models")
        pairs = synthetic_pairs(root, categories, images_per_category)
        components = tiny["sd21"]
        featurizer = SDFeaturizer(components)
        settings = MatchingSettings(image_size, ("nn",), (0.1,))
        single = build_prompt_module("single", components.text_encoder, components.tokenizer).eval()
        width = int(tiny["dinov2"].config.hidden_size)
        cpm = build_prompt_module(
            "cpm", components.text_encoder, components.tokenizer, cpm=CPMConfig(dino_dim=width)
        ).eval()
        cache_path = root / "dino.safetensors"
        build_dino_cache(pairs, root, tiny["dinov2"], tiny["dino_processor"], cache_path, {"kind": "dino"})
        dino = DinoCache.load(cache_path, expect_meta={})
        watched = {"vae": components.vae.encoder, "unet": components.unet, "text": components.text_encoder}
        latents_path, meta = root / "latents.safetensors", {"encoder": encoder_meta(featurizer)}
        with count_samples(watched) as cache_seen:
            build_latent_cache(pairs, root, featurizer, image_size, latents_path, meta, batch_size=1)
        latents = LatentCache.load(latents_path, meta)
        seen, tables = {}, {}
        for name, cache in (("", None), ("_cached", latents)):
            with count_samples(watched) as seen[f"single{name}"]:
                features = sd_text_prompt_features(
                    featurizer, single, root, image_size, 50, ensemble, 0, cache
                )
                tables[f"single{name}"] = evaluate_pairs(pairs, features, settings)
            with count_samples(watched) as seen[f"cpm{name}"], torch.no_grad():
                source = ConditionalFeatures(
                    cpm, featurizer, dino, root, image_size, 50, ensemble, 0, pair_batch, cache
                )
                tables[f"cpm{name}"] = evaluate_pairs_conditional(pairs, source, settings)
        return {
            "pairs": len(pairs),
            "images": distinct_images(pairs),
            "cache": dict(cache_seen),
            **{name: dict(counts) for name, counts in seen.items()},
            "identical_per_pair_tables": all(
                tables[k].equals(tables[f"{k}_cached"]) for k in ("single", "cpm")
            ),
        }
