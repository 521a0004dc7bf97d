"""Prompt tuning on the tiny world (tiny SD 2-1 / DINOv2, demo PF-Pascal with flipped pairs), on CPU."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from snakemake.iocontainers import Namedlist

from sd4match import training
from sd4match.caches import HEADER_META_KEY, build_dino_cache, build_latent_cache, cache_meta
from sd4match.caches import sidecar_path as cache_sidecar
from sd4match.datasets import parse_pfpascal, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfpascal
from sd4match.evaluation import MatchingSettings, evaluate_pairs, sd_text_prompt_features
from sd4match.features import SDFeaturizer
from sd4match.fetch import extract
from sd4match.models import (
    ModelSpec,
    load_dinov2,
    load_stable_diffusion,
    read_model_record,
    resolve_model,
    write_model_record,
)
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
from sd4match.training_data import SEED_MODULUS

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
    with pytest.raises(ValueError, match=r"batch_semantics must be one of \('paper', 'authors_code'\)"):
        TrainSettings(variant="single", batch_semantics="ddp")


def test_model_selection_defaults_are_the_authors() -> None:
    """The authors validate with the training settings: t = 261 (ensemble 1 and NN PCK@0.1 are the
    Validator's, see test_validation_equals_the_test_time_evaluation), whole val split, once per epoch."""
    settings = TrainSettings(variant="cpm")
    assert (settings.val_timestep, settings.timestep, settings.val_every, settings.val_max_pairs) == (
        261,
        261,
        "epoch",
        None,
    )
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    training_config = config["sd4match"]["training"]
    assert TrainSettings.from_dict({**training_config, "variant": "cpm"}, "config.yaml") == replace(
        settings, steps=30000, checkpoint_every=500, log_every=50, per_device_batch="auto"
    )  # the config lets the device choose the pairs per call (the result does not depend on it)


def test_batch_semantics_authors_code_is_rank_0_of_the_authors_run() -> None:
    """The authors' 3 GPUs each trained their own copy on 3 pairs per step (DDP bypassed): one process, one
    chunk of per_device_batch pairs per step, the same pair stream and epochs as the paper setting."""
    paper = TrainSettings(variant="single")
    authors = TrainSettings(variant="single", batch_semantics="authors_code")
    assert (paper.effective_batch, authors.effective_batch) == (9, 3)
    assert authors.accumulation_steps(1) == 1
    with pytest.raises(
        ValueError, match=r"'authors_code' trains one copy .* not 3; set the config's gpu.train"
    ):
        authors.accumulation_steps(3)
    # validated once per epoch of the authors' run: 53,340 SPair pairs / (3 GPUs x 3 pairs) = 5,927 steps
    assert authors.validation_interval(53_340) == paper.validation_interval(53_340) == 5_927


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


@pytest.mark.parametrize("variant", ["single", "class", "cpm"])
def test_two_processes_equal_one_process_with_accumulation(world: dict, tmp_path: Path, variant: str) -> None:
    """DDP over 2 CPU processes (gloo, torchrun) and 1 process x 2 accumulation steps draw the same pairs,
    latents and noise, so they train the same prompt (Class: a category in neither process's pair keeps no
    gradient, as in one process; DDP is told some parameters go unused)."""
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


def test_authors_code_step_is_rank_0s_step_of_the_authors_run(world: dict, tmp_path: Path) -> None:
    """batch_semantics authors_code: a step draws batch_size pairs like the paper setting and trains on the
    first per_device_batch of them (rank 0's share, its chunk seed), one Adam step on their loss alone."""
    settings = dict(batch_size=2, per_device_batch=1, batch_semantics="authors_code")
    trainer = PromptTrainer(make_job(world, tmp_path / "a", **settings))
    reference = PromptTrainer(make_job(world, tmp_path / "b", **settings))
    assert trainer.accumulation == 1
    trainer.train_step(1)
    first = PairSampler(len(reference.train_pairs), 0).take(2)[0]
    step_seed = int(torch.randint(0, SEED_MODULUS, (1,), generator=torch.Generator().manual_seed(0)))
    loss = reference.chunk_loss([reference.train_pairs[first]], torch.Generator().manual_seed(step_seed))
    loss.backward()
    reference.optimizer.step()
    trained = dict(trainer.prompt_module.named_parameters())
    by_hand = dict(reference.prompt_module.named_parameters())
    assert trained.keys() == by_hand.keys() and all(torch.equal(trained[k], by_hand[k]) for k in trained)
    initial = dict(
        PromptTrainer(make_job(world, tmp_path / "c", **settings)).prompt_module.named_parameters()
    )
    assert not all(torch.equal(trained[k], initial[k]) for k in trained)


def test_authors_code_run_sees_rank_0s_share_of_each_step(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real = PromptTrainer.chunk_loss

    def spy(self: PromptTrainer, pairs, generator):
        seen.append([pair.pair_id for pair in pairs])
        return real(self, pairs, generator)

    monkeypatch.setattr(PromptTrainer, "chunk_loss", spy)
    settings = dict(steps=3, batch_size=2, per_device_batch=1, val_every=3, checkpoint_every=3)
    job = make_job(world, tmp_path, **settings, batch_semantics="authors_code")
    trainer = PromptTrainer(job)
    trainer.run()
    order = PairSampler(len(trainer.train_pairs), 0).take(6)
    assert seen == [[trainer.train_pairs[order[i]].pair_id] for i in (0, 2, 4)]
    assert trainer.sampler.state_dict()["position"] == 6  # the whole 3-GPU stream was drawn
    with pytest.raises(ValueError, match=r"'authors_code' trains one copy .* given 2 GPUs"):
        launch(write_job(job), n_gpus=2)


def test_changed_settings_refuse_the_checkpoint(world: dict, tmp_path: Path) -> None:
    job = make_job(world, tmp_path, steps=4)
    with pytest.raises(TrainingStopped):  # an interrupted run: a finished one is never resumed (issue 7)
        train_prompt(job, stop_after=3)
    changed = replace(job, settings=replace(job.settings, lr=0.02))
    with pytest.raises(
        ValueError, match=r"checkpoint .*checkpoint\.pt belongs to another training configuration"
    ):
        train_prompt(changed)
    bookkeeping = replace(job, settings=replace(job.settings, log_every=5, checkpoint_every=1))
    assert train_prompt(bookkeeping).steps_done == 4


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


# ------------------------------------------------------------------------------------ reruns and identity


def count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the optimiser steps every trainer of this test runs."""
    steps: list[int] = []
    real = PromptTrainer.train_step

    def spy(self: PromptTrainer, step: int) -> float:
        steps.append(step)
        return real(self, step)

    monkeypatch.setattr(PromptTrainer, "train_step", spy)
    return steps


def copy_cache(source: Path, target: Path, meta_changes: dict | None = None, scale: float = 1.0) -> Path:
    """A copy of a cache file (and sidecar) with changed meta and/or its first tensor scaled."""
    with safe_open(source, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * scale
    meta = {**json.loads(cache_sidecar(source).read_text()), **(meta_changes or {})}
    save_file(tensors, target, metadata={HEADER_META_KEY: json.dumps(meta, sort_keys=True)})
    cache_sidecar(target).write_text(json.dumps(meta))
    return target


def changed_input(world: dict, job: TrainJob, tmp_path: Path, change: str) -> TrainJob:
    """``job`` with one result-changing input changed, the number of pairs kept."""
    base = world["base"]
    if change == "lr":
        return replace(job, settings=replace(job.settings, lr=0.02))
    if change == "pairs_trn":
        table = pd.read_parquet(job.pairs_trn)
        kps = [list(map(list, k)) for k in table["trg_kps"]]
        kps[0][0] = [kps[0][0][0] + 1.0, kps[0][0][1]]  # one keypoint moved by one pixel
        table["trg_kps"] = kps
        table.to_parquet(tmp_path / "trn_moved.parquet", index=False)
        return replace(job, pairs_trn=str(tmp_path / "trn_moved.parquet"))
    if change == "latent_cache":
        moved = copy_cache(Path(job.latent_cache), tmp_path / "latents.safetensors", scale=1.01)
        return replace(job, latent_cache=str(moved))
    if change == "dino_cache":
        moved = copy_cache(Path(job.dino_cache), tmp_path / "dino.safetensors", scale=1.01)
        return replace(job, dino_cache=str(moved))
    assert change == "sd_model"  # a new revision of the model, and its latent cache rebuilt
    record = replace(read_model_record(base / "sd21.json"), revision_resolved="0123456789abcdef")
    write_model_record(record, tmp_path / "sd21.json")
    meta = {"revision_resolved": record.revision_resolved}
    latents = copy_cache(Path(job.latent_cache), tmp_path / "latents.safetensors", meta)
    return replace(job, sd_model=str(tmp_path / "sd21.json"), latent_cache=str(latents))


def test_a_finished_run_retrains_when_rerun(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--forcerun train_prompt`` or a deleted prompt reruns the rule: it trains again, from step 1."""
    job = make_job(world, tmp_path, steps=4)
    first = train_prompt(job)
    prompt_bytes = Path(job.output).read_bytes()
    Path(job.output).unlink()
    steps = count_steps(monkeypatch)
    again = train_prompt(job)
    assert steps == [1, 2, 3, 4]
    assert again == first and Path(job.output).read_bytes() == prompt_bytes


def test_only_an_interrupted_run_resumes(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(world, tmp_path, steps=4)
    with pytest.raises(TrainingStopped):
        train_prompt(job, stop_after=3)  # killed after step 3: the checkpoint holds step 2
    steps = count_steps(monkeypatch)
    train_prompt(job)
    assert steps == [3, 4]


def test_a_run_killed_for_memory_resumes_with_gradient_checkpointing(world: dict, tmp_path: Path) -> None:
    """Gradient checkpointing changes memory, not results: switching it on resumes the interrupted run."""
    straight = make_job(world, tmp_path / "straight", steps=4)
    killed = make_job(world, tmp_path / "killed", steps=4)
    train_prompt(straight)
    with pytest.raises(TrainingStopped):
        train_prompt(killed, stop_after=3)
    resumed = replace(killed, settings=replace(killed.settings, gradient_checkpointing=True))
    trainer = PromptTrainer(resumed)
    assert trainer.resume() and trainer.progress.step == 2
    trainer.run()
    assert Path(resumed.output).read_bytes() == Path(straight.output).read_bytes()


@pytest.mark.parametrize(
    ("variant", "change", "named"),
    [
        ("single", "lr", "settings.lr: 0.01 -> 0.02"),
        ("single", "pairs_trn", "pairs_trn: content"),
        ("single", "latent_cache", "latent_cache: content"),
        ("single", "sd_model", "sd_model: "),
        ("cpm", "dino_cache", "dino_cache: content"),
    ],
)
def test_an_interrupted_run_with_a_changed_input_names_it_and_how_to_start_over(
    world: dict, tmp_path: Path, variant: str, change: str, named: str
) -> None:
    """Settings, training data, caches and model revisions are the run's identity: a checkpoint of another
    identity is never resumed; the error names what changed and the command that starts over."""
    job = make_job(world, tmp_path / "run", variant, steps=4)
    with pytest.raises(TrainingStopped):
        train_prompt(job, stop_after=3)
    changed = changed_input(world, job, tmp_path, change)
    with pytest.raises(ValueError, match="belongs to another training configuration") as error:
        train_prompt(changed)
    message = str(error.value)
    assert named in message, message
    assert f"rm {job.checkpoint_path}" in message
    assert "0.01 -> 0.02" not in message or change == "lr"  # only what changed is named


def test_a_changed_setting_after_a_finished_run_starts_a_new_run(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(world, tmp_path / "run", steps=2)
    train_prompt(job)
    changed = replace(job, settings=replace(job.settings, lr=0.02))
    steps = count_steps(monkeypatch)
    train_prompt(changed)
    assert steps == [1, 2]
    fresh = make_job(world, tmp_path / "fresh", steps=2, lr=0.02)
    train_prompt(fresh)
    assert Path(changed.output).read_bytes() == Path(fresh.output).read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_an_unreadable_checkpoint_names_the_file_and_what_to_do(
    world: dict, tmp_path: Path, damage: str
) -> None:
    job = make_job(world, tmp_path, steps=4)
    with pytest.raises(TrainingStopped):
        train_prompt(job, stop_after=3)
    path = job.checkpoint_path
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint\n")
    else:
        torch.save({"step": 2}, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}")) as error:
        train_prompt(job)
    assert f"rm {path}" in str(error.value)


# ------------------------------------------------------------------------------------- non-finite gradients


class NaNGradient(torch.autograd.Function):
    """Identity forwards, NaN gradient backwards: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad * float("nan")


def nan_gradient_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """matching_loss with finite values but NaN gradients at the given steps (one loss call per step)."""
    calls: list[int] = []
    real_loss = training.matching_loss

    def loss(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        return NaNGradient.apply(value) if len(calls) in steps else value

    monkeypatch.setattr(training, "matching_loss", loss)


def scaler_accelerator():
    """A CPU accelerator with an fp16-style grad scaler, as accelerate gives a CUDA fp16 run."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


def record_prompts(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, torch.Tensor]]:
    """The prompt after every optimiser step."""
    prompts: dict[int, dict[str, torch.Tensor]] = {}
    real = PromptTrainer.after_step

    def after_step(self: PromptTrainer, step: int) -> None:
        prompts[step] = {k: v.detach().clone() for k, v in self.prompt_module.state_dict().items()}
        real(self, step)

    monkeypatch.setattr(PromptTrainer, "after_step", after_step)
    return prompts


def finite_checkpoint(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["prompt"].values())
    return state


def test_a_nan_gradient_with_a_finite_loss_is_never_stepped_or_checkpointed(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a grad scaler (fp32, bf16, CPU) a non-finite gradient stops the run at that step."""
    job = make_job(world, tmp_path, steps=6, checkpoint_every=1)
    nan_gradient_at(monkeypatch, {3})
    with pytest.raises(FloatingPointError, match=r"non-finite gradient .*at step 3"):
        train_prompt(job)
    assert finite_checkpoint(job.checkpoint_path)["step"] == 2
    assert not Path(job.output).exists()


def test_a_step_the_grad_scaler_skipped_leaves_the_prompt_unchanged_and_is_counted(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(world, tmp_path, steps=4, checkpoint_every=1)
    nan_gradient_at(monkeypatch, {3})
    prompts = record_prompts(monkeypatch)
    result = PromptTrainer(job, scaler_accelerator()).run()
    assert result.steps_done == 4
    assert all(torch.equal(prompts[3][k], prompts[2][k]) for k in prompts[2])  # skipped: not updated
    assert not all(torch.equal(prompts[4][k], prompts[3][k]) for k in prompts[3])
    assert finite_checkpoint(job.checkpoint_path)["skipped_steps"] == [3]
    c = world["components"]
    assert load_prompt(job.output, c.text_encoder, c.tokenizer)[1]["skipped_steps"] == 1


def test_a_run_the_grad_scaler_skips_again_and_again_stops(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "MAX_CONSECUTIVE_SKIPS", 3)
    job = make_job(world, tmp_path, steps=8, checkpoint_every=1)
    nan_gradient_at(monkeypatch, set(range(3, 9)))
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*skipped.*at step 5"):
        PromptTrainer(job, scaler_accelerator()).run()
    state = finite_checkpoint(job.checkpoint_path)
    assert state["step"] == 4 and state["skipped_steps"] == [3, 4]


def test_a_non_finite_prompt_is_never_checkpointed(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(world, tmp_path, steps=6, checkpoint_every=1)
    real = PromptTrainer.train_step

    def poisoned(self: PromptTrainer, step: int) -> float:
        loss = real(self, step)
        if step == 3:
            with torch.no_grad():
                next(self.prompt_module.parameters()).view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(PromptTrainer, "train_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite prompt .*step 3"):
        train_prompt(job)
    assert finite_checkpoint(job.checkpoint_path)["step"] == 2


def test_identical_runs_write_byte_identical_prompts(world: dict, tmp_path: Path) -> None:
    first, second = (make_job(world, tmp_path / name, "cpm", steps=2) for name in ("first", "second"))
    train_prompt(first)
    train_prompt(second)
    for suffix in ("", ".json"):
        assert Path(first.output + suffix).read_bytes() == Path(second.output + suffix).read_bytes()


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
    assert (meta["val_timestep"], meta["effective_batch"], meta["batch_semantics"]) == (261, 2, "paper")
    assert meta["sd_model"]["revision"] and meta["dinov2_model"] is None
    monkeypatch.setattr(PromptTrainer, "validate", lambda self: 0.0)
    short = make_job(world, tmp_path / "short", "class", steps=4)
    train_prompt(short)  # the same trajectory stopped at step 4
    at_step_4 = torch.load(short.checkpoint_path, weights_only=True)["prompt"]
    assert sorted(at_step_4) == ["prompts.0", "prompts.1"]  # aeroplane, car: one tensor per category
    assert all(torch.equal(p, at_step_4[f"prompts.{i}"]) for i, p in enumerate(module.prompts))


def test_validation_equals_the_test_time_evaluation(world: dict, tmp_path: Path) -> None:
    """Model selection scores the prompt as the test-time evaluation would at the authors' validation
    settings: t = 261 (the default), ensemble 1, nearest neighbour, PCK@0.1, every val pair."""
    trainer = PromptTrainer(make_job(world, tmp_path))
    assert trainer.settings.val_timestep == 261
    pck = trainer.validate()
    assert trainer.validate() == pck  # deterministic
    featurizer = SDFeaturizer(world["components"])
    features_for = sd_text_prompt_features(
        featurizer, trainer.prompt_module, world["base"] / "root", S, 261, 1, seed=0
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


def test_authors_code_needs_a_number_and_keeps_it_in_the_run_identity() -> None:
    """Under authors_code per_device_batch *is* the effective batch: 'auto' is refused, and a changed value
    changes the run's identity (under the paper semantics it only trades memory for time)."""
    from sd4match.training_state import training_identity

    with pytest.raises(
        ValueError, match=r"per_device_batch must be a number with batch_semantics 'authors_code'"
    ):
        TrainSettings(variant="single", batch_semantics="authors_code", per_device_batch="auto")
    ids = {
        (semantics, pdb): training_identity(
            asdict(TrainSettings(variant="single", batch_semantics=semantics, per_device_batch=pdb)),
            None,
            None,
            {},
        )
        for semantics in ("paper", "authors_code")
        for pdb in (1, 3)
    }
    assert ids[("paper", 1)] == ids[("paper", 3)]
    assert ids[("authors_code", 1)] != ids[("authors_code", 3)]
