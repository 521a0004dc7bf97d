"""GPU check: run it whenever a GPU is available (`python bench/gpu_check.py`); it skips cleanly without one.

On the real SD 2-1 architectures (published configs, random weights: speed does not depend on the values) it
measures, with the project's own functions:
1. the truncated UNet's images/s at 768 px, batch 8 (one ensemble), fp16 and bf16 weights;
2. one prompt-tuning step of 9 pairs in one call (18 latents, t = 261, forward + backward into a Single
   prompt, Adam): time and peak memory, fp32 weights under fp16 autocast (today's training) and fp16 weights;
3. Single and CPM evaluation pairs/s: Single from the time of one image's features (VAE sample, 8 draws,
   t = 50) and one pair's scoring at SPair-71k's ratio of 12,234 pairs to 481 images; CPM from batches of
   4 pairs (both images, 8 draws each) and their scoring, as ``evaluate_pairs_conditional`` runs them.
The rows are printed as markdown and appended to BENCHMARKS.md (``--no-append`` to only print). Budget: a few
minutes on an H100/H200 (models are built directly on the GPU; every measurement is a handful of calls).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SPAIR_PAIRS, SPAIR_IMAGES = 12_234, 481
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CheckSettings:
    """Sizes of the check: the paper's by default; ``smoke`` shrinks them to exercise the code on a CPU."""

    device: str = "cuda"
    image_size: int = 768
    unet_batch: int = 8
    unet_repeats: int = 5
    train_pairs: int = 9
    train_steps: int = 3
    ensemble: int = 8
    eval_images: int = 4
    cpm_pairs: int = 8
    pair_batch: int = 4

    @classmethod
    def smoke(cls) -> CheckSettings:
        return cls("cpu", 64, 2, 1, 2, 1, 2, 2, 2, 2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], repeats: int, device: str) -> float:
    """Mean seconds of ``fn`` over ``repeats`` calls after one warm-up."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _components(settings: CheckSettings, dtype: torch.dtype) -> Any:
    from sd4match import architectures as A

    components = A.build_sd_components("sd21", device=settings.device)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(dtype)
    return components


def truncated_unet_rate(settings: CheckSettings, precision: str) -> dict[str, float]:
    """Images/s of ``SDFeaturizer.truncated_unet`` at ``image_size``, ``unet_batch`` latents per call."""
    from sd4match.features import SDFeaturizer

    components = _components(settings, HALF[precision])
    featurizer = SDFeaturizer(components, device=settings.device, max_batch=settings.unet_batch)
    s, batch = settings.image_size // 8, settings.unet_batch
    latents = torch.randn(batch, 4, s, s, device=settings.device)
    context = torch.randn(batch, 77, 1024, device=settings.device)
    with torch.no_grad():
        seconds = _timed(
            lambda: featurizer.truncated_unet(latents, 50, context), settings.unet_repeats, settings.device
        )
    return {"images_per_s": batch / seconds}


def training_step(settings: CheckSettings, weights: str) -> dict[str, float]:
    """One step of ``train_pairs`` pairs in one UNet call: seconds and peak memory (GiB)."""
    from sd4match.features import SDFeaturizer
    from sd4match.loss import matching_loss
    from sd4match.prompt_learning import build_prompt_module
    from sd4match.prompts import encode_sequence

    dtype = torch.float32 if weights == "fp32+autocast" else torch.float16
    components = _components(settings, dtype)
    n, device = settings.train_pairs, settings.device
    autocast = torch.float16 if weights == "fp32+autocast" and device.startswith("cuda") else None
    featurizer = SDFeaturizer(components, device=device, autocast_dtype=autocast, max_batch=2 * n)
    prompt = build_prompt_module("single", components.text_encoder, components.tokenizer).to(device)
    optimizer = torch.optim.Adam(prompt.parameter_groups(1e-2, 1e-3))
    s = settings.image_size // 8
    latents = torch.randn(2 * n, 4, s, s, device=device)
    kps = torch.rand(n, 10, 2, device=device) * (settings.image_size - 1)
    valid = torch.ones(n, 10, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        src, trg = prompt.prompt_pair(_batch(n))
        hidden = encode_sequence(components.text_encoder, torch.cat([src, trg]))
        feats = featurizer.extract_from_latents(latents, hidden, 261, 1, generator)
        matching_loss(feats[:n], feats[n:], kps, kps, valid, settings.image_size).backward()
        optimizer.step()

    _reset_peak(device)
    try:
        seconds = _timed(step, settings.train_steps, device)
    except torch.OutOfMemoryError:
        return {"step_s": math.nan, "peak_gib": _peak_gib(device), "oom": 1.0}
    return {"step_s": seconds, "peak_gib": _peak_gib(device)}


def _batch(n: int) -> Any:
    from sd4match.prompt_learning import PromptBatch

    return PromptBatch(["cat"] * n)


def evaluation_rates(settings: CheckSettings, precision: str) -> dict[str, float]:
    """Single and CPM pairs/s with the project's evaluation functions on synthetic images (real shapes)."""
    from sd4match.bench_passes import synthetic_pairs
    from sd4match.caches import DinoCache, image_key, tensor_name
    from sd4match.evaluation import (
        ConditionalFeatures,
        ImageKey,
        MatchingSettings,
        conditional_pair_features,
        score_pair,
        sd_text_prompt_features,
    )
    from sd4match.features import SDFeaturizer
    from sd4match.prompt_learning import build_prompt_module

    device, size, ensemble = settings.device, settings.image_size, settings.ensemble
    components = _components(settings, torch.float32)
    autocast = HALF[precision] if device.startswith("cuda") else None
    featurizer = SDFeaturizer(components, device=device, autocast_dtype=autocast, max_batch=8)
    single = build_prompt_module("single", components.text_encoder, components.tokenizer).to(device).eval()
    cpm = build_prompt_module("cpm", components.text_encoder, components.tokenizer).to(device).eval()
    match = MatchingSettings(size, ("nn", "soft_argmax", "kernel_softmax"), (0.05, 0.1, 0.15))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pairs = synthetic_pairs(root, 1, settings.eval_images).head(settings.cpm_pairs)
        keys = [ImageKey(name, False, "c0") for name in sorted(set(pairs.src_image) | set(pairs.trg_image))]
        features_for = sd_text_prompt_features(featurizer, single, root, size, 50, ensemble, 0)
        per_image = _timed(lambda: features_for(keys), 1, device) / len(keys)
        feats = features_for(keys[:2])
        row = next(pairs.itertuples())
        per_pair_score = _timed(lambda: score_pair(row, feats[0], feats[1], match), 3, device)
        tokens = {}
        for key in keys:
            name = image_key(key.path, False)
            tokens[tensor_name(name, "tokens")] = torch.randn(256, 768, dtype=torch.float16)
            tokens[tensor_name(name, "global")] = torch.randn(768, dtype=torch.float16)
        dino = DinoCache(root / "dino.safetensors", {"kind": "dino"}, tokens)

        def cpm_job() -> None:
            with torch.no_grad():
                source = ConditionalFeatures(
                    cpm, featurizer, dino, root, size, 50, ensemble, 0, settings.pair_batch
                )
                for row, src, trg in conditional_pair_features(pairs, source):
                    score_pair(row, src, trg, match)

        cpm_seconds = _timed(cpm_job, 1, device)
    single_s = SPAIR_IMAGES * per_image + SPAIR_PAIRS * per_pair_score
    return {
        "single_pairs_per_s": SPAIR_PAIRS / single_s,
        "single_image_feature_s": per_image,
        "score_pair_s": per_pair_score,
        "cpm_pairs_per_s": len(pairs) / cpm_seconds,
    }


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else math.nan


