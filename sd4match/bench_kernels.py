"""Benchmark (not a test) that chooses the GPU defaults of ``features.precision``, ``features.compile`` and
``features.channels_last``: SD feature images/s of every combination, in one run, with each combination's
largest feature deviation from the fp32 eager features (same latents, same noise).

Run on a GPU with SD 2-1: ``python -m sd4match.bench_kernels --model <sd21 folder> --image-size 768``.
A switch is worth turning on when it raises images/s clearly (> ~10 %), the deviation stays at the level of
the half precision itself (compare with the fp16/bf16 eager rows), and ``first_call_s`` (paid once per job:
compilation) is small against the job's GPU time (~14 s of UNet for a Single/Class SPair evaluation).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sd4match.bench import BenchResult, machine_description, peak_memory_mb
from sd4match.features import KernelSettings, SDFeaturizer, enable_tf32
from sd4match.models import load_stable_diffusion


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _features(
    model_dir: str | Path, kernels: KernelSettings, device: str, latents: torch.Tensor, context: torch.Tensor
) -> tuple[SDFeaturizer, torch.Tensor]:
    """A featurizer built as the evaluation builds it and its features of ``latents`` (first call: warm-up
    and, with ``compile``, compilation)."""
    components = load_stable_diffusion(model_dir, device=device, dtype=kernels.weights_dtype(device))
    featurizer = SDFeaturizer(
        components, device=device, autocast_dtype=kernels.autocast_dtype(device), kernels=kernels
    )
    hidden = context.to(device, kernels.weights_dtype(device))
    gen = torch.Generator().manual_seed(0)
    return featurizer, featurizer.extract_from_latents(latents, hidden, 50, 1, gen, max_batch=len(latents))


def bench_kernels(
    model_dir: str | Path,
    image_size: int = 768,
    batch: int = 8,
    repeats: int = 3,
    precisions: tuple[str, ...] = ("fp16", "bf16"),
    compile_backend: str = "inductor",
    device: str = "cuda",
    compile_options: tuple[bool, ...] = (False, True),
) -> list[BenchResult]:
    """One row per (precision, compile, channels_last): images/s of the truncated UNet on ``batch`` latents
    and the max |feature - fp32 eager feature| (features are unit vectors)."""
    enable_tf32(device)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, image_size // 8, image_size // 8, generator=gen)
    probe = load_stable_diffusion(model_dir)
    context = torch.randn(1, 77, probe.unet.config.cross_attention_dim, generator=gen)
    del probe
    _, reference = _features(model_dir, KernelSettings("fp32"), device, latents, context)
    rows = []
    for precision, compiled, channels_last in itertools.product(precisions, compile_options, (False, True)):
        kernels = KernelSettings(precision, compiled, channels_last, compile_backend)
        _sync(device)
        start = time.perf_counter()
        featurizer, feats = _features(model_dir, kernels, device, latents, context)
        _sync(device)
        first_call_s = time.perf_counter() - start  # loading + warm-up (+ compilation), paid once per job
        hidden = context.to(device, kernels.weights_dtype(device))
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            featurizer.extract_from_latents(latents, hidden, 50, 1, max_batch=batch)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        metrics = {
            "images_per_s": batch / seconds,
            "first_call_s": first_call_s,
            "max_abs_dev_from_fp32": float((feats - reference).abs().max()),
            "peak_memory_mib": peak_memory_mb(device),
        }
        settings = {**asdict(kernels), "image_size": image_size, "batch": batch, "repeats": repeats}
        rows.append(BenchResult("kernels", device, settings, metrics, machine_description(device)))
        del featurizer
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line; prints one JSON line per combination (and appends them to --out)."""
    parser = argparse.ArgumentParser(prog="python -m sd4match.bench_kernels", description=__doc__)
    parser.add_argument("--model", required=True, help="local folder in the Hugging Face SD layout")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", choices=["fp16", "bf16", "fp32"], default=["fp16", "bf16"])
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--skip-compile", action="store_true", help="only the channels_last switch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="append the JSON results, one per line, to this file")
    args = parser.parse_args(argv)
    rows = bench_kernels(
        args.model,
        args.image_size,
        args.batch,
        args.repeats,
        tuple(args.precisions),
        args.compile_backend,
        args.device,
        (False,) if args.skip_compile else (False, True),
    )
    lines = [json.dumps(asdict(row), sort_keys=True) for row in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as stream:
            stream.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
