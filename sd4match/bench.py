"""Benchmarks (not tests): UNet passes, images/s and peak memory of SD feature extraction; the projection.

`sd4match-bench truncation` times the truncated UNet (stopped after up_blocks[1]) against the full UNet on
the real SD 2-1 architecture (random weights, reduced resolution); `sd4match-bench features` times the
feature extractor on a model folder (a tiny demo model here, SD 2-1 on a GPU machine);
`sd4match-bench projection` projects the configured DAG's GPU FLOPs, H100-hours and CPU time
(sd4match/projection.py); `sd4match-bench passes` counts network passes per job on the tiny world.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sd4match.architectures import SD21_UNET
from sd4match.features import SDFeaturizer, stop_after

# UNet2DConditionModel config of Stable Diffusion 2-1 (unet/config.json of the SD 2-1 repo).
SD21_UNET_CONFIG: dict[str, Any] = SD21_UNET


@dataclass
class BenchResult:
    """One benchmark measurement with the machine it ran on."""

    name: str
    device: str
    settings: dict[str, Any]
    metrics: dict[str, float]
    machine: str


def machine_description(device: str) -> str:
    """CPU model / core count, or the GPU name, for BENCHMARKS.md."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_truncation(
    image_size: int = 256, batch: int = 1, repeats: int = 3, device: str = "cpu"
) -> BenchResult:
    """Full vs truncated (after up_blocks[1]) UNet on the SD 2-1 architecture, random weights, in one run."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_UNET_CONFIG).to(device).eval().requires_grad_(False)
    latent = torch.randn(batch, 4, image_size // 8, image_size // 8, device=device)
    context = torch.randn(batch, 77, 1024, device=device)
    t = torch.tensor(261, device=device)

    def full() -> None:
        with torch.no_grad():
            unet(latent, t, encoder_hidden_states=context)

    def truncated() -> None:
        with torch.no_grad(), stop_after(unet.up_blocks[1]):
            try:
                unet(latent, t, encoder_hidden_states=context)
            except Exception as exc:  # the hook's _StopForward
                if type(exc).__name__ != "_StopForward":
                    raise

    full_s = _timed(full, repeats, device)
    truncated_s = _timed(truncated, repeats, device)
    metrics = {
        "full_unet_s": full_s,
        "truncated_unet_s": truncated_s,
        "speedup_full_over_truncated": full_s / truncated_s,
        "parameters_millions": sum(p.numel() for p in unet.parameters()) / 1e6,
        "peak_memory_mib": peak_memory_mb(device),
    }
    settings = {
        "image_size": image_size,
        "batch": batch,
        "repeats": repeats,
        "weights": "random (SD 2-1 config)",
    }
    return BenchResult("truncation_sd21", device, settings, metrics, machine_description(device))


def bench_features(
    model_dir: str | Path,
    image_size: int,
    n_images: int = 4,
    ensemble: int = 8,
    max_batch: int = 8,
    device: str = "cpu",
    precision: str = "fp32",
) -> BenchResult:
    """Feature extraction throughput of SDFeaturizer on a model folder: UNet passes, images/s, peak memory."""
    from sd4match.models import load_stable_diffusion

    components = load_stable_diffusion(model_dir, device=device)
    autocast = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    featurizer = SDFeaturizer(components, device=device, autocast_dtype=autocast, max_batch=max_batch)
    dim = components.text_encoder.config.hidden_size
    context = torch.zeros(1, 77, dim, device=device)
    pixels = torch.rand(1, 3, image_size, image_size) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        featurizer(pixels, context, 50, ensemble, generator)  # warm-up
        featurizer.unet_passes = featurizer.unet_samples = 0
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_images):
            features = featurizer(pixels, context, 50, ensemble, generator)
        _sync(device)
        elapsed = time.perf_counter() - start
    metrics = {
        "images_per_s": n_images / elapsed,
        "unet_passes_per_image": featurizer.unet_passes / n_images,
        "unet_samples_per_image": featurizer.unet_samples / n_images,
        "feature_channels": float(features.shape[1]),
        "feature_grid": float(features.shape[-1]),
        "peak_memory_mib": peak_memory_mb(device),
    }
    settings = {
        "model_dir": str(model_dir),
        "image_size": image_size,
        "ensemble": ensemble,
        "max_batch": max_batch,
        "precision": precision,
        "n_images": n_images,
    }
    return BenchResult("features", device, settings, metrics, machine_description(device))


SPAIR_TEST_PAIRS, SPAIR_TEST_IMAGES = 12_234, 481  # protocol.md: 481 distinct images in 12,234 test pairs


def _prompt_module(variant: str, components: Any, device: str) -> Any:
    """A freshly initialised learned prompt of ``variant`` (single or cpm) for timing."""
    from sd4match.prompt_learning import build_prompt_module

    return build_prompt_module(variant, components.text_encoder, components.tokenizer).to(device)


def _random_batch(module: Any, n_pairs: int, device: str) -> Any:
    """PromptBatch with random DINOv2 tokens of the CPM's configured shape (timing only)."""
    from sd4match.prompt_learning import PromptBatch

    if not module.needs_dino:
        return PromptBatch(categories=["cat"] * n_pairs)
    cfg = module.config
    tokens = lambda: torch.randn(n_pairs, cfg.n_patches, cfg.dino_dim, device=device)  # noqa: E731
    glob = lambda: torch.randn(n_pairs, cfg.dino_dim, device=device)  # noqa: E731
    return PromptBatch(["cat"] * n_pairs, tokens(), tokens(), glob(), glob())


