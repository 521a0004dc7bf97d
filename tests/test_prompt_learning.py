"""Learned prompts: Single/Class init, CPM math and ablations, gradients, optimiser groups, save/load."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from sd4match.models import SDComponents, load_stable_diffusion
from sd4match.prompt_learning import (
    ClassPrompt,
    ConditionalPromptModule,
    CPMConfig,
    PromptBatch,
    SinglePrompt,
    build_prompt_module,
    load_prompt,
    random_vocabulary_ids,
    save_prompt,
    sidecar_path,
)
from sd4match.prompts import PromptSource, encode_sequence, sos_eos_embeddings
from sd4match.tiny_models import build_tiny_stable_diffusion

D = 32  # tiny text encoder width
DINO = 32  # tiny DINOv2 width; 224 crop / patch 14 -> 16 x 16 = 256 patch tokens
PATCHES = 256
CATEGORIES = ["dog", "cat", "bird"]

CPM_CASES = {
    "pair_local": CPMConfig(dino_dim=DINO),
    "pair_global": CPMConfig(features="global", dino_dim=DINO),
    "individual_local": CPMConfig(condition="individual", dino_dim=DINO),
    "individual_global": CPMConfig(condition="individual", features="global", dino_dim=DINO),
    "no_global_prompt": CPMConfig(global_prompt=False, dino_dim=DINO),
    "no_gn": CPMConfig(use_gn=False, dino_dim=DINO),
}


@pytest.fixture(scope="session")
def sd(tmp_path_factory: pytest.TempPathFactory) -> SDComponents:
    folder = build_tiny_stable_diffusion(tmp_path_factory.mktemp("prompt_learning_sd") / "sd21", seed=0)
    return load_stable_diffusion(folder)


def make_batch(categories: list[str], seed: int = 0) -> PromptBatch:
    generator = torch.Generator().manual_seed(seed)
    size = len(categories)
    return PromptBatch(
        categories=categories,
        src_tokens=torch.randn(size, PATCHES, DINO, generator=generator),
        trg_tokens=torch.randn(size, PATCHES, DINO, generator=generator),
        src_global=torch.randn(size, DINO, generator=generator),
        trg_global=torch.randn(size, DINO, generator=generator),
    )


def build(sd: SDComponents, case: str, seed: int = 0):
    if case == "single":
        return build_prompt_module("single", sd.text_encoder, sd.tokenizer, seed=seed)
    if case == "class":
        return build_prompt_module("class", sd.text_encoder, sd.tokenizer, categories=CATEGORIES, seed=seed)
    return build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=CPM_CASES[case], seed=seed)


def expected_init(sd: SDComponents, count: int, seed: int) -> Tensor:
    """Token embeddings of ids drawn uniformly outside {SOS, EOS} with Generator(seed) + positions 1..75."""
    tokens = sd.text_encoder.embeddings.token_embedding.weight
    positions = sd.text_encoder.embeddings.position_embedding.weight
    special = {sd.tokenizer.bos_token_id, sd.tokenizer.eos_token_id}
    allowed = torch.tensor([i for i in range(tokens.shape[0]) if i not in special])
    draws = torch.randint(len(allowed), (count, 75), generator=torch.Generator().manual_seed(seed))
    return tokens[allowed[draws]] + positions[1:76]


def adaptive_max_pool_by_hand(hidden: Tensor, size: int) -> Tensor:
    """(B, N, D) -> (B, size, D): bin i covers [floor(i N / size), ceil((i + 1) N / size))."""
    length = hidden.shape[1]
    bins = [(math.floor(i * length / size), math.ceil((i + 1) * length / size)) for i in range(size)]
    return torch.stack([hidden[:, start:end].amax(dim=1) for start, end in bins], dim=1)


def cpm_by_hand(module: ConditionalPromptModule, inputs: Tensor, sd: SDComponents) -> Tensor:
    """[SOS, global, (p(g_n(g_d(F))) + Omega_pos) * tanh(Omega_alpha), EOS] from the module's own weights."""
    hidden = inputs @ module.g_d.weight.T + module.g_d.bias
    if module.g_n is not None:
        hidden = (hidden.transpose(1, 2) @ module.g_n.weight.T + module.g_n.bias).transpose(1, 2)
    pooled = adaptive_max_pool_by_hand(hidden, module.omega_pos.shape[0])
    cond = (pooled + module.omega_pos) * torch.tanh(module.omega_alpha)
    sos, eos = sos_eos_embeddings(sd.text_encoder, sd.tokenizer)
    size = inputs.shape[0]
    parts = [sos.expand(size, 1, D)]
    if module.global_prompt is not None:
        parts.append(module.global_prompt.expand(size, -1, -1))
    return torch.cat(parts + [cond, eos.expand(size, 1, D)], dim=1)


