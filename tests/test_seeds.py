"""Replicate seeds: config resolution, and two seeds of a tiny-world run giving two prompts and a spread."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from sd4match.caches import build_latent_cache, cache_meta
from sd4match.config import ConfigError, load_config
from sd4match.datasets import parse_pfpascal, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfpascal
from sd4match.evaluation import MatchingSettings, evaluate_pairs, sd_text_prompt_features
from sd4match.features import SDFeaturizer
from sd4match.fetch import extract
from sd4match.metrics import summarise
from sd4match.models import ModelSpec, load_stable_diffusion, resolve_model, write_model_record
from sd4match.prompt_learning import load_prompt
from sd4match.seeds import check_seeds, coerce_seed_lists, primary_seed, run_seeds, seed_dir
from sd4match.tiny_models import build_tiny_stable_diffusion
from sd4match.training import TrainJob, TrainSettings, train_prompt
from sd4match.uncertainty import seed_spread

REPO = Path(__file__).resolve().parents[1]
S = 128


# ------------------------------------------------------------------------------------------------- config


def test_paper_config_runs_one_seed_and_the_demo_two_for_one_run():
    paper = load_config(REPO / "config.yaml")
    assert paper["seeds"] == [0] and paper["seeds_per_run"] == {}
    assert run_seeds(paper, "spair", "cpm") == [0] and primary_seed(paper, "pfpascal", "single") == 0
    demo = load_config(REPO / "config.yaml", REPO / "profiles/demo/world.yaml")
    assert run_seeds(demo, "spair", "single") == [0, 1]
    assert run_seeds(demo, "pfpascal", "single") == [0] and run_seeds(demo, "spair", "cpm") == [0]
    assert seed_dir(1) == "seed1" and seed_dir("{seed}") == "seed{seed}"


def test_overrides_first_seed_is_primary_and_bad_seeds_name_the_key(tmp_path: Path):
    overlay = tmp_path / "seeds.yaml"
    overlay.write_text(yaml.safe_dump({"seeds": [2, 0, 1], "seeds_per_run": {"spair/cpm_no_gn": [5]}}))
    cfg = load_config(REPO / "config.yaml", overlay)
    assert run_seeds(cfg, "spair", "single") == [2, 0, 1] and primary_seed(cfg, "spair", "single") == 2
    assert run_seeds(cfg, "spair", "cpm_no_gn") == [5]
    for bad, key in (
        ({"seeds": []}, "seeds"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"seeds": [-1]}, "seeds.0"),
        ({"seeds_per_run": {"willow/cpm": [0]}}, "seeds_per_run"),
        ({"seeds_per_run": {"spair/cpm": [1.5]}}, "seeds_per_run.spair/cpm.0"),
    ):
        overlay.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            load_config(REPO / "config.yaml", overlay)
    cfg["seeds_per_run"] = {"spair/cpm_typo": [1]}
    with pytest.raises(
        ConfigError, match=r"x\.yaml: key 'seeds_per_run\.spair/cpm_typo' names variant 'cpm_typo'"
    ):
        check_seeds(cfg, "x.yaml")


def test_snakemake_config_strings_become_seeds():
    # `snakemake --config seeds=[0,1]` parses list items as strings
    cfg = coerce_seed_lists({"seeds": ["0", "1"], "seeds_per_run": {"spair/cpm": ["3"]}, "seed": 0})
    assert cfg == {"seeds": [0, 1], "seeds_per_run": {"spair/cpm": [3]}, "seed": 0}
    assert coerce_seed_lists({"seeds": ["-1", "x"]})["seeds"] == ["-1", "x"]  # left for the schema to reject


# ------------------------------------------------------------------------------------ two seeds, tiny world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo PF-Pascal trn/val tables, the tiny SD 2-1, its record and latent cache (Single: no DINOv2)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("seeds")
    spec = DemoWorldSpec(
        pfpascal_classes=("aeroplane", "car"), pfpascal_images_per_class=5, pfpascal_pairs_per_split=(4, 2, 1)
    )
    images_zip, pairs_zip = make_pfpascal(base / "archives", spec)
    extract(images_zip, base / "root")
    extract(pairs_zip, base / "lists")
    lists = {p.name: p for p in (base / "lists").rglob("*_pairs.csv")}
    trn = parse_pfpascal(base / "root", "trn", lists["trn_pairs.csv"])
    val = parse_pfpascal(base / "root", "val", lists["val_pairs.csv"])
    write_pairs_table(trn, base / "trn.parquet")
    write_pairs_table(val, base / "val.parquet")
    sd_dir = build_tiny_stable_diffusion(base / "sd21", seed=0)
    record = resolve_model(ModelSpec(name="sd21", id=str(sd_dir), kind="stable_diffusion"))
    write_model_record(record, base / "sd21.json")
    components = load_stable_diffusion(sd_dir)
    build_latent_cache(
        [trn, val],
        base / "root",
        SDFeaturizer(components),
        S,
        base / "latents.safetensors",
        cache_meta(record, S, "latents"),
    )
    return {"base": base, "val": val, "components": components}


def train_seed(world: dict, out: Path, seed: int) -> Path:
    """Tune a Single prompt with ``seed``, as rule train_prompt does for ``.../seed<k>/``."""
    base = world["base"]
    settings = TrainSettings(
        variant="single", steps=3, batch_size=2, per_device_batch=2, val_every=3, checkpoint_every=3,
        log_every=1, image_size=S, precision="fp32", seed=seed,
    )  # fmt: skip
    job = TrainJob(
        settings=settings,
        pairs_trn=str(base / "trn.parquet"),
        pairs_val=str(base / "val.parquet"),
        sd_model=str(base / "sd21.json"),
        latent_cache=str(base / "latents.safetensors"),
        output=str(out / seed_dir(seed) / "prompt.safetensors"),
        curve=str(out / seed_dir(seed) / "loss_curve.csv"),
        out_dir=str(out / seed_dir(seed) / "checkpoints"),
        metadata={"config_hash": "abc123"},
    )
    train_prompt(job)
    return Path(job.output)


def evaluate_seed(world: dict, prompt_path: Path, seed: int) -> pd.DataFrame:
    """Summary of a prompt on the val pairs, noise seeded by the run's seed (as rule evaluate_prompt)."""
    c = world["components"]
    module, _ = load_prompt(prompt_path, c.text_encoder, c.tokenizer)
    features_for = sd_text_prompt_features(
        SDFeaturizer(c), module, world["base"] / "root", S, 50, 1, seed=seed
    )
    per_pair = evaluate_pairs(world["val"], features_for, MatchingSettings(S, ("nn",), (0.1, 0.15)))
    return summarise(per_pair)


