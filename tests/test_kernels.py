"""Precision and kernels on GPU (issue 9): half-precision frozen networks with an fp32 prompt, TF32, SDPA
attention, and the compile / channels_last switches. No GPU here: a "cuda" device is simulated by
patching ``sd4match.features.half_precision_device``, and bf16 (which the CPU runs) stands in for the half
dtype; CPU runs stay fp32 and bit-identical to the plain featurizer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from torch._dynamo.eval_frame import OptimizedModule

from sd4match import features as features_module
from sd4match import zero_shot
from sd4match.caches import build_dino_cache, cache_meta
from sd4match.data_sources import DatasetLocation, write_location
from sd4match.datasets import parse_pfwillow, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfwillow
from sd4match.evaluation import PromptModels, run_prompt_evaluation
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.features import (
    KernelSettings,
    SDFeaturizer,
    attention_backends,
    compile_blocks,
    enable_tf32,
    load_sd_featurizer,
    uses_sdpa,
)
from sd4match.fetch import extract
from sd4match.models import (
    ModelSpec,
    load_dinov2,
    load_stable_diffusion,
    read_model_record,
    resolve_model,
    write_model_record,
)
from sd4match.prompt_learning import CPMConfig, build_prompt_module, load_prompt, save_prompt
from sd4match.prompts import encode_text
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion

S = 64
FEATURES = {"precision": "bf16", "up_block_index": 1, "max_unet_batch": 8}
TINY_CPM = CPMConfig(dino_dim=32, n_patches=256)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("kernels")
    images_zip, pairs_csv = make_pfwillow(base / "archives", DemoWorldSpec())
    extract(images_zip, base / "root")
    pairs = parse_pfwillow(base / "root", pairs_csv).head(12)
    sd_dir = build_tiny_stable_diffusion(base / "sd21", seed=0)
    dino_dir = build_tiny_dinov2(base / "dinov2", seed=0)
    dino_record = resolve_model(ModelSpec(name="dinov2", id=str(dino_dir), kind="dinov2"))
    model, processor = load_dinov2(dino_dir)
    meta = cache_meta(dino_record, None, "dino", processor=processor)
    build_dino_cache([pairs], base / "root", model, processor, base / "dino.safetensors", meta)
    write_pairs_table(pairs, base / "pairs.parquet")
    write_location(DatasetLocation("pfwillow", str(base / "root")), base / "fetch.json")
    write_model_record(
        resolve_model(ModelSpec(name="sd21", id=str(sd_dir), kind="stable_diffusion")), base / "sd21.json"
    )
    write_model_record(dino_record, base / "dinov2.json")
    return {"base": base, "sd": sd_dir, "dino": dino_dir}


@pytest.fixture
def simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the precision policy treat every device as a GPU (the half dtype is chosen)."""
    monkeypatch.setattr(features_module, "half_precision_device", lambda device: True)


# -- dtype policy


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_weights_in_configured_precision_on_cuda_and_fp32_on_cpu(precision, dtype):
    kernels = KernelSettings.from_config({"precision": precision})
    assert kernels.weights_dtype("cuda") is dtype and kernels.weights_dtype(torch.device("cuda", 1)) is dtype
    assert kernels.weights_dtype("cpu") is torch.float32 and kernels.autocast_dtype("cpu") is None
    assert kernels.autocast_dtype("cuda:0") is (None if precision == "fp32" else dtype)
    assert not kernels.compile and not kernels.channels_last  # the safe defaults


def test_kernel_settings_read_the_switches_and_reject_bad_precision():
    kernels = KernelSettings.from_config({"precision": "fp16", "compile": True, "channels_last": True})
    assert kernels.compile and kernels.channels_last
    with pytest.raises(ValueError, match="features.precision"):
        KernelSettings(precision="fp8")


def test_tf32_enabled_on_cuda_only():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        assert enable_tf32("cpu") is False
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert enable_tf32("cuda:0") is True
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