@pytest.mark.parametrize("case", ["single", "class", *CPM_CASES])
def test_prompts_are_sos_learned_eos(sd: SDComponents, case: str) -> None:
    module = build(sd, case)
    src, trg = module.prompt_pair(make_batch(["cat", "dog"]))
    sos, eos = sos_eos_embeddings(sd.text_encoder, sd.tokenizer)
    for prompt in (src, trg):
        assert prompt.shape == (2, 77, D)
        assert torch.equal(prompt[:, 0], sos.expand(2, D)) and torch.equal(prompt[:, 76], eos.expand(2, D))


def test_variant_flags(sd: SDComponents) -> None:
    flags = {
        case: (m.variant, m.needs_dino, m.per_image)
        for case in ("single", "class", "pair_local")
        for m in [build(sd, case)]
    }
    assert flags == {
        "single": ("single", False, True),
        "class": ("class", False, True),
        "pair_local": ("cpm", True, False),
    }
    assert isinstance(build(sd, "single"), PromptSource) and isinstance(build(sd, "class"), PromptSource)


def test_single_init_is_random_tokens_plus_positions(sd: SDComponents) -> None:
    module = build(sd, "single", seed=3)
    assert isinstance(module, SinglePrompt)
    expected = expected_init(sd, 1, seed=3)[0]
    torch.testing.assert_close(module.prompt.data, expected, atol=0, rtol=0)
    prompt = module.prompt_for_images(["cat", "bus"])
    torch.testing.assert_close(prompt[1, 1:76], expected, atol=0, rtol=0)
    assert torch.equal(prompt[0], prompt[1])
    assert not torch.equal(build(sd, "single", seed=4).prompt, module.prompt)


def test_random_vocabulary_ids_exclude_special_ids() -> None:
    ids = random_vocabulary_ids(5, {1, 3}, (2000,), seed=0)
    assert set(ids.tolist()) == {0, 2, 4}
    assert torch.equal(ids, random_vocabulary_ids(5, {1, 3}, (2000,), seed=0))
    with pytest.raises(ValueError, match="no ids left"):
        random_vocabulary_ids(2, {0, 1}, (3,), seed=0)


def test_class_prompt_picks_category_rows(sd: SDComponents) -> None:
    module = build(sd, "class", seed=1)
    assert isinstance(module, ClassPrompt)
    assert module.categories == ["bird", "cat", "dog"]
    torch.testing.assert_close(module.prompts.data, expected_init(sd, 3, seed=1), atol=0, rtol=0)
    prompt = module.prompt_for_images(["cat", "dog", "cat"])
    assert torch.equal(prompt[0], prompt[2]) and not torch.equal(prompt[0], prompt[1])
    assert torch.equal(prompt[0, 1:76], module.prompts[1]) and torch.equal(prompt[1, 1:76], module.prompts[2])
    src, trg = module.prompt_pair(make_batch(["dog", "bird"]))
    assert torch.equal(src, trg) and torch.equal(src[1, 1:76], module.prompts[0])
    with pytest.raises(ValueError, match="horse"):
        module.prompt_for_images(["cat", "horse"])


