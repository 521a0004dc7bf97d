"""``per_device_batch: auto``: the memory model on the real SD 2-1 architecture (meta device), the choice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sd4match import architectures as A
from sd4match import training_memory as M
from sd4match.training_job import AUTO, TrainSettings

GIB = M.GIB
SD21_FP32_WEIGHTS = 4 * (865_910_724 + 83_653_863 + 340_387_840)  # UNet + VAE + text encoder, published


@pytest.fixture(scope="module")
def sd21_folder(tmp_path_factory) -> Path:
    """The SD 2-1 UNet, VAE and text-encoder configs in a model folder's layout (no weights)."""
    folder = tmp_path_factory.mktemp("sd21_configs")
    A.build_unet("sd21").save_config(folder / "unet")
    A.build_vae("sd21").save_config(folder / "vae")
    A.build_text_encoder("sd21").config.save_pretrained(folder / "text_encoder")
    return folder


def test_the_largest_divisor_that_fits_is_chosen(caplog):
    model = M.MemoryModel(weights_bytes=5 * GIB, per_pair_bytes=3 * GIB)  # 5 + 3 x pairs GiB
    assert M.choose_per_device_batch(9, model, 80 * GIB) == 9  # 32 <= 79
    assert M.choose_per_device_batch(9, model, 32 * GIB) == 3  # 9 pairs: 32 > 31; 3 pairs: 14 <= 31
    assert M.choose_per_device_batch(9, model, 33 * GIB) == 9  # 32 <= 32: the reserve is 1 GiB
    assert M.choose_per_device_batch(6, model, 16 * GIB) == 3  # divisors of 6: 6 (23), 3 (14 <= 15)
    assert M.choose_per_device_batch(6, model, 12 * GIB) == 2  # 2 pairs: 11 <= 11
    with caplog.at_level(logging.WARNING, logger="sd4match.training_memory"):
        assert M.choose_per_device_batch(9, model, 8 * GIB) == 1  # 1 pair: 8 > 7, nothing fits
    assert "even 1 pair needs an estimated 8.0 GiB" in caplog.text


def test_sd21_memory_model_on_the_meta_device(sd21_folder):
    weights, _ = M.model_weights_bytes(sd21_folder)
    assert weights == SD21_FP32_WEIGHTS
    half = M.memory_model(sd21_folder, 768, half_autocast=True)
    full = M.memory_model(sd21_folder, 768, half_autocast=False)
    assert half.weights_bytes == SD21_FP32_WEIGHTS
    assert abs(full.per_pair_bytes - 2 * half.per_pair_bytes) <= 1  # fp32 activations: twice the bytes
    # the reference (the authors' whole UNet, 22 GiB at 3 pairs) is reproduced by the model it calibrates
    whole = (
        2 * M.activation_elements(A.build_unet("sd21").config, 768, None) * M.bytes_per_activation_element()
    )
    assert SD21_FP32_WEIGHTS + 3 * whole == pytest.approx(22 * GIB, rel=1e-12)
    # the truncated UNet (up_blocks[1]) keeps less than the whole one: up_blocks[2..3] run at 96 x 96
    assert 0.3 * whole < half.per_pair_bytes < 0.6 * whole
    small = M.memory_model(sd21_folder, 384, half_autocast=True)
    assert 0.2 * half.per_pair_bytes < small.per_pair_bytes < 0.3 * half.per_pair_bytes  # ~ (384/768)^2


@pytest.mark.parametrize(("gpu_gib", "pairs"), [(80, 9), (40, 9), (24, 3), (16, 3), (12, 1)])
def test_sd21_at_768_px_per_gpu(sd21_folder, monkeypatch, gpu_gib, pairs):
    """What auto chooses for the paper's training (9 pairs per step, one GPU, fp16) on common GPUs."""
    monkeypatch.setattr(M, "device_memory_bytes", lambda device: gpu_gib * GIB)
    settings = TrainSettings(variant="single", per_device_batch=AUTO, precision="fp16")
    resolved = M.resolve_per_device_batch(settings, 1, "cuda", sd21_folder)
    assert resolved.per_device_batch == pairs and resolved.accumulation_steps(1) == 9 // pairs
    model = M.memory_model(sd21_folder, 768, half_autocast=True)
    assert model.peak(pairs) <= gpu_gib * GIB - M.RESERVE_BYTES
    bigger = [d for d in (1, 3, 9) if d > pairs]
    assert all(model.peak(d) > gpu_gib * GIB - M.RESERVE_BYTES for d in bigger)


def test_a_configured_number_is_kept_and_auto_splits_over_processes(sd21_folder, monkeypatch):
    monkeypatch.setattr(M, "device_memory_bytes", lambda device: 80 * GIB)
    fixed = TrainSettings(variant="cpm", per_device_batch=1)
    assert M.resolve_per_device_batch(fixed, 1, "cuda", sd21_folder) is fixed
    auto = TrainSettings(variant="cpm", per_device_batch=AUTO, batch_size=9)
    assert M.resolve_per_device_batch(auto, 3, "cuda", sd21_folder).per_device_batch == 3  # 9 / 3 GPUs
    with pytest.raises(ValueError, match=r"batch_size \(9\) must be split evenly over num_processes \(2\)"):
        M.resolve_per_device_batch(auto, 2, "cuda", sd21_folder)
    with pytest.raises(ValueError, match="per_device_batch is 'auto': choose it for the device first"):
        auto.accumulation_steps(1)
    with pytest.raises(ValueError, match="per_device_batch must be a positive integer or 'auto', got 'big'"):
        TrainSettings(variant="single", per_device_batch="big")


def test_a_checkpoint_on_a_full_disk_is_an_error_naming_it(tmp_path, monkeypatch) -> None:
    """torch's own writer reports ENOSPC as a RuntimeError without the path: the checkpoint is serialised in
    memory, so a full disk is an OSError naming the checkpoint, and no partial file is left behind."""
    import errno
    import os
    from pathlib import Path

    import torch

    from sd4match.training_state import write_checkpoint

    def full(self, data):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    target = tmp_path / "checkpoints/checkpoint.pt"
    with pytest.raises(OSError, match="checkpoint.pt") as info:
        write_checkpoint(target, {"step": 3, "prompt": {"embeds": torch.zeros(2, 4)}})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list((tmp_path / "checkpoints").iterdir()) == []