# -- half-precision loading (simulated GPU)


def test_simulated_gpu_loads_frozen_networks_in_half_and_keeps_the_prompt_fp32(
    world, simulated_gpu, tmp_path
):
    featurizer = load_sd_featurizer(str(world["sd"]), FEATURES, "cpu")
    for module in (featurizer.unet, featurizer.vae, featurizer.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert featurizer.autocast_dtype is torch.bfloat16
    for variant, cpm in (("single", None), ("cpm", TINY_CPM)):
        saved = build_prompt_module(variant, featurizer.text_encoder, featurizer.tokenizer, cpm=cpm)
        assert {p.dtype for p in saved.parameters()} | {b.dtype for b in saved.buffers()} == {torch.float32}
        save_prompt(saved, tmp_path / f"{variant}.safetensors", {})
        module, _ = load_prompt(
            tmp_path / f"{variant}.safetensors", featurizer.text_encoder, featurizer.tokenizer
        )
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    with torch.no_grad(), featurizer.autocast():
        hidden = encode_text(featurizer.text_encoder, featurizer.tokenizer, ["a photo of a cat"])
    feats = featurizer.extract_from_latents(torch.randn(2, 4, S // 8, S // 8), hidden, 50, 2)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_cpu_loads_fp32_and_features_equal_the_plain_featurizer(world):
    featurizer = load_sd_featurizer(str(world["sd"]), FEATURES, "cpu")
    assert {p.dtype for p in featurizer.unet.parameters()} == {torch.float32}
    assert featurizer.autocast_dtype is None
    plain = SDFeaturizer(load_stable_diffusion(world["sd"]), max_batch=8)
    with torch.no_grad():
        hidden = encode_text(plain.text_encoder, plain.tokenizer, ["a photo of a cat"])
    latents = torch.randn(2, 4, S // 8, S // 8, generator=torch.Generator().manual_seed(0))
    got = featurizer.extract_from_latents(latents, hidden, 50, 2, torch.Generator().manual_seed(1))
    want = plain.extract_from_latents(latents, hidden, 50, 2, torch.Generator().manual_seed(1))
    assert torch.equal(got, want)


MATCHING = {"methods": ["nn", "kernel_softmax"], "kernel_sigma": 7.0, "softmax_temperature": 0.04}


def _record_summary(record_path: Path) -> dict[str, str]:
    """The models a prompt records in its sidecar, as training writes them (evaluation checks them)."""
    record = read_model_record(record_path)
    return {"id": record.id, "revision": record.revision_resolved}


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_prompt_evaluation_runs_in_half_precision(world, simulated_gpu, tmp_path, variant):
    c = load_stable_diffusion(world["sd"])
    prompt = tmp_path / f"{variant}.safetensors"
    cpm = TINY_CPM if variant == "cpm" else None
    dino = world["base"] / "dino.safetensors" if variant == "cpm" else None
    models = {"sd_model": _record_summary(world["base"] / "sd21.json")}
    if dino:
        models["dinov2_model"] = _record_summary(world["base"] / "dinov2.json")
    save_prompt(build_prompt_module(variant, c.text_encoder, c.tokenizer, cpm=cpm), prompt, models)
    base = world["base"]
    summary = run_prompt_evaluation(
        prompt,
        PromptModels(base / "sd21.json", base / "dinov2.json" if dino else None, dino),
        SplitInputs(base / "pairs.parquet", base / "fetch.json"),
        {"timestep": 50, "ensemble": 1, "pair_batch": 4},
        JobSettings(FEATURES, MATCHING, [0.1], None, S, 0),
        JobOutputs(tmp_path / "per_pair.csv", tmp_path / "summary.csv"),
    )
    per_pair = pd.read_csv(tmp_path / "per_pair.csv")
    assert len(per_pair) == 12 * 2 and per_pair["n_correct"].between(0, per_pair["n_kps"]).all()
    assert (summary[summary.category == "All"].n_pairs == 12).all()


def test_zero_shot_vit_loads_in_the_configured_half_precision(world, simulated_gpu, monkeypatch, tmp_path):
    dtypes = []

    def recording_loader(path, device="cpu", dtype=torch.float32):
        dtypes.append(dtype)
        return load_dinov2(path, device=device, dtype=dtype)

    monkeypatch.setattr(zero_shot, "load_dinov2", recording_loader)
    base = world["base"]
    zero_shot.run_zero_shot(
        {"kind": "vit", "family": "dinov2", "model": "dinov2", "image_size": 56},
        {"model": base / "dinov2.json"},
        SplitInputs(base / "pairs.parquet", base / "fetch.json"),
        JobSettings(FEATURES, {**MATCHING, "methods": ["nn"]}, [0.1], None, S, 0),
        JobOutputs(tmp_path / "per_pair.csv", tmp_path / "summary.csv"),
    )
    assert dtypes == [torch.bfloat16]
    assert len(pd.read_csv(tmp_path / "per_pair.csv")) == 12


# -- attention, channels_last, compile


def test_diffusers_and_transformers_pick_sdpa(world):
    c = load_stable_diffusion(world["sd"])
    dino, _ = load_dinov2(world["dino"])
    backends = attention_backends(
        {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder, "dino": dino}
    )
    assert backends == {
        "unet": "AttnProcessor2_0",
        "vae": "AttnProcessor2_0",
        "text_encoder": "sdpa",
        "dino": "sdpa",
    }
    assert uses_sdpa(backends)
    c.unet.set_attn_processor(AttnProcessor())  # the pre-SDPA processor
    assert not uses_sdpa(attention_backends({"unet": c.unet}))


def test_channels_last_switch_converts_networks_and_keeps_features(world):
    latents = torch.randn(2, 4, S // 8, S // 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    plain = SDFeaturizer(load_stable_diffusion(world["sd"]))
    fast = SDFeaturizer(load_stable_diffusion(world["sd"]), kernels=KernelSettings(channels_last=True))
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    want = plain.extract_from_latents(latents, hidden, 50, 1, torch.Generator().manual_seed(2))
    got = fast.extract_from_latents(latents, hidden, 50, 1, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # fp32 convolutions in another order


def test_compile_switch_wraps_the_blocks_before_the_feature_only(world):
    components = load_stable_diffusion(world["sd"])
    unet = components.unet
    names = compile_blocks(unet, up_block_index=1, backend="eager")
    n_down = len(unet.down_blocks)
    assert names == ["conv_in", "time_embedding", "mid_block"] + [
        f"down_blocks.{i}" for i in range(n_down)
    ] + [
        "up_blocks.0",
        "up_blocks.1",
    ]
    for name in ("conv_in", "time_embedding", "mid_block"):
        assert isinstance(getattr(unet, name), OptimizedModule)
    assert all(isinstance(block, OptimizedModule) for block in unet.down_blocks)
    assert [isinstance(block, OptimizedModule) for block in unet.up_blocks] == [True, True, False, False]


def test_compiled_featurizer_stops_after_the_block_and_gives_the_same_features(world):
    """With the eager backend (no code generation; ~20 s of tracing on 2 cores) the stop hook still ends the
    forward after up_blocks[1] and the features equal the plain ones up to fp32 reordering."""
    latents = torch.randn(1, 4, S // 8, S // 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    plain = SDFeaturizer(load_stable_diffusion(world["sd"]))
    compiled = SDFeaturizer(
        load_stable_diffusion(world["sd"]), kernels=KernelSettings(compile=True, compile_backend="eager")
    )
    assert isinstance(compiled.unet.up_blocks[1], OptimizedModule)
    want = plain.extract_from_latents(latents, hidden, 50, 1, torch.Generator().manual_seed(2))
    got = compiled.extract_from_latents(latents, hidden, 50, 1, torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert compiled.unet_passes == 1