def bench_training(
    model_dir: str | Path,
    image_size: int,
    variant: str = "single",
    pairs_per_step: int = 3,
    n_kps: int = 10,
    steps: int = 3,
    device: str = "cpu",
) -> BenchResult:
    """One optimiser step of prompt tuning (t=261, one draw, gradients through the truncated UNet)."""
    from sd4match.loss import matching_loss
    from sd4match.models import load_stable_diffusion
    from sd4match.prompts import encode_sequence

    components = load_stable_diffusion(model_dir, device=device)
    featurizer = SDFeaturizer(components, device=device, max_batch=2 * pairs_per_step)
    module = _prompt_module(variant, components, device)
    optimizer = torch.optim.Adam(module.parameter_groups(1e-2, 1e-3))
    generator = torch.Generator().manual_seed(0)
    s = image_size // 8
    latents = torch.randn(2 * pairs_per_step, 4, s, s, generator=generator)
    kps = torch.rand(pairs_per_step, n_kps, 2, generator=generator) * (image_size - 1)
    valid = torch.ones(pairs_per_step, n_kps, dtype=torch.bool)
    batch = _random_batch(module, pairs_per_step, device)

    def step() -> None:
        optimizer.zero_grad()
        src, trg = module.prompt_pair(batch)
        hidden = encode_sequence(components.text_encoder, torch.cat([src, trg]))
        feats = featurizer.extract_from_latents(latents, hidden, 261, 1, generator)
        loss = matching_loss(feats[:pairs_per_step], feats[pairs_per_step:], kps, kps, valid, image_size)
        loss.backward()
        optimizer.step()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step_s = _timed(step, steps, device)
    metrics = {
        "step_s": step_s,
        "s_per_pair": step_s / pairs_per_step,
        "peak_memory_mib": peak_memory_mb(device),
        "peak_memory_mib_per_pair": peak_memory_mb(device) / pairs_per_step,
    }
    settings = {
        "model_dir": str(model_dir),
        "image_size": image_size,
        "variant": variant,
        "pairs_per_step": pairs_per_step,
        "n_kps": n_kps,
        "steps": steps,
    }
    return BenchResult("training_step", device, settings, metrics, machine_description(device))


