"""The test splits' latent cache: evaluations that read it give exactly the numbers of evaluations that run
the VAE themselves (tiny SD 2-1, demo PF-Willow), with no VAE pass; stale or incomplete caches are refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from sd4match.bench_passes import count_samples
from sd4match.caches import (
    DinoCache,
    LatentCache,
    build_dino_cache,
    build_latent_cache,
    cache_meta,
    encoder_meta,
    image_key,
    open_latent_cache,
    run_test_latent_cache,
    sidecar_path,
)
from sd4match.data_sources import DatasetLocation, write_location
from sd4match.datasets import load_image, parse_pfwillow, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfwillow
from sd4match.evaluation import (
    ConditionalFeatures,
    ImageKey,
    MatchingSettings,
    PromptModels,
    cache_keys,
    conditional_feature_batches,
    evaluate_pairs,
    evaluate_pairs_conditional,
    image_seed,
    run_prompt_evaluation,
    sd_text_prompt_features,
)
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.features import SDFeaturizer, sample_latents
from sd4match.fetch import extract
from sd4match.models import ModelSpec, load_dinov2, load_stable_diffusion, resolve_model, write_model_record
from sd4match.prompt_learning import CPMConfig, build_prompt_module, save_prompt
from sd4match.prompts import TextPrompt
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion
from sd4match.zero_shot import run_zero_shot

S = 64
TINY_CPM = CPMConfig(dino_dim=32, n_patches=256)
SETTINGS = MatchingSettings(image_size=S, methods=("nn", "soft_argmax", "kernel_softmax"), alphas=(0.1,))
FP32_ENCODER = {"precision": "fp32", "channels_last": False}
FEATURES = {"precision": "fp32", "up_block_index": 1, "max_unet_batch": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo PF-Willow test set (30 images, 60 pairs), tiny SD 2-1 and DINOv2, their records, the DINOv2 cache
    and the test latent cache built by the rule's entry point."""
    base = tmp_path_factory.mktemp("test_latents")
    images_zip, pairs_csv = make_pfwillow(base / "archives", DemoWorldSpec())
    extract(images_zip, base / "root")
    pairs = parse_pfwillow(base / "root", pairs_csv)
    write_pairs_table(pairs, base / "pairs.parquet")
    write_location(DatasetLocation("pfwillow", str(base / "root")), base / "fetch.json")
    sd_dir = build_tiny_stable_diffusion(base / "sd21", seed=0)
    dino_dir = build_tiny_dinov2(base / "dinov2", seed=0)
    sd_record = resolve_model(ModelSpec(name="sd21", id=str(sd_dir), kind="stable_diffusion"))
    dino_record = resolve_model(ModelSpec(name="dinov2", id=str(dino_dir), kind="dinov2"))
    write_model_record(sd_record, base / "sd21.json")
    write_model_record(dino_record, base / "dinov2.json")
    model, processor = load_dinov2(dino_dir)
    dino_meta = cache_meta(dino_record, None, "dino", processor=processor)
    build_dino_cache([pairs], base / "root", model, processor, base / "dino.safetensors", dino_meta)
    cache = base / "pfwillow_test_sd21.safetensors"
    run_test_latent_cache(
        base / "pairs.parquet", base / "fetch.json", base / "sd21.json", S, FP32_ENCODER, cache, "cpu"
    )
    return {
        "base": base,
        "root": base / "root",
        "pairs": pairs,
        "sd_dir": sd_dir,
        "sd_record": sd_record,
        "dino_record": dino_record,
        "components": load_stable_diffusion(sd_dir),
        "cache": cache,
    }


def _latents(world, featurizer: SDFeaturizer) -> LatentCache:
    return open_latent_cache(world["cache"], world["base"] / "sd21.json", S, featurizer)


def _all_keys(pairs: pd.DataFrame) -> list[ImageKey]:
    keys = {ImageKey(row.src_image, bool(row.flip), row.category) for row in pairs.itertuples()}
    keys |= {ImageKey(row.trg_image, bool(row.flip), row.category) for row in pairs.itertuples()}
    return sorted(keys, key=str)


def _prompt_metadata(world, variant: str) -> dict:
    sd, dino = world["sd_record"], world["dino_record"]
    meta = {"variant": variant, "sd_model": {"id": sd.id, "revision": sd.revision_resolved}}
    if variant == "cpm":
        meta["dinov2_model"] = {"id": dino.id, "revision": dino.revision_resolved}
    return meta


# ------------------------------------------------------------------------------------ the same numbers


def test_the_rule_caches_every_test_image_with_its_encoder(world):
    sidecar = json.loads(sidecar_path(world["cache"]).read_text())
    assert sidecar["encoder"] == {"dtype": "float32", "channels_last": False, "device_type": "cpu"}
    assert sidecar["image_size"] == S and sidecar["revision_resolved"] == world["sd_record"].revision_resolved
    assert sorted(sidecar["keys"]) == cache_keys(world["pairs"]) and len(sidecar["keys"]) == 30


