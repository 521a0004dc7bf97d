"""Prompt tuning on the tiny world (tiny SD 2-1 / DINOv2, demo PF-Pascal with flipped pairs), on CPU."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from snakemake.iocontainers import Namedlist

from sd4match import training
from sd4match.caches import build_dino_cache, build_latent_cache, cache_meta
from sd4match.datasets import parse_pfpascal, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfpascal
from sd4match.evaluation import MatchingSettings, evaluate_pairs, sd_text_prompt_features
from sd4match.features import SDFeaturizer
from sd4match.fetch import extract
from sd4match.models import ModelSpec, load_dinov2, load_stable_diffusion, resolve_model, write_model_record
from sd4match.prompt_learning import load_prompt
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion
from sd4match.training import (
    PairSampler,
    PromptTrainer,
    TrainingStopped,
    TrainJob,
    TrainSettings,
    collate_pairs,
    launch,
    launch_command,
    read_job,
    squashed_pairs,
    train_prompt,
    write_job,
)

S = 128  # 8 x 8 feature grid with the tiny UNet
SPEC = DemoWorldSpec(
    pfpascal_classes=("aeroplane", "car"), pfpascal_images_per_class=5, pfpascal_pairs_per_split=(4, 2, 1)
)


@pytest.fixture(scope="module", autouse=True)
def cpu_one_thread():
    """Train on CPU (bitwise reproducibility is what these tests check) with one intra-op thread: the tiny
    models gain nothing from more, and spinning OpenMP threads slow down ten-fold on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Demo PF-Pascal trn (16 rows, flip 0 and 1) / val (4) tables, tiny models, their records and caches."""
    base = tmp_path_factory.mktemp("training")
    images_zip, pairs_zip = make_pfpascal(base / "archives", SPEC)
    extract(images_zip, base / "root")
    extract(pairs_zip, base / "lists")
    lists = {p.name: p for p in (base / "lists").rglob("*_pairs.csv")}
    trn = parse_pfpascal(base / "root", "trn", lists["trn_pairs.csv"])
    val = parse_pfpascal(base / "root", "val", lists["val_pairs.csv"])
    write_pairs_table(trn, base / "trn.parquet")
    write_pairs_table(trn.head(4), base / "trn4.parquet")
    write_pairs_table(val, base / "val.parquet")
    sd_dir = build_tiny_stable_diffusion(base / "sd21", seed=0)
    dino_dir = build_tiny_dinov2(base / "dinov2", seed=0)
    sd_record = resolve_model(ModelSpec(name="sd21", id=str(sd_dir), kind="stable_diffusion"))
    dino_record = resolve_model(ModelSpec(name="dinov2", id=str(dino_dir), kind="dinov2"))
    write_model_record(sd_record, base / "sd21.json")
    write_model_record(dino_record, base / "dinov2.json")
    components = load_stable_diffusion(sd_dir)
    latents = base / "latents.safetensors"
    build_latent_cache(
        [trn, val], base / "root", SDFeaturizer(components), S, latents, cache_meta(sd_record, S, "latents")
    )
    model, processor = load_dinov2(dino_dir)
    meta = cache_meta(dino_record, None, "dino", processor=processor)
    build_dino_cache([trn, val], base / "root", model, processor, base / "dino.safetensors", meta)
    return {"base": base, "trn": trn, "val": val, "sd_dir": sd_dir, "components": components}


def make_job(
    world: dict, out: Path, variant: str = "single", trn: str = "trn.parquet", **settings
) -> TrainJob:
    """A job on the tiny world: 2 pairs per step, fp32; ``settings`` override the defaults below."""
    base = world["base"]
    defaults = dict(
        steps=6,
        batch_size=2,
        per_device_batch=2,
        val_every=2,
        checkpoint_every=2,
        log_every=1,
        image_size=S,
        precision="fp32",
    )
    cpm = variant == "cpm"
    return TrainJob(
        settings=TrainSettings(variant=variant, **{**defaults, **settings}),
        pairs_trn=str(base / trn),
        pairs_val=str(base / "val.parquet"),
        sd_model=str(base / "sd21.json"),
        latent_cache=str(base / "latents.safetensors"),
        output=str(out / "prompt.safetensors"),
        curve=str(out / "loss_curve.csv"),
        out_dir=str(out / "checkpoints"),
        dinov2_model=str(base / "dinov2.json") if cpm else None,
        dino_cache=str(base / "dino.safetensors") if cpm else None,
        metadata={"config_hash": "abc123"},
    )


def fixed_draw_loss(trainer: PromptTrainer) -> float:
    """Loss on every training pair with four fixed latent/noise draws (no gradient)."""
    with torch.no_grad():
        draws = [trainer.chunk_loss(trainer.train_pairs, torch.Generator().manual_seed(s)) for s in range(4)]
    return float(torch.stack(draws).mean())


# --------------------------------------------------------------------------------------------- settings, job


def test_settings_validation_names_bad_fields() -> None:
    with pytest.raises(ValueError, match=r"batch_size \(9\) must be a multiple of per_device_batch \(2\)"):
        TrainSettings(variant="single", batch_size=9, per_device_batch=2)
    settings = TrainSettings(variant="single")
    assert settings.accumulation_steps(1) == 3 and settings.accumulation_steps(3) == 1
    with pytest.raises(ValueError, match=r"9 is not divisible by 6"):
        settings.accumulation_steps(2)
    with pytest.raises(ValueError, match=r"window must be a positive odd integer, got 6.*precision must be"):
        TrainSettings(variant="single", window=6, precision="fp8")
    with pytest.raises(ValueError, match=r"variant must be one of"):
        TrainSettings(variant="prefix")
    with pytest.raises(ValueError, match=r"params\.settings: unknown training settings \['beta'\]"):
        TrainSettings.from_dict({"variant": "single", "beta": 1}, "params.settings")
    with pytest.raises(ValueError, match=r"val_every must be a positive integer or 'epoch'"):
        TrainSettings(variant="single", val_every="week")
    assert TrainSettings(variant="single").validation_interval(2940) == 327  # ceil(2940 / 9)
    assert TrainSettings(variant="single", val_every=50).validation_interval(2940) == 50


def test_job_json_round_trip_and_checks(world: dict, tmp_path: Path) -> None:
    job = make_job(world, tmp_path, "cpm", val_max_pairs=3)
    path = write_job(job)
    assert path == tmp_path / "checkpoints" / "job.json"
    assert read_job(path) == job
    with pytest.raises(ValueError, match=r"metadata keys \['step'\] are written by the trainer"):
        replace(job, metadata={"step": 1})
    with pytest.raises(ValueError, match=r"variant 'cpm' needs dino_cache and dinov2_model"):
        replace(job, dino_cache=None)
    with pytest.raises(ValueError, match=r"a CPM config was given for variant 'single'"):
        replace(make_job(world, tmp_path, "single"), cpm={})
    (tmp_path / "bad.json").write_text('{"settings": {"variant": "single"}}')
    with pytest.raises(ValueError, match=r"bad\.json: unknown keys \[\], missing keys \['pairs_trn'"):
        read_job(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------- pairs, sampler


def test_sampler_walks_seeded_epoch_permutations() -> None:
    sampler = PairSampler(5, seed=7)
    first = sampler.take(3) + sampler.take(3) + sampler.take(4)
    expected = [
        int(i)
        for epoch in (0, 1)
        for i in torch.randperm(5, generator=torch.Generator().manual_seed(7 + epoch))
    ]
    assert first == expected
    assert sampler.state_dict() == {"position": 10, "n_pairs": 5, "seed": 7}
    other = PairSampler(5, seed=7)
    other.load_state_dict({"position": 4, "n_pairs": 5, "seed": 7}, "ckpt")
    assert other.take(2) == expected[4:6]
    with pytest.raises(ValueError, match=r"ckpt: the checkpoint's sampler has 6 pairs"):
        other.load_state_dict({"position": 0, "n_pairs": 6, "seed": 7}, "ckpt")


def test_keypoints_in_squashed_frame_padded_with_mask(world: dict) -> None:
    rows = world["trn"].head(2)
    pairs = squashed_pairs(rows, S)
    for pair, row in zip(pairs, rows.itertuples(), strict=True):
        sx, sy = S / row.src_width, S / row.src_height
        expected = [[min(x * sx, S - 1), min(y * sy, S - 1)] for x, y in row.src_kps]
        assert torch.allclose(pair.src_kps, torch.tensor(expected), atol=1e-5)
        assert pair.src.flip == bool(row.flip)
    batch = collate_pairs(pairs)
    k0, k1 = len(pairs[0].src_kps), len(pairs[1].src_kps)
    assert batch.valid.shape == (2, max(k0, k1))
    assert batch.valid.sum(dim=1).tolist() == [k0, k1]
    short = 0 if k0 < k1 else 1
    assert torch.equal(batch.trg_kps[short, min(k0, k1) :], torch.zeros(abs(k1 - k0), 2))
    assert batch.src_keys[0] == f"{rows.iloc[0].src_image}|{int(rows.iloc[0].flip)}"


# ------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_training_lowers_the_loss_on_fixed_draws(world: dict, tmp_path: Path, variant: str) -> None:
    job = make_job(world, tmp_path, variant, trn="trn4.parquet", steps=8, val_every=8, checkpoint_every=8)
    trainer = PromptTrainer(job)
    before = fixed_draw_loss(trainer)
    result = trainer.run()
    after = fixed_draw_loss(trainer)
    assert result.steps_done == 8
    assert after < before - 0.1
    curve = pd.read_csv(job.curve)
    assert curve["step"].tolist() == list(range(1, 9)) and curve["loss"].notna().all()


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_resume_after_kill_equals_uninterrupted_run(world: dict, tmp_path: Path, variant: str) -> None:
    straight = make_job(world, tmp_path / "straight", variant)
    killed = make_job(world, tmp_path / "killed", variant)
    expected = train_prompt(straight)
    with pytest.raises(TrainingStopped, match="after step 3"):
        train_prompt(killed, stop_after=3)
    state = torch.load(killed.checkpoint_path, weights_only=True)
    assert state["step"] == 2 and len(state["losses"]) == 2  # step 3 was lost with the "kill"
    assert pd.read_csv(killed.curve)["step"].tolist() == [1, 2]
    resumed = train_prompt(killed)
    assert resumed == replace(expected, output=killed.output)
    a, b = load_file(straight.output), load_file(killed.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(straight.curve).equals(pd.read_csv(killed.curve))
    final_a = torch.load(straight.checkpoint_path, weights_only=True)
    final_b = torch.load(killed.checkpoint_path, weights_only=True)
    assert all(torch.equal(final_a["prompt"][k], final_b["prompt"][k]) for k in final_a["prompt"])
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in final_a["optimizer"]["state"].values()]
    moments_b = [(s["exp_avg"], s["exp_avg_sq"]) for s in final_b["optimizer"]["state"].values()]
    assert all(
        torch.equal(x, y) for m, n in zip(moments, moments_b, strict=True) for x, y in zip(m, n, strict=True)
    )
    assert torch.equal(final_a["generator"], final_b["generator"])
    again = train_prompt(killed)  # a finished run reruns as a no-op with the same result
    assert again == resumed


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_two_processes_equal_one_process_with_accumulation(world: dict, tmp_path: Path, variant: str) -> None:
    """DDP over 2 CPU processes (gloo, torchrun) and 1 process x 2 accumulation steps draw the same pairs,
    latents and noise, so they train the same prompt."""
    settings = dict(steps=4, per_device_batch=1)
    one = make_job(world, tmp_path / "one", variant, trn="trn4.parquet", **settings)
    two = make_job(world, tmp_path / "two", variant, trn="trn4.parquet", **settings)
    train_prompt(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, "-m", "sd4match.training", str(write_job(two))], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) x 1 accumulation x 1" in done.stderr
    a, b = load_file(one.output), load_file(two.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(one.curve).equals(pd.read_csv(two.curve))


def test_changed_settings_refuse_the_checkpoint(world: dict, tmp_path: Path) -> None:
    job = make_job(world, tmp_path, steps=2)
    train_prompt(job)
    changed = replace(job, settings=replace(job.settings, lr=0.02))
    with pytest.raises(
        ValueError, match=r"checkpoint .*checkpoint\.pt belongs to another training configuration"
    ):
        train_prompt(changed)
    bookkeeping = replace(job, settings=replace(job.settings, log_every=5, checkpoint_every=1))
    assert train_prompt(bookkeeping).steps_done == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(world, tmp_path, steps=8, checkpoint_every=2)
    calls = []
    real_loss = training.matching_loss

    def loss_nan_at_step_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(training, "matching_loss", loss_nan_at_step_5)
    with pytest.raises(FloatingPointError, match=r"at step 5"):
        train_prompt(job)
    state = torch.load(job.checkpoint_path, weights_only=True)
    assert state["step"] == 4 and all(math.isfinite(v) for v in state["losses"])
    assert not Path(job.output).exists()
    assert sorted(os.listdir(job.out_dir)) == ["checkpoint.pt"]  # no temporary file left behind


def test_gradient_checkpointing_gives_the_same_run(world: dict, tmp_path: Path) -> None:
    plain = make_job(world, tmp_path / "plain", steps=3)
    checkpointed = make_job(world, tmp_path / "checkpointed", steps=3, gradient_checkpointing=True)
    trainer = PromptTrainer(checkpointed)
    assert trainer.components.unet.up_blocks[1].gradient_checkpointing
    trainer.run()
    train_prompt(plain)
    assert pd.read_csv(plain.curve).equals(pd.read_csv(checkpointed.curve))


def test_frozen_models_are_unchanged_and_get_no_gradients(world: dict, tmp_path: Path) -> None:
    trainer = PromptTrainer(make_job(world, tmp_path, "cpm", steps=3))
    trainer.run()
    reference = load_stable_diffusion(world["sd_dir"])
    for name in ("unet", "vae", "text_encoder"):
        trained = dict(getattr(trainer.components, name).named_parameters())
        for key, param in getattr(reference, name).named_parameters():
            assert not trained[key].requires_grad and trained[key].grad is None, f"{name}.{key}"
            assert torch.equal(trained[key], param), f"{name}.{key}"
    assert all(p.requires_grad for p in trainer.prompt_module.parameters())


# ----------------------------------------------------------------------------------------------- validation


def test_validation_picks_the_best_step_and_the_prompt_reloads(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = iter([10.0, 30.0, 30.0])  # steps 2, 4, 6: the tie keeps step 4
    monkeypatch.setattr(PromptTrainer, "validate", lambda self: next(scripted))
    job = make_job(world, tmp_path / "long", "class")
    result = train_prompt(job)
    assert (result.best_step, result.best_val_pck, result.steps_done) == (4, 30.0, 6)
    curve = pd.read_csv(job.curve)
    assert curve["val_pck"].tolist()[1::2] == [10.0, 30.0, 30.0] and curve["val_pck"][0::2].isna().all()
    c = world["components"]
    module, meta = load_prompt(job.output, c.text_encoder, c.tokenizer)
    assert module.categories == ["aeroplane", "car"]
    assert (
        meta["config_hash"] == "abc123" and meta["variant"] == "class" and meta["training_set"] == "pfpascal"
    )
    assert (meta["step"], meta["val_pck"], meta["steps_done"], meta["val_pairs"]) == (4, 30.0, 6, 4)
    assert meta["sd_model"]["revision"] and meta["dinov2_model"] is None
    monkeypatch.setattr(PromptTrainer, "validate", lambda self: 0.0)
    short = make_job(world, tmp_path / "short", "class", steps=4)
    train_prompt(short)  # the same trajectory stopped at step 4
    at_step_4 = torch.load(short.checkpoint_path, weights_only=True)["prompt"]
    assert torch.equal(module.prompts, at_step_4["prompts"])


def test_validation_equals_the_test_time_evaluation(world: dict, tmp_path: Path) -> None:
    trainer = PromptTrainer(make_job(world, tmp_path, val_timestep=50))
    pck = trainer.validate()
    assert trainer.validate() == pck  # deterministic
    featurizer = SDFeaturizer(world["components"])
    features_for = sd_text_prompt_features(
        featurizer, trainer.prompt_module, world["base"] / "root", S, 50, 1, seed=0
    )
    per_pair = evaluate_pairs(world["val"], features_for, MatchingSettings(S, ("nn",), (0.1,)))
    assert pck == pytest.approx(per_pair["pck"].mean(), abs=1e-9)


# --------------------------------------------------------------------------------------------------- launch


def test_launch_runs_in_process_without_cuda(world: dict, tmp_path: Path) -> None:
    job = make_job(world, tmp_path, steps=2)
    path = write_job(job)
    result = launch(path, n_gpus=2)  # no CUDA here: in-process, not accelerate
    assert result.steps_done == 2 and Path(job.output).is_file()
    command = launch_command(path, 3, "fp16")
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
    assert command[5] == "3" and command[command.index("--mixed_precision") + 1] == "fp16"
    assert command[-3:] == ["-m", "sd4match.training", str(path)]
    assert training.main([]) == 2  # usage error
    assert training.main([str(path)]) == 0  # the accelerate entry point: a finished job reruns as a no-op


def test_snakemake_adapter_builds_the_job_and_trains(world: dict, tmp_path: Path) -> None:
    base = world["base"]
    out = tmp_path / "prompts" / "cpm"
    settings = {"variant": "cpm", "steps": 2, "batch_size": 2, "per_device_batch": 2, "val_every": 1}
    smk = SimpleNamespace(
        input=Namedlist(
            fromdict={
                "pairs_trn": str(base / "trn4.parquet"),
                "pairs_val": str(base / "val.parquet"),
                "data": str(base / "fetch.json"),  # a DAG dependency only: training reads the caches
                "sd_model": str(base / "sd21.json"),
                "latent_cache": str(base / "latents.safetensors"),
                "dinov2_model": str(base / "dinov2.json"),
                "dino_cache": str(base / "dino.safetensors"),
            }
        ),
        output=Namedlist(
            fromdict={"prompt": str(out / "prompt.safetensors"), "curve": str(out / "curve.csv")}
        ),
        params=Namedlist(
            fromdict={
                "settings": {**settings, "image_size": S, "precision": "fp32"},
                "cpm": {"condition": "pair", "features": "local", "global_prompt": True, "use_gn": True},
                "categories": None,
                "metadata": {"config_hash": "abc123"},
                "out_dir": str(out / "checkpoints"),
            }
        ),
        resources=SimpleNamespace(gpu=0),
        log=[str(tmp_path / "train.log")],
    )
    script = Path(__file__).resolve().parents[1] / "workflow_scripts" / "train_prompt.py"
    runpy.run_path(str(script), init_globals={"snakemake": smk})
    job = read_job(out / "checkpoints" / "job.json")
    assert job.cpm == smk.params.cpm and job.settings.steps == 2 and job.dino_cache == smk.input.dino_cache
    _, meta = load_prompt(
        out / "prompt.safetensors", world["components"].text_encoder, world["components"].tokenizer
    )
    assert meta["config_hash"] == "abc123" and meta["steps_done"] == 2
    assert pd.read_csv(out / "curve.csv")["step"].tolist() == [1, 2]
    assert "SD4Match-cpm: 4 training pairs" in (tmp_path / "train.log").read_text()