def test_cpm_pair_local_matches_hand_computation(sd: SDComponents) -> None:
    module = build(sd, "pair_local", seed=2)
    assert module.global_prompt.shape == (25, D) and module.omega_pos.shape == (50, D)
    assert module.g_d.in_features == 2 * DINO and module.g_n.in_features == PATCHES
    for name in ("global_prompt", "omega_pos", "omega_alpha"):
        values = getattr(module, name)
        assert values.min() >= 0 and values.max() < 1
    batch = make_batch(["cat", "dog"], seed=5)
    src, trg = module.prompt_pair(batch)
    assert src is trg
    expected = cpm_by_hand(module, torch.cat([batch.src_tokens, batch.trg_tokens], dim=-1), sd)
    torch.testing.assert_close(src, expected, atol=1e-5, rtol=1e-5)


def test_cpm_individual_gives_each_image_its_own_prompt(sd: SDComponents) -> None:
    module = build(sd, "individual_local")
    assert module.g_d.in_features == DINO
    batch = make_batch(["cat", "dog"], seed=6)
    src, trg = module.prompt_pair(batch)
    assert not torch.allclose(src[:, 26:76], trg[:, 26:76])
    assert torch.equal(src[:, 1:26], trg[:, 1:26])  # the global prompt is shared
    torch.testing.assert_close(src, cpm_by_hand(module, batch.src_tokens, sd), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trg, cpm_by_hand(module, batch.trg_tokens, sd), atol=1e-5, rtol=1e-5)
    other = make_batch(["cat", "dog"], seed=7)
    other.src_tokens = batch.src_tokens
    assert torch.equal(module.prompt_pair(other)[0], src)


def test_cpm_pair_prompt_depends_on_both_images(sd: SDComponents) -> None:
    module = build(sd, "pair_local")
    batch = make_batch(["cat", "dog"], seed=6)
    other = make_batch(["cat", "dog"], seed=7)
    other.src_tokens = batch.src_tokens
    assert not torch.allclose(module.prompt_pair(batch)[0], module.prompt_pair(other)[0])


def test_cpm_without_gn_skips_it(sd: SDComponents) -> None:
    module = build(sd, "no_gn")
    assert module.g_n is None
    assert not any(name.startswith("g_n") for name, _ in module.named_parameters())
    batch = make_batch(["cat"], seed=8)
    src, _ = module.prompt_pair(batch)
    expected = cpm_by_hand(module, torch.cat([batch.src_tokens, batch.trg_tokens], dim=-1), sd)
    torch.testing.assert_close(src, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["pair_global", "individual_global"])
def test_cpm_global_descriptor_is_one_token_repeated_by_pooling(sd: SDComponents, case: str) -> None:
    module = build(sd, case)
    assert module.g_n.in_features == 1
    full = make_batch(["cat", "dog"], seed=9)
    batch = PromptBatch(["cat", "dog"], src_global=full.src_global, trg_global=full.trg_global)
    src, trg = module.prompt_pair(batch)
    src_in, trg_in = batch.src_global.unsqueeze(1), batch.trg_global.unsqueeze(1)
    if case == "pair_global":
        expected_src = expected_trg = cpm_by_hand(module, torch.cat([src_in, trg_in], dim=-1), sd)
    else:
        expected_src, expected_trg = cpm_by_hand(module, src_in, sd), cpm_by_hand(module, trg_in, sd)
    torch.testing.assert_close(src, expected_src, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trg, expected_trg, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="src_global"):
        module.prompt_pair(
            PromptBatch(["cat"], src_tokens=full.src_tokens[:1], trg_tokens=full.trg_tokens[:1])
        )


def test_cpm_without_global_prompt_uses_75_conditional_tokens(sd: SDComponents) -> None:
    module = build(sd, "no_global_prompt")
    assert module.global_prompt is None
    assert module.omega_pos.shape == (75, D) and module.omega_alpha.shape == (75, D)
    assert "global_prompt" not in module.state_dict()
    batch = make_batch(["cat", "dog"], seed=10)
    src, _ = module.prompt_pair(batch)
    expected = cpm_by_hand(module, torch.cat([batch.src_tokens, batch.trg_tokens], dim=-1), sd)
    torch.testing.assert_close(src, expected, atol=1e-5, rtol=1e-5)