def bench_evaluation(
    model_dir: str | Path,
    image_size: int,
    ensemble: int = 8,
    max_batch: int = 8,
    pair_batch: int = 4,
    repeats: int = 2,
    device: str = "cpu",
) -> BenchResult:
    """Evaluation throughput: Single (features once per distinct image) vs CPM (features per pair batch),
    with the UNet passes each needs for the whole SPair-71k test set (481 images, 12,234 pairs)."""
    from sd4match.models import load_stable_diffusion
    from sd4match.prompts import encode_sequence

    components = load_stable_diffusion(model_dir, device=device)
    featurizer = SDFeaturizer(components, device=device, max_batch=max_batch)
    generator = torch.Generator().manual_seed(0)
    s = image_size // 8
    single, cpm = _prompt_module("single", components, device), _prompt_module("cpm", components, device)

    def single_image() -> None:
        with torch.no_grad():
            hidden = encode_sequence(components.text_encoder, single.prompt_for_images(["cat"]))
            featurizer.extract_from_latents(torch.randn(1, 4, s, s), hidden, 50, ensemble, generator)

    def cpm_batch() -> None:
        with torch.no_grad():
            src, trg = cpm.prompt_pair(_random_batch(cpm, pair_batch, device))
            hidden = encode_sequence(components.text_encoder, torch.cat([src, trg]))
            featurizer.extract_from_latents(
                torch.randn(2 * pair_batch, 4, s, s), hidden, 50, ensemble, generator
            )

    image_s = _timed(single_image, repeats, device)
    batch_s = _timed(cpm_batch, repeats, device)
    single_pairs_per_s = SPAIR_TEST_PAIRS / (SPAIR_TEST_IMAGES * image_s)
    calls_per_image = -(-ensemble // max_batch)
    calls_per_batch = -(-2 * pair_batch * ensemble // max_batch)
    metrics = {
        "single_pairs_per_s_spair_test": single_pairs_per_s,
        "cpm_pairs_per_s": pair_batch / batch_s,
        "single_unet_passes_spair_test": float(SPAIR_TEST_IMAGES * calls_per_image),
        "cpm_unet_passes_spair_test": float(-(-SPAIR_TEST_PAIRS // pair_batch) * calls_per_batch),
        "peak_memory_mib": peak_memory_mb(device),
    }
    settings = {
        "model_dir": str(model_dir),
        "image_size": image_size,
        "ensemble": ensemble,
        "max_batch": max_batch,
        "pair_batch": pair_batch,
        "repeats": repeats,
    }
    return BenchResult("evaluation", device, settings, metrics, machine_description(device))


def bench_projection(
    configfiles: list[str],
    workdir: str | Path = ".",
    presets: tuple[str, ...] = ("before", "current"),
    mfu: float = 0.40,
    peak_tflops: float = 989.0,
    cpu: Any = None,
    meter: Any = None,
) -> tuple[BenchResult, dict[str, str]]:
    """Projection of the configured DAG under each code-path preset: GPU FLOPs and H100-hours at ``mfu`` of
    ``peak_tflops``, CPU hours while a GPU is held; returns the result and each preset's markdown."""
    from sd4match.flops import FlopMeter
    from sd4match.projection import dag_jobs, markdown, project
    from sd4match.workload import CODE_PRESETS, DatasetCounts, measured_cpu_costs

    config, jobs = dag_jobs(configfiles, workdir)
    counts = DatasetCounts(Path(workdir) / config["results_dir"] / "pairs")
    cpu = measured_cpu_costs() if cpu is None else cpu
    meter = FlopMeter() if meter is None else meter
    metrics: dict[str, float] = {"gpu_jobs": float(sum(1 for j in jobs if j.gpu > 0)), "dag_jobs": len(jobs)}
    tables = {}
    for name in presets:
        result = project(config, jobs, counts, cpu, CODE_PRESETS[name], meter, mfu, peak_tflops * 1e12)
        tables[name] = markdown(result, per_job=True)
        metrics |= {
            f"{name}_gpu_eflop": result.total_flops / 1e18,
            f"{name}_h100_hours": result.total_gpu_hours,
            f"{name}_cpu_hours_while_held": result.total_cpu_hours,
            f"{name}_cpu_fraction": result.cpu_fraction,
            f"{name}_unprojected_jobs": float(len(result.unprojected)),
        }
    settings = {
        "configfiles": list(configfiles),
        "presets": list(presets),
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "counts": counts.sources,
        "cpu_costs_measured_on": cpu.machine,
    }
    return BenchResult("projection", "meta", settings, metrics, machine_description("cpu")), tables


def bench_passes(spair_pairs: int = SPAIR_TEST_PAIRS, spair_images: int = SPAIR_TEST_IMAGES) -> BenchResult:
    """Network passes counted in one run on the tiny world: SD+DINO per pair vs per image, VAE passes of a
    Single and a CPM evaluation job encoding its images (before) vs reading the test latent cache (after);
    scaled to SPair-71k test by the measured per-pair / per-image ratios."""
    from sd4match.bench_passes import sd_dino_passes, vae_passes
    from sd4match.flops import FlopMeter

    sd_dino, vae = sd_dino_passes(), vae_passes()
    metrics: dict[str, float] = {}
    for network in sd_dino["before"]:
        before, after = sd_dino["before"][network], sd_dino["after"][network]
        metrics[f"sd_dino_{network}_per_pair_before"] = before / sd_dino["pairs"]
        metrics[f"sd_dino_{network}_per_image_after"] = after / sd_dino["images"]
        metrics[f"sd_dino_{network}_spair_test_before"] = before / sd_dino["pairs"] * spair_pairs
        metrics[f"sd_dino_{network}_spair_test_after"] = after / sd_dino["images"] * spair_images
        metrics[f"sd_dino_{network}_ratio_before_over_after"] = before / after
    vae_tflop = FlopMeter().vae_encode("sd21", 768) / 1e12
    for job in ("single", "cpm"):
        for when, counted in (("before", vae[job]), ("after", vae[f"{job}_cached"])):
            per_image = counted["vae"] / vae["images"]
            metrics[f"{job}_vae_passes_per_distinct_image_{when}"] = per_image
            metrics[f"{job}_vae_passes_spair_test_{when}"] = per_image * spair_images
            metrics[f"{job}_vae_pflop_spair_test_{when}"] = per_image * spair_images * vae_tflop / 1e3
    metrics["test_latent_cache_vae_passes_per_distinct_image"] = vae["cache"]["vae"] / vae["images"]
    metrics["vae_encoder_tflop_768px"] = vae_tflop
    settings = {
        "tiny_world_pairs": sd_dino["pairs"],
        "tiny_world_images": sd_dino["images"],
        "sd_dino_identical_per_pair_tables": sd_dino["identical_per_pair_tables"],
        "cached_latents_identical_per_pair_tables": vae["identical_per_pair_tables"],
        "counted": {"sd_dino": sd_dino, "vae": vae},
    }
    return BenchResult("passes", "cpu", settings, metrics, machine_description("cpu"))


def main(argv: list[str] | None = None) -> int:
    """Command line: ``sd4match-bench {truncation,features} [...]``; prints JSON (and appends to --out)."""
    parser = argparse.ArgumentParser(prog="sd4match-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    trunc = sub.add_parser("truncation", help="full vs truncated UNet on the SD 2-1 architecture")
    trunc.add_argument("--image-size", type=int, default=256)
    trunc.add_argument("--batch", type=int, default=1)
    trunc.add_argument("--repeats", type=int, default=3)
    feats = sub.add_parser("features", help="feature extraction throughput on a model folder")
    feats.add_argument("--model", required=True, help="local folder in the Hugging Face SD layout")
    feats.add_argument("--image-size", type=int, default=768)
    feats.add_argument("--images", type=int, default=4)
    feats.add_argument("--ensemble", type=int, default=8)
    feats.add_argument("--max-batch", type=int, default=8)
    feats.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp32")
    train = sub.add_parser("training", help="one prompt-tuning step: time and peak memory per pair")
    train.add_argument("--model", required=True)
    train.add_argument("--image-size", type=int, default=768)
    train.add_argument("--variant", choices=["single", "cpm"], default="single")
    train.add_argument("--pairs", type=int, default=3)
    train.add_argument("--steps", type=int, default=3)
    evals = sub.add_parser(
        "evaluation", help="evaluation pairs/s, Single vs CPM, and UNet passes for SPair test"
    )
    evals.add_argument("--model", required=True)
    evals.add_argument("--image-size", type=int, default=768)
    evals.add_argument("--ensemble", type=int, default=8)
    evals.add_argument("--max-batch", type=int, default=8)
    evals.add_argument("--pair-batch", type=int, default=4)
    for p in (trunc, feats, train, evals):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    proj = sub.add_parser("projection", help="GPU FLOPs / H100-hours and CPU time of the configured DAG")
    proj.add_argument("--configfile", action="append", help="config file(s), in order (default config.yaml)")
    proj.add_argument("--workdir", default=".", help="the workflow's folder (holds the Snakefile)")
    proj.add_argument("--code", action="append", choices=["before", "partial", "current"])
    proj.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation (default 0.40)")
    proj.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak (H100 SXM: 989)")
    passes = sub.add_parser("passes", help="network passes of SD+DINO (per pair vs per image) and the VAE")
    for p in (trunc, feats, train, evals, proj, passes):
        p.add_argument("--out", type=Path, help="append the JSON result as one line to this file")
    args = parser.parse_args(argv)
    if args.command == "projection":
        result, tables = bench_projection(
            args.configfile or ["config.yaml"],
            args.workdir,
            tuple(args.code or ["before", "current"]),
            args.mfu,
            args.peak_tflops,
        )
        for name, table in tables.items():
            print(f"## Projection, code paths: {name}\n\n{table}\n")
    elif args.command == "passes":
        result = bench_passes()
    elif args.command == "truncation":
        result = bench_truncation(args.image_size, args.batch, args.repeats, args.device)
    elif args.command == "features":
        result = bench_features(
            args.model,
            args.image_size,
            args.images,
            args.ensemble,
            args.max_batch,
            args.device,
            args.precision,
        )
    elif args.command == "training":
        result = bench_training(
            args.model, args.image_size, args.variant, args.pairs, steps=args.steps, device=args.device
        )
    else:
        result = bench_evaluation(
            args.model, args.image_size, args.ensemble, args.max_batch, args.pair_batch, device=args.device
        )
    line = json.dumps(asdict(result), sort_keys=True)
    print(line)
    if args.out:
        with open(args.out, "a") as stream:
            stream.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
