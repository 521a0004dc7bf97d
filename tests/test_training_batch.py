"""Pairs per call and prompts per step inside training (tiny world of tests/test_training.py, CPU):
``per_device_batch`` 1, 3, 9 and auto train the same prompt; each distinct prompt is encoded once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_training import cpu_one_thread, make_job, world  # noqa: F401  (module fixtures)

from sd4match.bench_passes import count_samples
from sd4match.training import PairSampler, PromptTrainer, TrainingStopped, train_prompt

NINE = dict(batch_size=9, steps=3, val_every=3, checkpoint_every=1)


def _assert_same_run(reference, other) -> None:
    """Same prompt to float tolerance, same validations. Batched calls round differently (~1e-7), which Adam's
    normalised step lifts to ~1e-5 on an element whose gradient is ~0; other draws of latents or noise move
    elements by up to lr = 1e-2 per step."""
    a, b = load_file(reference.output), load_file(other.output)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)
    curve_a, curve_b = pd.read_csv(reference.curve), pd.read_csv(other.curve)
    assert curve_a["step"].tolist() == curve_b["step"].tolist()
    assert curve_a["loss"].tolist() == pytest.approx(curve_b["loss"].tolist(), rel=1e-5)
    pd.testing.assert_series_equal(curve_a["val_pck"], curve_b["val_pck"])


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_pairs_per_call_do_not_change_the_trained_prompt(world, tmp_path: Path, variant: str) -> None:  # noqa: F811
    """9 pairs per step as 9 calls of 1, 3 calls of 3 or one call of 9 (auto takes 9 here: tiny models, CPU
    RAM): every pair draws its latents and noise from its own generator, whatever call it is in."""
    trainers = {}
    for pairs in (1, 3, 9, "auto"):
        trainer = PromptTrainer(
            make_job(world, tmp_path / str(pairs), variant, per_device_batch=pairs, **NINE)
        )
        trainer.run()
        trainers[pairs] = trainer
    split = {k: (t.settings.per_device_batch, t.accumulation) for k, t in trainers.items()}
    assert split == {1: (1, 9), 3: (3, 3), 9: (9, 1), "auto": (9, 1)}
    assert trainers[9].featurizer.max_batch == 18  # both images of 9 pairs in one UNet call
    for pairs in (3, 9, "auto"):
        _assert_same_run(trainers[1].job, trainers[pairs].job)


def test_a_run_killed_with_3_pairs_per_call_resumes_with_9(world, tmp_path: Path) -> None:  # noqa: F811
    """Moved to a larger GPU (or back to a smaller one) after a kill: the pairs per call are no part of the
    run's identity, and the resumed run ends as the uninterrupted one."""
    killed = make_job(world, tmp_path / "killed", "single", per_device_batch=3, **NINE)
    with pytest.raises(TrainingStopped):
        train_prompt(killed, stop_after=2)
    moved = make_job(world, tmp_path / "killed", "single", per_device_batch=9, **NINE)
    trainer = PromptTrainer(moved)
    assert trainer.resume() and trainer.progress.step == 2
    trainer.run()
    uninterrupted = make_job(world, tmp_path / "whole", "single", per_device_batch=3, **NINE)
    train_prompt(uninterrupted)
    _assert_same_run(uninterrupted, moved)


def _chunk_categories(trainer: PromptTrainer, seed: int, per_call: int) -> list[int]:
    """Distinct categories of each call of a step's first batch (the sampler's first 9 pairs)."""
    indices = PairSampler(len(trainer.train_pairs), seed).take(9)
    cats = [trainer.train_pairs[i].category for i in indices]
    return [len(set(cats[i : i + per_call])) for i in range(0, 9, per_call)]


@pytest.mark.parametrize("variant", ["single", "class", "cpm"])
def test_each_distinct_prompt_goes_through_the_text_encoder_once(world, tmp_path: Path, variant: str) -> None:  # noqa: F811
    trainer = PromptTrainer(make_job(world, tmp_path, variant, per_device_batch=3, **NINE))
    watched = {"text": trainer.components.text_encoder}
    with count_samples(watched) as step:
        trainer.train_step(1)
    with count_samples(watched) as validation:
        trainer.validate()
    val = trainer.data.val
    per_step = {
        "single": 3,  # one prompt per call of 3 pairs (it was 2 x 3 per call: one per image)
        "class": sum(_chunk_categories(trainer, trainer.settings.seed, 3)),  # one per category in the call
        "cpm": 9,  # one per pair, shared by its two images (it was two)
    }
    per_validation = {
        "single": 1,  # once per validation pass (it was once per distinct validation image)
        "class": val["category"].nunique(),
        "cpm": len(val),
    }
    assert step["text"] == per_step[variant]
    assert validation["text"] == per_validation[variant]