def test_cpm_rejects_bad_tokens(sd: SDComponents) -> None:
    module = build(sd, "pair_local")
    batch = make_batch(["cat"])
    batch.trg_tokens = torch.zeros(1, 255, DINO)
    with pytest.raises(ValueError, match=r"trg_tokens must be \(B, 256, 32\)"):
        module.prompt_pair(batch)
    with pytest.raises(ValueError, match="src_tokens is required"):
        module.prompt_pair(PromptBatch(["cat"]))


@pytest.mark.parametrize("case", ["single", "class", "pair_local", "individual_global"])
def test_gradients_reach_only_the_prompt(sd: SDComponents, case: str) -> None:
    module = build(sd, case)
    encoder_params = {p.data_ptr() for p in sd.text_encoder.parameters()}
    assert not encoder_params & {p.data_ptr() for p in module.parameters()}
    assert not any(name.startswith(("sos", "eos")) for name in module.state_dict())
    src, trg = module.prompt_pair(make_batch(["cat", "cat"]))
    loss = (
        encode_sequence(sd.text_encoder, src).square().mean() + encode_sequence(sd.text_encoder, trg).mean()
    )
    loss.backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for param in sd.text_encoder.parameters():
        assert not param.requires_grad and param.grad is None
    if case == "class":  # only the "cat" row was used
        assert module.prompts.grad[0].abs().sum() == 0 and module.prompts.grad[2].abs().sum() == 0


def test_parameter_groups(sd: SDComponents) -> None:
    single = build(sd, "single")
    (group,) = single.parameter_groups(lr=1e-2, lr_linear=1e-3)
    assert group["lr"] == 1e-2 and group["params"] == [single.prompt]
    cpm = build(sd, "pair_local")
    prompt_group, linear_group = cpm.parameter_groups(lr=1e-2, lr_linear=1e-3)
    assert (prompt_group["lr"], linear_group["lr"]) == (1e-2, 1e-3)
    linear = {id(p) for p in [cpm.g_d.weight, cpm.g_d.bias, cpm.g_n.weight, cpm.g_n.bias]}
    assert {id(p) for p in linear_group["params"]} == linear
    assert {id(p) for p in prompt_group["params"]} == {
        id(cpm.global_prompt),
        id(cpm.omega_pos),
        id(cpm.omega_alpha),
    }
    optimizer = torch.optim.Adam(cpm.parameter_groups(lr=1e-2, lr_linear=1e-3))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]


def test_seeded_construction_is_deterministic_and_leaves_global_rng(sd: SDComponents) -> None:
    torch.manual_seed(11)
    reference = torch.rand(3)
    torch.manual_seed(11)
    first = build(sd, "pair_local", seed=5)
    assert torch.equal(torch.rand(3), reference)
    second = build(sd, "pair_local", seed=5)
    third = build(sd, "pair_local", seed=6)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.g_d.weight, third.g_d.weight)


@pytest.mark.parametrize("case", ["single", "class", "pair_local", "individual_global", "no_global_prompt"])
def test_save_load_round_trip(sd: SDComponents, tmp_path: Path, case: str) -> None:
    module = build(sd, case)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    path = tmp_path / "prompt.safetensors"
    metadata = {"train": "spair/trn", "step": 120, "config_hash": "abc", "models": {"sd": "rev1"}}
    save_prompt(module, path, metadata)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["variant"] == module.variant and sidecar["hidden_size"] == D
    assert sidecar["categories"] == (["bird", "cat", "dog"] if case == "class" else None)
    assert sidecar["cpm"] == (None if case in ("single", "class") else CPM_CASES[case].__dict__)
    loaded, loaded_metadata = load_prompt(path, sd.text_encoder, sd.tokenizer)
    assert loaded_metadata == metadata and type(loaded) is type(module)
    batch = make_batch(["cat", "bird"], seed=12)
    with torch.no_grad():
        for before, after in zip(module.prompt_pair(batch), loaded.prompt_pair(batch), strict=True):
            assert torch.equal(before, after)


