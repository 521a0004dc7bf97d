"""The benchmark entry reports passes exactly (timings are reported, never asserted); the projection's job
list, counts and work model, checked against the DAG, the official lists and the code's own network calls."""

import dataclasses
import json

import pytest
import torch

from sd4match import projection as P
from sd4match import workload as W
from sd4match.bench import SD21_UNET_CONFIG, bench_features, main
from sd4match.flops import FlopMeter, svd_flops
from sd4match.tiny_models import build_tiny_stable_diffusion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("bench") / "sd21", seed=0)


@pytest.mark.parametrize(("ensemble", "max_batch", "passes"), [(8, 8, 1), (8, 4, 2), (3, 2, 2)])
def test_unet_passes_per_image(tiny_sd, ensemble, max_batch, passes):
    result = bench_features(tiny_sd, image_size=64, n_images=2, ensemble=ensemble, max_batch=max_batch)
    assert result.metrics["unet_passes_per_image"] == passes
    assert result.metrics["unet_samples_per_image"] == ensemble
    assert result.metrics["feature_grid"] == 64 / 16
    assert result.metrics["images_per_s"] > 0


def test_cli_appends_json(tiny_sd, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert (
        main(["features", "--model", str(tiny_sd), "--image-size", "64", "--images", "1", "--out", str(out)])
        == 0
    )
    record = json.loads(out.read_text().splitlines()[0])
    assert record["name"] == "features" and record["settings"]["image_size"] == 64
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_sd21_config_is_the_real_architecture():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(
        {
            **SD21_UNET_CONFIG,
            "block_out_channels": [32, 32, 64, 64],
            "attention_head_dim": [2, 2, 4, 4],
            "norm_num_groups": 8,
            "cross_attention_dim": 16,
        }
    )
    assert [type(b).__name__ for b in unet.up_blocks] == SD21_UNET_CONFIG["up_block_types"]


def test_evaluation_bench_counts_unet_passes_for_spair_test(tiny_sd):
    from sd4match.bench import bench_evaluation

    result = bench_evaluation(tiny_sd, image_size=64, ensemble=8, max_batch=8, pair_batch=4, repeats=1)
    assert result.metrics["single_unet_passes_spair_test"] == 481  # one call of 8 draws per distinct image
    assert (
        result.metrics["cpm_unet_passes_spair_test"] == 3059 * 8
    )  # ceil(12234 / 4) batches x 64 latents / 8
    assert result.metrics["cpm_pairs_per_s"] > 0 and result.metrics["single_pairs_per_s_spair_test"] > 0


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_training_bench_reports_per_pair_cost(tiny_sd, variant):
    from sd4match.bench import bench_training

    result = bench_training(tiny_sd, image_size=64, variant=variant, pairs_per_step=2, steps=1)
    metrics = result.metrics
    assert metrics["s_per_pair"] == pytest.approx(metrics["step_s"] / 2)
    assert metrics["peak_memory_mib_per_pair"] == pytest.approx(metrics["peak_memory_mib"] / 2)


# ------------------------------------------------------------------------------------------ projection


class UnitMeter:
    """Every network call costs 1 FLOP per sample: a job's FLOPs are then its passes (fast, no meta runs)."""

    def __getattr__(self, name):
        if name == "decoder_map_shapes":
            return lambda arch, size, blocks: [(1280, size // 64, size // 64), (1280, size // 32, size // 32),
                                               (640, size // 16, size // 16)]  # fmt: skip
        return lambda *args, **kwargs: 1


FREE_CPU = W.CpuCosts(lambda channels, grid, methods: 0.5, lambda size: 0.25, "fixed")


def _context(config, code=None, counts=None):
    code = W.CodePaths() if code is None else code
    return W.Context(config, counts or W.DatasetCounts(None), UnitMeter(), FREE_CPU, code)


def test_published_counts_are_the_official_lists(shared_data):
    import csv

    def spair(split):
        pairs = (shared_data / f"spair-layout/Layout/large/{split}.txt").read_text().split()
        keys = {(name.split(":")[1], image) for name in pairs for image in name.split(":")[0].split("-")[1:]}
        return pairs, keys

    for split in ("trn", "val", "test"):
        pairs, keys = spair(split)
        assert W.PUBLISHED_COUNTS["spair", split] == W.SplitCounts(len(pairs), len(keys), 18)
    assert W.PUBLISHED_TRNVAL_IMAGES["spair"] == len(spair("trn")[1] | spair("val")[1])
    union = set()
    for split, name in (("trn", "train"), ("val", "val"), ("test", "test")):
        rows = list(csv.DictReader(open(shared_data / f"pf-pascal-pairs/{name}_pairs.csv")))
        keys = {(r[side], r.get("flip", "0")) for r in rows for side in ("source_image", "target_image")}
        assert W.PUBLISHED_COUNTS["pfpascal", split] == W.SplitCounts(len(rows), len(keys), 20)
        union |= keys if split != "test" else set()
    assert W.PUBLISHED_TRNVAL_IMAGES["pfpascal"] == len(union)
    willow = list(csv.reader(open(shared_data / "pf-willow/test_pairs.csv")))[1:]
    assert W.PUBLISHED_COUNTS["pfwillow", "test"] == W.SplitCounts(
        900, len({r[0] for r in willow} | {r[1] for r in willow}), 10
    )


def test_counts_come_from_the_pairs_tables_when_they_exist(tmp_path):
    from sd4match.bench_passes import synthetic_pairs
    from sd4match.datasets import write_pairs_table

    table = synthetic_pairs(tmp_path, categories=2, images_per_category=3)
    write_pairs_table(table, tmp_path / "spair_test.parquet")
    counts = W.DatasetCounts(tmp_path)
    assert counts.split("spair", "test") == W.SplitCounts(12, 6, 2)
    assert counts.split("spair", "test", max_pairs=5) == W.SplitCounts(5, 3, 1)  # c0_0 -> c0_1, c0_2, ...
    assert counts.split("pfwillow", "test") == W.SplitCounts(900, 100, 10)
    assert counts.sources == {"spair_test": "pairs table", "pfwillow_test": "published"}
    assert W.DatasetCounts(None).split("spair", "test", max_pairs=10) == W.SplitCounts(10, 20, 18)


@pytest.fixture(scope="module")
def paper_dag():
    return P.dag_jobs(["config.yaml"])


def test_the_job_list_is_the_dag_of_the_config(paper_dag):
    config, jobs = paper_dag
    gpu_rules = {}
    for job in jobs:
        if job.gpu:
            gpu_rules[job.rule] = gpu_rules.get(job.rule, 0) + 1
    assert gpu_rules == {
        # dift, dino, dinov2, sddino on 3 sets; dift_empty and the 3 SD+DINO* rows on SPair; 10 DIFT timesteps
        # (Fig. 3b's t=261 point is the main DIFT job), 10 SD4Match ones (its t=50 point is evaluate_prompt);
        # issue 10: dift_orig (DIFT's own protocol) and sddino_squashed (the 768 frame) on 3 sets
        "evaluate_zero_shot": 4 * 3 + 1 + 3 + 10 + 2 * 3,
        "evaluate_prompt": 18,
        "evaluate_prompt_timestep": 10,
        "train_prompt": 10,
        "latent_cache": 2,
        "test_latent_cache": 3,  # the three test splits under SD 2-1 (SD4Match and DIFT read them)
        "dino_cache": 5,
        "fig4": 1,
        "fig5": 1,
        "qualitative": 1,
    }
    methods = sorted(j.wildcards["method"] for j in jobs if j.rule == "evaluate_zero_shot")
    assert methods.count("sddino") == 3 and "sddino_star_empty" in methods and "dift_t500" in methods
    sddino = next(j for j in jobs if j.label == "evaluate_zero_shot[dataset=spair,method=sddino]")
    assert sddino.params["method"]["kind"] == "sd_dino" and sddino.params["method"]["image_size"] == 960
    demo_config, demo_jobs = P.dag_jobs(["config.yaml", "profiles/demo/world.yaml"])
    assert demo_config["image_size"] == 128
    assert [j.wildcards["t"] for j in demo_jobs if j.rule == "evaluate_prompt_timestep"] == ["261"]
    # the demo adds its world's rules and sweeps two timesteps (its t=50 point reused)
    assert len(demo_jobs) != len(jobs)


def test_sd_dino_passes_per_spair_job_before_and_after(paper_dag):
    config, jobs = paper_dag
    ctx_before = _context(config, W.CODE_PRESETS["before"])
    ctx_after = _context(config, W.CODE_PRESETS["current"])
    job = next(j for j in jobs if j.label == "evaluate_zero_shot[dataset=spair,method=sddino]")
    before, after = W.job_work(job, ctx_before), W.job_work(job, ctx_after)
    assert before.passes == {
        "unet": 24_468,
        "vae": 24_468,
        "clip": 24_468,
        "dinov2": 24_468,
        "co-PCA": 12_234,
    }
    assert after.passes == {"unet": 481, "vae": 481, "clip": 481, "dinov2": 481, "co-PCA": 12_234}
    assert before.cpu_s == {"load images": 24_468 * 0.25, "score pairs": 12_234 * 0.5}
    assert after.cpu_s == {"load images": 481 * 0.25}  # pairs are matched on the device


def test_evaluation_and_training_work_of_the_paper(paper_dag):
    config, jobs = paper_dag
    ctx = _context(config)
    by_label = {j.label: j for j in jobs}
    single = W.job_work(by_label["evaluate_prompt[dataset=spair,seed=0,trainset=spair,variant=single]"], ctx)
    # one Single prompt, encoded once; the latents come from the test split's cache: no VAE, no image loaded
    assert single.passes == {"unet": 481 * 8, "text": 1} and single.cpu_s == {}
    cpm = W.job_work(by_label["evaluate_prompt[dataset=spair,seed=0,trainset=spair,variant=cpm]"], ctx)
    # the pair's one CPM prompt conditions both images: encoded once per pair
    assert cpm.passes == {"unet": 12_234 * 2 * 8, "text": 12_234, "cpm prompt": 12_234}
    # DIFT's own protocol: a VAE sample per ensemble copy, encoded in the job; one prompt per category (18)
    orig = W.job_work(by_label["evaluate_zero_shot[dataset=spair,method=dift_orig]"], ctx)
    assert orig.passes == {"unet": 481 * 8, "vae": 481 * 8, "text": 18}
    cache = W.job_work(by_label["test_latent_cache[dataset=spair,model=sd21]"], ctx)
    assert cache.passes == {"vae": 481} and cache.cpu_s == {"load images": 481 * 0.25}
    partial = _context(config, W.CODE_PRESETS["partial"])  # each evaluation job encoded its own images
    single_before = W.job_work(
        by_label["evaluate_prompt[dataset=spair,seed=0,trainset=spair,variant=single]"], partial
    )
    assert single_before.passes["vae"] == 481 and single_before.cpu_s == {"load images": 481 * 0.25}
    label = "train_prompt[seed=0,trainset=spair,variant=single]"
    train = W.job_work(by_label[label], ctx)
    # per_device_batch auto on an 80 GB H100: the 9 pairs of a step in one call (training_memory); one Single
    # prompt per call; validation every ceil(53,340 / 9) = 5,927 steps: 5 + the last, matched on the device
    assert train.passes["train micro-batches"] == 30_000
    assert train.passes["unet"] == 30_000 * 18 + 6 * 322 and train.passes["text"] == 30_000 * 1 + 6 * 1
    assert train.cpu_s == {}
    before = W.job_work(by_label[label], partial)  # 3 micro-batches of 3 pairs, a prompt per image
    assert before.passes["train micro-batches"] == 90_000
    assert before.passes["unet"] == 90_000 * 6 + 6 * 322 and before.passes["text"] == 90_000 * 6 + 6 * 322
    assert before.cpu_s == {"score pairs": 6 * 5_384 * 0.5}
    # batch_semantics authors_code (rank 0's copy of the authors' run): one micro-batch of 3 pairs per step
    job = by_label[label]
    settings = {**job.params["settings"], "batch_semantics": "authors_code", "per_device_batch": 3}
    authors = W.job_work(dataclasses.replace(job, params={**job.params, "settings": settings}), ctx)
    assert authors.passes["train micro-batches"] == 30_000 and authors.passes["unet"] == 30_000 * 6 + 6 * 322
    fig4 = W.job_work(by_label["fig4"], ctx)
    assert fig4.passes == {"unet (full)": 8 * 2 * 50 * 2, "vae decoder": 16, "text": 9}
    assert W.validations(30_000, 5_927) == 6 and W.validations(4, 2) == 2


def test_projection_totals_at_the_stated_mfu(paper_dag):
    config, jobs = paper_dag
    vit = [j for j in jobs if j.label == "evaluate_zero_shot[dataset=pfwillow,method=dinov2]"]
    result = P.project(
        config, vit, W.DatasetCounts(None), FREE_CPU, meter=UnitMeter(), mfu=0.5, peak_flops=2.0
    )
    assert result.total_flops == 100  # 100 images through DINOv2 at 1 FLOP each
    assert result.total_gpu_hours == pytest.approx(100 / (0.5 * 2.0) / 3600)
    assert result.total_cpu_hours == pytest.approx(100 * 0.25 / 3600)  # pairs matched on the device
    before = P.project(
        config, vit, W.DatasetCounts(None), FREE_CPU, meter=UnitMeter(), code=W.CODE_PRESETS["before"]
    )
    assert before.total_cpu_hours == pytest.approx((100 * 0.25 + 900 * 0.5) / 3600)
    assert result.cpu_fraction == pytest.approx(result.total_cpu_hours / result.total_gpu_hours)
    assert "| evaluate_zero_shot | 1 |" in P.markdown(result)
    with pytest.raises(ValueError, match="mfu must be in"):
        P.project(config, vit, W.DatasetCounts(None), FREE_CPU, meter=UnitMeter(), mfu=0)
    unknown = [W.DagJob("mystery", {}, {}, gpu=1)]
    with pytest.raises(ValueError, match="GPU rule 'mystery' has no work model"):
        P.project(config, unknown, W.DatasetCounts(None), FREE_CPU, meter=UnitMeter())


# ------------------------------------------------------------------- the work model follows the code


class _FixedCounts(W.DatasetCounts):
    """The same counts for every split."""

    def __init__(self, counts):
        super().__init__(None)
        self.counts = counts

    def split(self, dataset, split, max_pairs=None):
        return self.counts


def test_work_model_counts_what_the_evaluation_code_runs():
    from sd4match.bench_passes import sd_dino_passes, vae_passes

    vae = vae_passes(categories=2, images_per_category=3, ensemble=2, pair_batch=4)
    counts = W.SplitCounts(vae["pairs"], vae["images"], 2)
    matching = {"matching": {"methods": ["nn"]}}
    assert vae["identical_per_pair_tables"]  # the cached latents are the job's own VAE samples
    for code, suffix in ((W.CODE_PRESETS["partial"], ""), (W.CODE_PRESETS["current"], "_cached")):
        single, cpm = W.JobWork(), W.JobWork()
        W.per_image_sd_work(_context(matching, code), single, "sd21", 64, counts, 2, per_category=False)
        W.cpm_pair_work(_context(matching, code), cpm, "sd21", 64, counts, 2, None)
        assert vae[f"single{suffix}"] == {k: single.passes.get(k, 0) for k in ("vae", "unet", "text")}
        assert vae[f"cpm{suffix}"] == {k: cpm.passes.get(k, 0) for k in ("vae", "unet", "text")}
    cache = W.test_latent_cache_work(
        W.DagJob("test_latent_cache", {"dataset": "spair", "model": "sd21"}, {"image_size": 64}, gpu=1),
        _context(matching | {"models": {"sd21": {"id": "x"}}}, counts=_FixedCounts(counts)),
    )
    assert vae["cache"]["vae"] == cache.passes["vae"] == vae["images"]  # once per distinct image
    sd_dino = sd_dino_passes(categories=2, images_per_category=3)
    assert sd_dino["identical_per_pair_tables"]
    job = W.DagJob(
        "evaluate_zero_shot",
        {"dataset": "spair", "method": "sddino"},
        {
            "method": {
                "kind": "sd_dino",
                "model": "sd15",
                "dino_model": "dinov2",
                "prompt": "implicit",
                "image_size": 64,
                "dino_image_size": 112,
                "ensemble": 1,
            }
        },  # fmt: skip
        gpu=1,
    )
    config = {
        "models": {n: {"id": n} for n in ("sd15", "dinov2", "clip_vision")},
        "implicit_captioner": {"clip_model": "clip_vision"},
        "matching": {"methods": ["nn"]},
        "evaluation": {"max_pairs": None},
    }
    table = W.SplitCounts(sd_dino["pairs"], sd_dino["images"], 2)
    for code, seen in (
        (W.CODE_PRESETS["before"], sd_dino["before"]),
        (W.CODE_PRESETS["current"], sd_dino["after"]),
    ):
        work = W.JobWork()
        W.sd_dino_work(job, _context(config, code), work, table)
        assert {"unet": work.passes["unet"], "vae": work.passes["vae"], "clip": work.passes["clip"],
                "dinov2": work.passes["dinov2"]} == seen  # fmt: skip


# --------------------------------------------------------------------------------------- FLOP meter


def test_text_encoder_flops_are_the_analytic_count():
    layers, width, tokens = 23, 1024, 77  # SD 2-1's text encoder
    per_layer = 24 * tokens * width**2 + 4 * tokens**2 * width  # q, k, v, o, 4x MLP; QK^T and AV
    assert FlopMeter().text("sd21") == layers * per_layer


def test_svd_flops_and_the_co_pca_unit():
    assert svd_flops((7200, 640)) == 6 * 7200 * 640**2 + 20 * 640**3
    assert svd_flops((3, 640, 7200)) == 3 * svd_flops((7200, 640))
    meter = FlopMeter()
    assert meter.decoder_map_shapes("sd15", 960, (0, 1, 2)) == [(1280, 15, 15), (1280, 30, 30), (640, 60, 60)]
    svds = svd_flops((450, 1280)) + svd_flops((1800, 1280)) + svd_flops((7200, 640))
    assert meter.co_pca("sd15", 960, (0, 1, 2), (256, 256, 256)) > svds  # plus the projections


def test_training_micro_batch_counts_forward_and_backward():
    meter = FlopMeter()
    forward = meter.unet_truncated("sd21", 256)
    chunk = meter.train_chunk("sd21", 256, "single", None, pairs=1)
    deduplicated = meter.train_chunk("sd21", 256, "single", None, pairs=1, prompts=1)
    # two images forward and backward (input gradients only, about one more forward: the UNet is frozen) and
    # two prompts; a prompt encoded once instead of twice saves one text-encoder forward and backward
    assert 2 * 2 * forward < chunk < 2 * 3 * forward + 2 * 3 * meter.text("sd21")
    assert chunk - deduplicated == pytest.approx(2 * meter.text("sd21"), rel=0.05)
    with pytest.raises(ValueError, match="prompts must be in"):
        meter.train_chunk("sd21", 256, "single", None, pairs=1, prompts=3)


@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    """Demo PF-Pascal trn/val tables (flip 0 and 1), tiny SD 2-1 and DINOv2 with their records and caches."""
    from sd4match.caches import build_dino_cache, build_latent_cache, cache_meta
    from sd4match.datasets import parse_pfpascal, write_pairs_table
    from sd4match.demo_world import DemoWorldSpec, make_pfpascal
    from sd4match.features import SDFeaturizer
    from sd4match.fetch import extract
    from sd4match.models import (
        ModelSpec,
        load_dinov2,
        load_stable_diffusion,
        resolve_model,
        write_model_record,
    )
    from sd4match.tiny_models import build_tiny_dinov2

    base = tmp_path_factory.mktemp("train_world")
    spec = DemoWorldSpec(
        pfpascal_classes=("aeroplane", "car"), pfpascal_images_per_class=5, pfpascal_pairs_per_split=(3, 2, 1)
    )
    images_zip, pairs_zip = make_pfpascal(base / "archives", spec)
    extract(images_zip, base / "root")
    extract(pairs_zip, base / "lists")
    lists = {p.name: p for p in (base / "lists").rglob("*_pairs.csv")}
    trn = parse_pfpascal(base / "root", "trn", lists["trn_pairs.csv"])
    val = parse_pfpascal(base / "root", "val", lists["val_pairs.csv"])
    write_pairs_table(trn, base / "pfpascal_trn.parquet")
    write_pairs_table(val, base / "pfpascal_val.parquet")
    sd_record = resolve_model(
        ModelSpec("sd21", str(build_tiny_stable_diffusion(base / "sd21")), "stable_diffusion")
    )
    dino_record = resolve_model(ModelSpec("dinov2", str(build_tiny_dinov2(base / "dinov2")), "dinov2"))
    write_model_record(sd_record, base / "sd21.json")
    write_model_record(dino_record, base / "dinov2.json")
    components = load_stable_diffusion(sd_record.local_path)
    meta = cache_meta(sd_record, 64, "latents")
    build_latent_cache(
        [trn, val], base / "root", SDFeaturizer(components), 64, base / "latents.safetensors", meta
    )
    model, processor = load_dinov2(dino_record.local_path)
    meta = cache_meta(dino_record, None, "dino", processor=processor)
    build_dino_cache([trn, val], base / "root", model, processor, base / "dino.safetensors", meta)
    return base


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_training_work_counts_what_the_trainer_runs(train_world, tmp_path, variant, monkeypatch):
    from sd4match.training import PromptTrainer, TrainJob, TrainSettings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, cpm = train_world, variant == "cpm"
    settings = TrainSettings(
        variant=variant, steps=4, batch_size=2, per_device_batch=1, val_every=3, checkpoint_every=4,
        image_size=64, precision="fp32",
    )  # fmt: skip
    job = TrainJob(
        settings=settings,
        pairs_trn=str(base / "pfpascal_trn.parquet"),
        pairs_val=str(base / "pfpascal_val.parquet"),
        sd_model=str(base / "sd21.json"),
        latent_cache=str(base / "latents.safetensors"),
        output=str(tmp_path / "prompt.safetensors"),
        curve=str(tmp_path / "loss_curve.csv"),
        out_dir=str(tmp_path / "checkpoints"),
        dinov2_model=str(base / "dinov2.json") if cpm else None,
        dino_cache=str(base / "dino.safetensors") if cpm else None,
        metadata={},
    )
    trainer = PromptTrainer(job)
    from sd4match.bench_passes import count_samples

    watched = {"unet": trainer.components.unet, "text": trainer.components.text_encoder}
    with count_samples(watched) as seen:
        trainer.run()
    dag_job = W.DagJob(
        "train_prompt", {"trainset": "pfpascal", "variant": variant},
        {"settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}, "cpm": None}, gpu=1,
    )  # fmt: skip
    config = {
        "sd4match": {"model": "sd21"},
        "models": {"sd21": {"id": "tiny"}},
        "matching": {"methods": ["nn"]},
    }
    work = W.job_work(dag_job, _context(config, counts=W.DatasetCounts(base)))
    # 4 steps x 2 micro-batches x 2 images + validation after steps 3 and 4 (per image / per pair)
    assert seen == {"unet": work.passes["unet"], "text": work.passes["text"]}


@pytest.mark.slow
def test_projection_cli_on_the_demo_config(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    args = ["projection", "--configfile", "config.yaml", "--configfile", "profiles/demo/world.yaml"]
    assert main([*args, "--code", "before", "--code", "current", "--mfu", "0.5", "--out", str(out)]) == 0
    record = json.loads(out.read_text().splitlines()[0])
    metrics = record["metrics"]
    assert record["name"] == "projection" and record["settings"]["mfu"] == 0.5
    assert metrics["current_h100_hours"] < metrics["before_h100_hours"]  # SD+DINO once per image
    assert metrics["current_h100_hours"] == pytest.approx(
        metrics["current_gpu_eflop"] * 1e18 / (0.5 * 989e12) / 3600
    )
    printed = capsys.readouterr().out
    assert (
        "## Projection, code paths: before" in printed
        and "train_prompt[seed=0,trainset=spair,variant=cpm]" in printed
    )
    # the demo's custom dataset has no pairs table before the demo runs and no published counts: its jobs
    # are listed as not projected, never counted as zero
    assert metrics["current_unprojected_jobs"] > 0
    assert "Not projected (" in printed and "evaluate_zero_shot[dataset=shapes,method=dift]" in printed


# ----------------------------------------------------------------------------------------- GPU check


def _gpu_check():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_gpu_check_skips_cleanly_without_a_gpu(monkeypatch, capsys):
    check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main([]) == 0
    assert "no CUDA device available; GPU check skipped" in capsys.readouterr().out


def test_gpu_check_rows_name_the_gpu_and_every_measurement():
    check = _gpu_check()
    settings = check.CheckSettings(device="cpu")
    results = {
        "truncated UNet fp16": {"images_per_s": 40.0},
        "truncated UNet bf16": {"images_per_s": 38.5},
        "training step fp32+autocast": {"step_s": 1.25, "peak_gib": 41.0},
        "training step fp16": {"step_s": 0.75, "peak_gib": 30.5},
        "evaluation fp16 autocast": {
            "single_pairs_per_s": 12.0,
            "cpm_pairs_per_s": 3.5,
            "score_pair_s": 0.08,
        },
    }
    rows = check.markdown_rows(results, settings)
    assert "CPU smoke run" in rows.splitlines()[0]
    assert rows.splitlines()[-1] == "| 40.0 / 38.5 | 1.25, 41.0 | 0.75, 30.5 | 12.0 | 3.50 | 0.080 |"