def test_two_seeds_train_different_prompts_and_the_table_spread_comes_from_them(world: dict, tmp_path: Path):
    paths = {seed: train_seed(world, tmp_path, seed) for seed in (0, 1)}
    c = world["components"]
    prompts = {seed: load_prompt(path, c.text_encoder, c.tokenizer)[0].prompt for seed, path in paths.items()}
    assert not torch.equal(prompts[0], prompts[1])
    again = train_seed(world, tmp_path / "again", 0)  # a seed fixes its run
    assert torch.equal(load_prompt(again, c.text_encoder, c.tokenizer)[0].prompt, prompts[0])

    summaries = {seed: evaluate_seed(world, path, seed) for seed, path in paths.items()}
    spread = seed_spread(summaries).set_index(["category", "method", "alpha"])
    for key, row in spread.iterrows():
        values = [
            float(s.set_index(["category", "method", "alpha"]).loc[key, "pck_per_image"])
            for s in summaries.values()
        ]
        assert row["n_seeds"] == 2
        assert row["pck_per_image_mean"] == pytest.approx(sum(values) / 2, abs=1e-12)
        # two seeds: the sample standard deviation is |a - b| / sqrt(2)
        assert row["pck_per_image_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), abs=1e-12)
        assert (row["pck_per_image_min"], row["pck_per_image_max"]) == (min(values), max(values))
    assert (
        spread["pck_per_image_std"] > 0
    ).any()  # the two prompts match differently: the table has a spread