def test_single_features_and_predictions_from_the_cache_equal_the_vae_pass(world):
    c = world["components"]
    module = build_prompt_module("single", c.text_encoder, c.tokenizer)
    keys = _all_keys(world["pairs"])
    direct = SDFeaturizer(c, max_batch=8)
    cached = SDFeaturizer(c, max_batch=8)
    vae_samples = {"vae": c.vae.encoder}
    with count_samples(vae_samples) as seen_direct:
        without = sd_text_prompt_features(direct, module, world["root"], S, 50, 2, seed=3)
        bank_direct = without(keys)
        table_direct = evaluate_pairs(world["pairs"], without, SETTINGS)
    with count_samples(vae_samples) as seen_cached:
        with_cache = sd_text_prompt_features(
            cached, module, world["root"], S, 50, 2, seed=3, latent_cache=_latents(world, cached)
        )
        bank_cached = with_cache(keys)
        table_cached = evaluate_pairs(world["pairs"], with_cache, SETTINGS)
    assert torch.equal(bank_direct, bank_cached)  # bit for bit: the same latents, then the same noise
    pd.testing.assert_frame_equal(table_direct, table_cached, check_exact=True)
    assert seen_direct["vae"] == 2 * 30 and seen_cached["vae"] == 0  # two evaluations of 30 images
    assert direct.unet_samples == cached.unet_samples


def test_cpm_features_and_predictions_from_the_cache_equal_the_vae_pass(world):
    c = world["components"]
    module = build_prompt_module("cpm", c.text_encoder, c.tokenizer, cpm=TINY_CPM).eval()
    dino = DinoCache.load(world["base"] / "dino.safetensors", expect_meta={"kind": "dino"})
    featurizer = SDFeaturizer(c, max_batch=8)
    latents = _latents(world, featurizer)
    direct_source = ConditionalFeatures(module, featurizer, dino, world["root"], S, 50, 2, 1, 4)
    cached_source = replace(direct_source, latent_cache=latents)
    direct = list(conditional_feature_batches(world["pairs"], direct_source))
    cached = list(conditional_feature_batches(world["pairs"], cached_source))
    assert len(direct) == len(cached) == 15
    for (rows_a, src_a, trg_a), (rows_b, src_b, trg_b) in zip(direct, cached, strict=True):
        assert rows_a == rows_b and torch.equal(src_a, src_b) and torch.equal(trg_a, trg_b)
    with count_samples({"vae": c.vae.encoder}) as seen:
        table = evaluate_pairs_conditional(world["pairs"], cached_source, SETTINGS)
    assert seen["vae"] == 0
    reference = evaluate_pairs_conditional(world["pairs"], direct_source, SETTINGS)
    pd.testing.assert_frame_equal(reference, table, check_exact=True)


def no_vae(*args, **kwargs):
    raise AssertionError("the VAE ran although the test latents are cached")


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_an_evaluation_job_with_the_cache_writes_the_same_files(world, tmp_path, monkeypatch, variant):
    base = world["base"]
    c = world["components"]
    cpm = TINY_CPM if variant == "cpm" else None
    prompt = tmp_path / "prompt.safetensors"
    module = build_prompt_module(variant, c.text_encoder, c.tokenizer, cpm=cpm)
    save_prompt(module, prompt, _prompt_metadata(world, variant))
    dino = (base / "dinov2.json", base / "dino.safetensors") if variant == "cpm" else (None, None)
    matching = {"methods": list(SETTINGS.methods), "kernel_sigma": 7.0, "softmax_temperature": 0.04}
    for name, cache in (("direct", None), ("cached", world["cache"])):
        if cache is not None:
            monkeypatch.setattr(SDFeaturizer, "encode_latents", no_vae)
        run_prompt_evaluation(
            prompt,
            PromptModels(base / "sd21.json", *dino),
            SplitInputs(base / "pairs.parquet", base / "fetch.json", cache),
            {"timestep": 50, "ensemble": 2, "pair_batch": 4},
            JobSettings(FEATURES, matching, [0.05, 0.1, 0.15], None, S, 0, "cpu"),
            JobOutputs(tmp_path / f"{name}_per_pair.csv", tmp_path / f"{name}_summary.csv"),
        )
    for kind in ("per_pair", "summary"):
        assert (tmp_path / f"direct_{kind}.csv").read_bytes() == (
            tmp_path / f"cached_{kind}.csv"
        ).read_bytes()