def test_load_prompt_errors_name_the_file(sd: SDComponents, tmp_path: Path) -> None:
    path = tmp_path / "prompt.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_prompt(path, sd.text_encoder, sd.tokenizer)
    save_prompt(build(sd, "class"), path, {"step": 1})
    side = sidecar_path(path)
    good = side.read_text()
    side.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(side))):
        load_prompt(path, sd.text_encoder, sd.tokenizer)
    broken = json.loads(good)
    del broken["variant"]
    side.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=re.escape(str(side)) + ".*variant"):
        load_prompt(path, sd.text_encoder, sd.tokenizer)
    fewer = {**json.loads(good), "categories": ["cat", "dog"]}  # 2 rows expected, file holds 3
    side.write_text(json.dumps(fewer))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_prompt(path, sd.text_encoder, sd.tokenizer)
    side.write_text(json.dumps({**json.loads(good), "hidden_size": 1024}))
    with pytest.raises(ValueError, match="hidden size 1024"):
        load_prompt(path, sd.text_encoder, sd.tokenizer)
    side.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(side))):
        load_prompt(path, sd.text_encoder, sd.tokenizer)
    with pytest.raises(ValueError, match="must end with .safetensors"):
        save_prompt(build(sd, "single"), tmp_path / "prompt.pt", {})


def test_saved_prompt_files_are_byte_identical(sd: SDComponents, tmp_path: Path) -> None:
    """The safetensors header's metadata comes out of a hash map: without sorting, its order varies."""
    module = build(sd, "pair_local")
    paths = [tmp_path / f"prompt{i}.safetensors" for i in range(12)]
    for path in paths:
        save_prompt(module, path, {"step": 3, "config_hash": "abc"})
    assert len({path.read_bytes() for path in paths}) == 1
    assert len({sidecar_path(path).read_bytes() for path in paths}) == 1


def test_non_finite_prompts_are_neither_saved_nor_loaded(sd: SDComponents, tmp_path: Path) -> None:
    module = build(sd, "single")
    path = tmp_path / "prompt.safetensors"
    with torch.no_grad():
        module.prompt.view(-1)[5] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"prompt\.safetensors: parameters \['prompt'\] are not finite"
    ):
        save_prompt(module, path, {})
    assert not path.exists() and not sidecar_path(path).exists()
    save_prompt(build(sd, "single"), path, {})
    save_file({"prompt": module.prompt.detach().clone()}, path)  # a damaged file beside a good sidecar
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*\['prompt'\] hold NaN/inf"):
        load_prompt(path, sd.text_encoder, sd.tokenizer)


@pytest.mark.parametrize(
    ("field", "value"),
    [("condition", "both"), ("features", "cls"), ("use_gn", 1), ("n_cond", 0), ("dino_dim", -3)],
)
def test_cpm_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"CPMConfig.{field}"):
        CPMConfig(**{field: value})


def test_build_prompt_module_errors(sd: SDComponents) -> None:
    with pytest.raises(ValueError, match="'prefix'"):
        build_prompt_module("prefix", sd.text_encoder, sd.tokenizer)
    with pytest.raises(ValueError, match="needs the list of categories"):
        build_prompt_module("class", sd.text_encoder, sd.tokenizer)
    with pytest.raises(ValueError, match="CPM config"):
        build_prompt_module("single", sd.text_encoder, sd.tokenizer, cpm=CPMConfig())
    with pytest.raises(ValueError, match="n_global"):
        build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=CPMConfig(n_global=20))
    with pytest.raises(ValueError, match="src_tokens"):
        PromptBatch(["cat", "dog"], src_tokens=torch.zeros(3, PATCHES, DINO))
