"""Evaluating learned prompts on the tiny world: per-image reuse (Single) vs per-pair batches (CPM)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from sd4match.caches import DinoCache, build_dino_cache, cache_meta
from sd4match.data_sources import DatasetLocation, write_location
from sd4match.datasets import parse_pfwillow, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfwillow
from sd4match.evaluation import (
    ConditionalFeatures,
    MatchingSettings,
    PromptModels,
    evaluate_pairs,
    evaluate_pairs_conditional,
    run_prompt_evaluation,
    sd_text_prompt_features,
)
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.features import SDFeaturizer
from sd4match.fetch import extract
from sd4match.models import ModelSpec, load_dinov2, load_stable_diffusion, resolve_model, write_model_record
from sd4match.paper_figures import PairFigureInputs, QualitativeSettings, make_fig4, make_qualitative
from sd4match.prompt_learning import CPMConfig, build_prompt_module, save_prompt
from sd4match.reporting import Provenance
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion

S = 64
TINY_CPM = CPMConfig(dino_dim=32, n_patches=256)  # the tiny DINOv2: hidden 32, 16 x 16 patches
SETTINGS = MatchingSettings(image_size=S, methods=("nn", "kernel_softmax"), alphas=(0.1,))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("prompt_eval")
    images_zip, pairs_csv = make_pfwillow(base / "archives", DemoWorldSpec())
    extract(images_zip, base / "root")
    pairs = parse_pfwillow(base / "root", pairs_csv)
    sd_dir = build_tiny_stable_diffusion(base / "sd21", seed=0)
    dino_dir = build_tiny_dinov2(base / "dinov2", seed=0)
    sd_record = resolve_model(ModelSpec(name="sd21", id=str(sd_dir), kind="stable_diffusion"))
    dino_record = resolve_model(ModelSpec(name="dinov2", id=str(dino_dir), kind="dinov2"))
    model, processor = load_dinov2(dino_dir)
    build_dino_cache(
        [pairs],
        base / "root",
        model,
        processor,
        base / "dino.safetensors",
        cache_meta(dino_record, None, "dino", processor=processor),
    )
    write_pairs_table(pairs, base / "pairs.parquet")
    write_location(DatasetLocation("pfwillow", str(base / "root")), base / "fetch.json")
    write_model_record(sd_record, base / "sd21.json")
    write_model_record(dino_record, base / "dinov2.json")
    components = load_stable_diffusion(sd_dir)
    return {
        "base": base,
        "pairs": pairs,
        "components": components,
        "sd_record": sd_record,
        "dino_record": dino_record,
        "dino_dir": dino_dir,
    }


def trained_with(
    world, variant: str, sd_revision: str | None = None, dino_revision: str | None = None
) -> dict:
    """Prompt metadata naming the models it was trained with (as training writes it)."""
    sd, dino = world["sd_record"], world["dino_record"]
    meta = {"variant": variant, "sd_model": {"id": sd.id, "revision": sd_revision or sd.revision_resolved}}
    if variant == "cpm":
        meta["dinov2_model"] = {"id": dino.id, "revision": dino_revision or dino.revision_resolved}
    return meta


def save_tiny_prompt(world, path, variant: str, metadata: dict):
    c = world["components"]
    cpm = TINY_CPM if variant == "cpm" else None
    save_prompt(build_prompt_module(variant, c.text_encoder, c.tokenizer, cpm=cpm), path, metadata)
    return path


def _featurizer(world) -> SDFeaturizer:
    return SDFeaturizer(world["components"], max_batch=8)


def test_single_prompt_features_once_per_distinct_image(world):
    featurizer = _featurizer(world)
    c = world["components"]
    module = build_prompt_module("single", c.text_encoder, c.tokenizer)
    features_for = sd_text_prompt_features(featurizer, module, world["base"] / "root", S, 50, 2, seed=0)
    per_pair = evaluate_pairs(world["pairs"], features_for, SETTINGS)
    assert len(per_pair) == 60 * 2
    assert featurizer.unet_passes == 30  # 30 distinct images, E = 2 draws in one UNet call each
    assert featurizer.unet_samples == 30 * 2


def test_cpm_features_per_pair_in_batches(world):
    featurizer = _featurizer(world)
    c = world["components"]
    module = build_prompt_module("cpm", c.text_encoder, c.tokenizer, cpm=TINY_CPM)
    dino = DinoCache.load(world["base"] / "dino.safetensors", expect_meta={"kind": "dino"})
    source = ConditionalFeatures(module, featurizer, dino, world["base"] / "root", S, 50, 2, 0, pair_batch=4)
    run = lambda: evaluate_pairs_conditional(world["pairs"], source, SETTINGS)  # noqa: E731
    first = run()
    # 60 pairs in 15 batches of 4; each batch = 4 pairs x 2 images x E=2 = 16 latents = 2 UNet calls of 8
    assert featurizer.unet_passes == 15 * 2
    assert featurizer.unet_samples == 60 * 2 * 2
    pd.testing.assert_frame_equal(first, run())  # seeded: identical on rerun


def test_run_prompt_evaluation_writes_per_pair_and_summary(world, tmp_path):
    base = world["base"]
    split = SplitInputs(base / "pairs.parquet", base / "fetch.json")
    settings = JobSettings(
        {"precision": "fp32", "up_block_index": 1, "max_unet_batch": 16},
        {
            "methods": ["nn", "soft_argmax", "kernel_softmax"],
            "kernel_sigma": 7.0,
            "softmax_temperature": 0.04,
        },
        [0.05, 0.1, 0.15],
        None,
        S,
        0,
    )
    for variant in ("single", "cpm"):
        prompt = save_tiny_prompt(
            world, tmp_path / f"{variant}.safetensors", variant, trained_with(world, variant)
        )
        cpm = variant == "cpm"
        models = PromptModels(
            base / "sd21.json",
            base / "dinov2.json" if cpm else None,
            base / "dino.safetensors" if cpm else None,
        )
        outputs = JobOutputs(tmp_path / f"{variant}_per_pair.csv", tmp_path / f"{variant}_summary.csv")
        summary = run_prompt_evaluation(
            prompt, models, split, {"timestep": 50, "ensemble": 1, "pair_batch": 8}, settings, outputs
        )
        per_pair = pd.read_csv(tmp_path / f"{variant}_per_pair.csv")
        assert len(per_pair) == 60 * 3 * 3
        all_rows = summary[summary.category == "All"]
        assert len(all_rows) == 9 and (all_rows.n_pairs == 60).all()


def test_cpm_without_dino_tokens_fails_clearly(world, tmp_path):
    c = world["components"]
    prompt = tmp_path / "cpm.safetensors"
    save_prompt(build_prompt_module("cpm", c.text_encoder, c.tokenizer, cpm=TINY_CPM), prompt, {})
    with pytest.raises(ValueError, match="conditional"):
        run_prompt_evaluation(
            prompt,
            PromptModels(world["base"] / "sd21.json"),
            SplitInputs(world["base"] / "pairs.parquet", world["base"] / "fetch.json"),
            {"timestep": 50, "ensemble": 1, "pair_batch": 2},
            _settings(max_pairs=None),
            JobOutputs(tmp_path / "p.csv", tmp_path / "s.csv"),
        )


# ------------------------------------------------------------------------------- what evaluation is fed


def _settings(max_pairs: int | None) -> JobSettings:
    """One nearest-neighbour PCK@0.1 evaluation in fp32 at S, seed 0."""
    features = {"precision": "fp32", "up_block_index": 1, "max_unet_batch": 8}
    matching = {"methods": ["nn"], "kernel_sigma": 7.0, "softmax_temperature": 0.04}
    return JobSettings(features, matching, [0.1], max_pairs, S, 0)


def evaluate(world, tmp_path, prompt, sd_record=None, dino_cache=None, dino_record=None):
    base = world["base"]
    return run_prompt_evaluation(
        prompt,
        PromptModels(sd_record or base / "sd21.json", dino_record, dino_cache),
        SplitInputs(base / "pairs.parquet", base / "fetch.json"),
        {"timestep": 50, "ensemble": 1, "pair_batch": 4},
        _settings(max_pairs=4),
        JobOutputs(tmp_path / "p.csv", tmp_path / "s.csv"),
    )


def test_a_prompt_trained_with_another_sd_revision_is_refused(world, tmp_path):
    prompt = save_tiny_prompt(
        world, tmp_path / "single.safetensors", "single", trained_with(world, "single", "0ld")
    )
    record = world["base"] / "sd21.json"
    with pytest.raises(ValueError, match=re.escape(f"{prompt}.json") + r".*'0ld'.*" + re.escape(str(record))):
        evaluate(world, tmp_path, prompt)
    assert not (tmp_path / "s.csv").exists()


def test_a_prompt_that_records_no_model_is_refused(world, tmp_path):
    prompt = save_tiny_prompt(world, tmp_path / "single.safetensors", "single", {"variant": "single"})
    with pytest.raises(ValueError, match=re.escape(f"{prompt}.json") + r" records no 'sd_model'"):
        evaluate(world, tmp_path, prompt)


def test_a_cpm_prompt_trained_with_another_dinov2_is_refused(world, tmp_path):
    meta = trained_with(world, "cpm", dino_revision="0ld")
    prompt = save_tiny_prompt(world, tmp_path / "cpm.safetensors", "cpm", meta)
    base = world["base"]
    with pytest.raises(ValueError, match=re.escape(f"{prompt}.json") + r".*'0ld'.*dinov2\.json"):
        evaluate(
            world, tmp_path, prompt, dino_cache=base / "dino.safetensors", dino_record=base / "dinov2.json"
        )


def test_a_dinov2_cache_of_another_model_or_preprocessing_is_refused(world, tmp_path):
    base, dino = world["base"], world["dino_record"]
    other = replace(dino, revision_resolved="0th3r")  # the model the config now names
    write_model_record(other, tmp_path / "dinov2_other.json")
    prompt = save_tiny_prompt(
        world, tmp_path / "cpm.safetensors", "cpm", trained_with(world, "cpm", None, "0th3r")
    )
    cache = base / "dino.safetensors"
    with pytest.raises(
        ValueError,
        match=r"stale cache .*'revision_resolved' is .* in "
        + re.escape(f"{cache}.json")
        + r", expected '0th3r' from model record .*dinov2_other\.json",
    ):
        evaluate(world, tmp_path, prompt, dino_cache=cache, dino_record=tmp_path / "dinov2_other.json")
    # the same model revision with another preprocessing (a 196 px crop instead of 224)
    folder = tmp_path / "dinov2_196"
    shutil.copytree(world["dino_dir"], folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["crop_size"] = {"height": 196, "width": 196}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    cropped = replace(
        resolve_model(ModelSpec("dinov2", str(folder), "dinov2")), revision_resolved=dino.revision_resolved
    )
    write_model_record(cropped, tmp_path / "dinov2_196.json")
    prompt = save_tiny_prompt(world, tmp_path / "cpm2.safetensors", "cpm", trained_with(world, "cpm"))
    with pytest.raises(ValueError, match=r"stale cache .*'processor'.*from model record .*dinov2_196\.json"):
        evaluate(world, tmp_path, prompt, dino_cache=cache, dino_record=tmp_path / "dinov2_196.json")


def test_figures_check_the_prompt_and_cache_against_the_records(world, tmp_path):
    base = world["base"]
    prov = Provenance("abc", {}, "sd4match test", True, "protocol")
    figure_inputs = dict(
        sd_record=str(base / "sd21.json"),
        dino_record=str(base / "dinov2.json"),
        dino_cache=str(base / "dino.safetensors"),
        pairs=str(base / "pairs.parquet"),
        location=str(base / "fetch.json"),
        n_pairs=2,
    )
    settings = QualitativeSettings(
        evaluation={"timestep": 50, "ensemble": 1, "pair_batch": 2},
        matching={"reported": "nn", "kernel_sigma": 7.0, "softmax_temperature": 0.04},
        image_size=S,
        seed=0,
    )

    def qualitative(prompt: Path) -> None:
        inputs = PairFigureInputs(prompt=str(prompt), **figure_inputs)
        make_qualitative(inputs, settings, str(png), str(tmp_path / "q.pdf"), prov, "cpu")

    png = tmp_path / "qualitative.png"
    stale = save_tiny_prompt(world, tmp_path / "old.safetensors", "cpm", trained_with(world, "cpm", "0ld"))
    with pytest.raises(ValueError, match=re.escape(f"{stale}.json") + r".*sd21\.json"):
        qualitative(stale)
    single = save_tiny_prompt(
        world, tmp_path / "s.safetensors", "single", trained_with(world, "single", "0ld")
    )
    with pytest.raises(ValueError, match=re.escape(f"{single}.json") + r".*sd21\.json"):
        make_fig4(str(single), figure_inputs["sd_record"], ["car(G)"], {}, str(png), "x.pdf", prov, "cpu")
    assert not png.exists()
    good = save_tiny_prompt(world, tmp_path / "cpm.safetensors", "cpm", trained_with(world, "cpm"))
    qualitative(good)
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".safetensors", ".json")))
    assert (
        written == ["q.pdf", "qualitative.png"] and (tmp_path / "qualitative.png.provenance.json").is_file()
    )


def test_matching_settings_from_the_config_block():
    block = {"methods": ["nn", "kernel_softmax"], "kernel_sigma": 5.0, "softmax_temperature": 0.02}
    assert MatchingSettings.from_config(block, 64, [0.05, 0.1]) == MatchingSettings(
        64, ("nn", "kernel_softmax"), (0.05, 0.1), kernel_sigma=5.0, temperature=0.02
    )
    only = MatchingSettings.from_config(block, 768, (0.1,), methods=["soft_argmax"])
    assert (only.methods, only.alphas, only.image_size) == (("soft_argmax",), (0.1,), 768)