def test_dift_with_the_cache_writes_the_same_files(world, tmp_path, monkeypatch):
    base = world["base"]
    method = {
        "kind": "sd",
        "model": "sd21",
        "prompt": "a photo of a {category}",
        "timestep": 261,
        "ensemble": 2,
    }
    matching = {"methods": ["nn", "kernel_softmax"], "kernel_sigma": 7.0, "softmax_temperature": 0.04}
    for name, cache in (("direct", None), ("cached", world["cache"])):
        if cache is not None:
            monkeypatch.setattr(SDFeaturizer, "encode_latents", no_vae)
        run_zero_shot(
            method,
            {"model": base / "sd21.json"},
            SplitInputs(base / "pairs.parquet", base / "fetch.json", cache),
            JobSettings(FEATURES, matching, [0.1], None, S, 0, "cpu"),
            JobOutputs(tmp_path / f"{name}_per_pair.csv", tmp_path / f"{name}_summary.csv"),
        )
    assert (tmp_path / "direct_per_pair.csv").read_bytes() == (tmp_path / "cached_per_pair.csv").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_vae_sample_is_reproduced_bit_for_bit(world, tmp_path, dtype):
    """With fp16/bf16 weights (the evaluation on GPU) the posterior, eps and ``mean + std * eps`` are in that
    dtype: the cache stores the posterior exactly (float32 holds every half value) and samples in it."""
    featurizer = SDFeaturizer(load_stable_diffusion(world["sd_dir"], dtype=dtype))
    pairs = world["pairs"].head(3)
    out = tmp_path / "half.safetensors"
    meta = cache_meta(world["sd_record"], S, "latents", encoder=encoder_meta(featurizer))
    build_latent_cache(pairs, world["root"], featurizer, S, out, meta, batch_size=1)
    cache = LatentCache.load(out, meta)
    assert cache.posterior_dtype == dtype
    for key in _all_keys(pairs):
        seed = image_seed(7, key)
        pixels = featurizer.preprocess([load_image(world["root"], key.path, key.flip)], S)
        gen_direct, gen_cached = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        direct = featurizer.encode_latents(pixels, gen_direct)
        cached = cache.sample([image_key(key.path, key.flip)], featurizer.scaling_factor, gen_cached)
        assert cached.dtype == torch.float32 and torch.equal(direct, cached)
        assert torch.equal(torch.randn(4, generator=gen_direct), torch.randn(4, generator=gen_cached))
        name = image_key(key.path, key.flip)
        in_fp32 = sample_latents(
            cache.mean([name]),
            cache.std([name]),
            featurizer.scaling_factor,
            torch.Generator().manual_seed(seed),
        )
        assert not torch.equal(in_fp32, direct)  # sampling in float32 would not give the evaluation's latent


# ------------------------------------------------------------------------------------ refused caches


def test_a_cache_of_other_settings_is_stale_and_names_the_key(world, tmp_path):
    fp32 = SDFeaturizer(world["components"])
    record = world["base"] / "sd21.json"
    with pytest.raises(ValueError, match=r"stale cache .*'image_size' is 64 .* expected 128"):
        open_latent_cache(world["cache"], record, 2 * S, fp32)
    half = SDFeaturizer(load_stable_diffusion(world["sd_dir"], dtype=torch.float16))
    with pytest.raises(ValueError, match=r"stale cache .*'encoder' .*'float16'"):
        open_latent_cache(world["cache"], record, S, half)
    training_kind = tmp_path / "trnval.safetensors"  # a training cache records no encoder
    build_latent_cache(
        world["pairs"].head(2),
        world["root"],
        fp32,
        S,
        training_kind,
        cache_meta(world["sd_record"], S, "latents"),
    )
    with pytest.raises(ValueError, match=r"stale cache .*'encoder' is '<absent>'"):
        open_latent_cache(training_kind, record, S, fp32)


def test_a_cache_without_every_test_image_is_refused_before_any_work(world, tmp_path):
    base = world["base"]
    partial = tmp_path / "partial.safetensors"
    featurizer = SDFeaturizer(world["components"])
    meta = cache_meta(world["sd_record"], S, "latents", encoder=encoder_meta(featurizer))
    build_latent_cache(world["pairs"].head(2), world["root"], featurizer, S, partial, meta, batch_size=1)
    method = {"kind": "sd", "model": "sd21", "prompt": "", "timestep": 261, "ensemble": 1}
    with pytest.raises(KeyError, match=rf"latent cache {partial} lacks \d+ image\(s\) of pairs table"):
        run_zero_shot(
            method,
            {"model": base / "sd21.json"},
            SplitInputs(base / "pairs.parquet", base / "fetch.json", partial),
            JobSettings(FEATURES, {"methods": ["nn"], "kernel_sigma": 7.0, "softmax_temperature": 0.04},
                        [0.1], None, S, 0, "cpu"),
            JobOutputs(tmp_path / "p.csv", tmp_path / "s.csv"),
        )  # fmt: skip
    assert not (tmp_path / "p.csv").exists()


def test_text_prompt_features_without_a_cache_still_load_the_images(world):
    """The cache is optional: without it the job encodes each distinct image once, as before."""
    c = world["components"]
    featurizer = SDFeaturizer(c)
    prompt = TextPrompt("", c.text_encoder, c.tokenizer)
    with count_samples({"vae": c.vae.encoder}) as seen:
        sd_text_prompt_features(featurizer, prompt, world["root"], S, 261, 1, 0)(
            _all_keys(world["pairs"])[:5]
        )
    assert seen["vae"] == 5