def _free(device: str) -> None:
    """Release the previous measurement's models before the next one builds its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def gpu_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU smoke run, torch {torch.__version__}"


def run_checks(settings: CheckSettings) -> dict[str, dict[str, float]]:
    """Every measurement, keyed by what was measured."""
    results: dict[str, dict[str, float]] = {}
    for precision in ("fp16", "bf16"):
        results[f"truncated UNet {precision}"] = truncated_unet_rate(settings, precision)
        _free(settings.device)
    for weights in ("fp32+autocast", "fp16"):
        results[f"training step {weights}"] = training_step(settings, weights)
        _free(settings.device)
    results["evaluation fp16 autocast"] = evaluation_rates(settings, "fp16")
    return results


def markdown_rows(results: dict[str, dict[str, float]], settings: CheckSettings) -> str:
    """The BENCHMARKS.md section of one run."""
    name = gpu_name(settings.device)
    unet = " / ".join(f"{results[f'truncated UNet {p}']['images_per_s']:.1f}" for p in ("fp16", "bf16"))
    train = results["training step fp32+autocast"], results["training step fp16"]
    ev = results["evaluation fp16 autocast"]
    return "\n".join(
        [
            f"### GPU check {date.today().isoformat()}: {name}",
            "",
            f"Real SD 2-1 architecture, random weights, {settings.image_size} px "
            f"(`python bench/gpu_check.py`).",
            "",
            "| truncated UNet images/s fp16 / bf16 (batch "
            f"{settings.unet_batch}) | train step {settings.train_pairs} pairs fp32+autocast: s, peak GiB | "
            "fp16 weights: s, peak GiB | Single pairs/s (SPair ratio) | CPM pairs/s | score_pair s |",
            "|---|---|---|---|---|---|",
            f"| {unet} | {train[0]['step_s']:.2f}, {train[0]['peak_gib']:.1f} | "
            f"{train[1]['step_s']:.2f}, {train[1]['peak_gib']:.1f} | {ev['single_pairs_per_s']:.1f} | "
            f"{ev['cpm_pairs_per_s']:.2f} | {ev['score_pair_s']:.3f} |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-append", action="store_true", help="print the rows, do not touch BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: exercises the code only")
    args = parser.parse_args(argv)
    if args.smoke:
        settings = CheckSettings.smoke()
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device available; GPU check skipped (nothing measured).")
        return 0
    else:
        settings = CheckSettings()
    started = time.perf_counter()
    rows = markdown_rows(run_checks(settings), settings)
    print(rows)
    print(f"gpu_check: finished in {time.perf_counter() - started:.0f} s")
    if not args.no_append and not args.smoke:
        with open(REPO / "BENCHMARKS.md", "a") as stream:
            stream.write("\n" + rows)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
