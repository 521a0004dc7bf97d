"""Learned prompts: Single/Class init, CPM math and ablations, gradients, optimiser groups, save/load."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
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
REPO = Path(__file__).resolve().parents[1]


def fig3a_config(case: int) -> CPMConfig:
    """The CPMConfig of Fig. 3a case ``case`` exactly as config.yaml's variant builds it (tiny DINOv2)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    variant = config["fig3a"]["cases"][case]
    options = {k: v for k, v in config["sd4match"]["variants"][variant].items() if k != "kind"}
    return CPMConfig(**options, dino_dim=DINO)


CPM_CASES = {
    "pair_local": fig3a_config(1),
    "pair_global": fig3a_config(2),
    "individual_local": fig3a_config(3),
    "individual_global": fig3a_config(4),
    "no_global_prompt": fig3a_config(5),
    "no_gn": fig3a_config(6),
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


def input_row(sd: SDComponents, token_id: int, position: int) -> Tensor:
    """CLIP input embedding of one token at one position, read from the text encoder's tables."""
    embeddings = sd.text_encoder.embeddings
    return embeddings.token_embedding.weight[token_id] + embeddings.position_embedding.weight[position]


def framed_by_hand(sd: SDComponents, learned: Tensor) -> Tensor:
    """The authors' sequence for L learned vectors: [SOS, learned, EOS at L + 1, token 0 at L + 2 .. 76]."""
    size, length = learned.shape[:2]
    sos = input_row(sd, sd.tokenizer.bos_token_id, 0)
    eos = input_row(sd, sd.tokenizer.eos_token_id, length + 1)
    pads = [input_row(sd, 0, position) for position in range(length + 2, 77)]
    tail = torch.stack([eos, *pads]).expand(size, -1, -1)
    return torch.cat([sos.expand(size, 1, D), learned, tail], dim=1)


def conditional_by_hand(weights: dict[str, Tensor], features: Tensor, local: bool) -> Tensor:
    """protocol.md's conditional part: g_d, g_n along the patch axis (if present), max-pool to 50 (patch
    tokens) or broadcast (one descriptor), + Omega_pos, * tanh(Omega_alpha)."""
    hidden = F.linear(features, weights["g_d.weight"], weights["g_d.bias"])
    if "g_n.weight" in weights:
        hidden = F.linear(hidden.transpose(1, 2), weights["g_n.weight"], weights["g_n.bias"]).transpose(1, 2)
    if local:
        hidden = adaptive_max_pool_by_hand(hidden, weights["omega_pos"].shape[0])
    else:
        hidden = hidden.expand(-1, weights["omega_pos"].shape[0], -1)
    return (hidden + weights["omega_pos"]) * torch.tanh(weights["omega_alpha"])


def cpm_by_hand(
    module: ConditionalPromptModule, batch: PromptBatch, sd: SDComponents
) -> tuple[Tensor, Tensor]:
    """(source, target) prompts of a Fig. 3a module from its weights, written from protocol.md: pair modes
    concatenate source and target along channels (one shared prompt), individual modes prompt each image
    from its own features; local = DINOv2 patch tokens, global = the descriptor as one token."""
    weights = dict(module.state_dict())
    local = module.config.features == "local"
    src, trg = (batch.src_tokens, batch.trg_tokens) if local else (batch.src_global, batch.trg_global)
    if not local:
        src, trg = src[:, None], trg[:, None]

    def prompt(features: Tensor) -> Tensor:
        cond = conditional_by_hand(weights, features, local)
        if "global_prompt" in weights:
            cond = torch.cat([weights["global_prompt"].expand(cond.shape[0], -1, -1), cond], dim=1)
        return framed_by_hand(sd, cond)

    if module.config.condition == "pair":
        shared = prompt(torch.cat([src, trg], dim=-1))
        return shared, shared
    return prompt(src), prompt(trg)


@pytest.mark.parametrize("case", ["single", "class", *CPM_CASES])
def test_prompts_are_sos_learned_eos(sd: SDComponents, case: str) -> None:
    module = build(sd, case)
    src, trg = module.prompt_pair(make_batch(["cat", "dog"]))
    sos, eos = sos_eos_embeddings(sd.text_encoder, sd.tokenizer)
    end = module.learned_length + 1  # 76, but 51 for CPM without its global prompt (padded after EOS)
    assert module.learned_length == (50 if case == "no_global_prompt" else 75)
    for prompt in (src, trg):
        assert prompt.shape == (2, 77, D)
        assert torch.equal(prompt[:, 0], sos.expand(2, D))
        assert torch.equal(prompt[:, end], input_row(sd, sd.tokenizer.eos_token_id, end).expand(2, D))
        if end == 76:
            assert torch.equal(prompt[:, 76], eos.expand(2, D))


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
    # one parameter per category, initialised as the stacked rows were (sorted categories, one draw)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {"prompts.0": (75, D), "prompts.1": (75, D), "prompts.2": (75, D)}  # bird, cat, dog
    init = expected_init(sd, 3, seed=1)
    for i, name in enumerate(["bird", "cat", "dog"]):
        torch.testing.assert_close(module.prompt_of(name).data, init[i], atol=0, rtol=0)
    prompt = module.prompt_for_images(["cat", "dog", "cat"])
    assert torch.equal(prompt[0], prompt[2]) and not torch.equal(prompt[0], prompt[1])
    assert torch.equal(prompt[0, 1:76], init[1]) and torch.equal(prompt[1, 1:76], init[2])
    src, trg = module.prompt_pair(make_batch(["dog", "bird"]))
    assert torch.equal(src, trg) and torch.equal(src[1, 1:76], init[0])
    with pytest.raises(ValueError, match="horse"):
        module.prompt_for_images(["cat", "horse"])
    # category names that are nn.Module attributes ("train" is an SPair category) are fine
    spair = build_prompt_module("class", sd.text_encoder, sd.tokenizer, categories=["train", "to", "cat"])
    assert spair.prompt_for_images(["train"]).shape == (1, 77, D)


def adam_steps(module: torch.nn.Module, prompt_of, batches: list[list[str]]) -> list[dict[str, Tensor]]:
    """Adam steps as the trainer takes them (zero_grad(set_to_none=True)), one per batch of categories; the
    state dict after each step."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    states = []
    for categories in batches:
        prompt_of(categories).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states.append({name: value.detach().clone() for name, value in module.state_dict().items()})
    return states


def test_adam_leaves_categories_absent_from_a_batch_untouched(sd: SDComponents) -> None:
    """One parameter per category (the authors' layout): a step on a batch of "dog" leaves every other
    category bit-identical. With one stacked tensor (the earlier layout) Adam's moments from the "cat" step
    keep moving "cat" at the "dog" steps."""
    batches = [["cat", "cat"], ["dog"], ["dog", "dog"]]
    module = build(sd, "class", seed=1)
    init = {name: value.clone() for name, value in module.state_dict().items()}
    after_cat, *after_dogs = adam_steps(module, module.learned_for, batches)
    bird, cat, dog = "prompts.0", "prompts.1", "prompts.2"
    assert torch.equal(after_cat[bird], init[bird]) and torch.equal(after_cat[dog], init[dog])
    assert not torch.equal(after_cat[cat], init[cat])
    for state in after_dogs:
        assert torch.equal(state[cat], after_cat[cat]) and torch.equal(state[bird], init[bird])
    assert not torch.equal(after_dogs[-1][dog], init[dog])

    stacked = torch.nn.ParameterDict({"rows": torch.nn.Parameter(expected_init(sd, 3, seed=1).clone())})
    rows = {"bird": 0, "cat": 1, "dog": 2}

    def stacked_prompt(categories: list[str]) -> Tensor:
        return stacked["rows"][[rows[c] for c in categories]]

    old_cat, *old_dogs = (state["rows"] for state in adam_steps(stacked, stacked_prompt, batches))
    torch.testing.assert_close(old_cat[1], after_cat[cat], atol=0, rtol=0)  # the same first step
    for state in old_dogs:
        assert not torch.equal(state[1], old_cat[1])  # the absent category drifts at every dog step
        assert torch.equal(state[0], init[bird])  # never seen: zero moments, no drift


# The parameters of each Fig. 3a case as the authors built them (protocol.md "Fig. 3a modules").
FIG3A_PARAMETERS = {
    "pair_local": {
        "g_d.weight": (D, 2 * DINO),
        "g_d.bias": (D,),
        "g_n.weight": (PATCHES, PATCHES),
        "g_n.bias": (PATCHES,),
        "global_prompt": (25, D),
        "omega_pos": (50, D),
        "omega_alpha": (50, D),
    },
    "pair_global": {
        "g_d.weight": (D, 2 * DINO),
        "g_d.bias": (D,),
        "global_prompt": (25, D),
        "omega_pos": (50, D),
        "omega_alpha": (50, D),
    },
    "individual_local": {
        "g_d.weight": (D, DINO),
        "g_d.bias": (D,),
        "global_prompt": (25, D),
        "omega_pos": (50, D),
        "omega_alpha": (50, D),
    },
    "individual_global": {
        "g_d.weight": (D, DINO),
        "g_d.bias": (D,),
        "global_prompt": (25, D),
        "omega_pos": (50, D),
        "omega_alpha": (50, D),
    },
    "no_global_prompt": {
        "g_d.weight": (D, 2 * DINO),
        "g_d.bias": (D,),
        "g_n.weight": (PATCHES, PATCHES),
        "g_n.bias": (PATCHES,),
        "omega_pos": (50, D),
        "omega_alpha": (50, D),
    },
    "no_gn": {
        "g_d.weight": (D, 2 * DINO),
        "g_d.bias": (D,),
        "global_prompt": (25, D),
        "omega_pos": (50, D),
        "omega_alpha": (50, D),
    },
}


@pytest.mark.parametrize("case", list(CPM_CASES))
def test_fig3a_case_has_exactly_the_authors_parameters(sd: SDComponents, case: str) -> None:
    module = build(sd, case, seed=2)
    shapes = {name: tuple(param.shape) for name, param in module.named_parameters()}
    assert shapes == FIG3A_PARAMETERS[case]
    assert {name: tuple(t.shape) for name, t in module.state_dict().items()} == FIG3A_PARAMETERS[case]
    linear = {name for name in shapes if name.startswith(("g_d.", "g_n."))}
    prompt_group, linear_group = module.parameter_groups(lr=1e-2, lr_linear=1e-3)
    named = {id(p): n for n, p in module.named_parameters()}
    assert {named[id(p)] for p in linear_group["params"]} == linear
    assert {named[id(p)] for p in prompt_group["params"]} == set(shapes) - linear
    for name in ("global_prompt", "omega_pos", "omega_alpha"):
        if name in shapes:
            values = getattr(module, name)
            assert values.min() >= 0 and values.max() < 1


@pytest.mark.parametrize("case", list(CPM_CASES))
def test_fig3a_case_forward_matches_the_protocol_by_hand(sd: SDComponents, case: str) -> None:
    module = build(sd, case, seed=2)
    with torch.no_grad():  # non-trivial biases and positional parameters
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    batch = make_batch(["cat", "dog"], seed=5)
    src, trg = module.prompt_pair(batch)
    expected_src, expected_trg = cpm_by_hand(module, batch, sd)
    torch.testing.assert_close(src, expected_src, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trg, expected_trg, atol=1e-5, rtol=1e-5)
    if module.config.condition == "pair":
        assert src is trg
    else:
        assert not torch.allclose(src[:, 26:76], trg[:, 26:76])
        assert torch.equal(src[:, 1:26], trg[:, 1:26])  # the global prompt is shared


def test_fig3a_cases_are_the_configured_variants() -> None:
    designs = {
        case: (c.condition, c.features, c.global_prompt, c.use_gn, c.learned_length)
        for case, c in CPM_CASES.items()
    }
    assert designs == {
        "pair_local": ("pair", "local", True, True, 75),
        "pair_global": ("pair", "global", True, False, 75),
        "individual_local": ("individual", "local", True, False, 75),
        "individual_global": ("individual", "global", True, False, 75),
        "no_global_prompt": ("pair", "local", False, True, 50),
        "no_gn": ("pair", "local", True, False, 75),
    }


def test_cpm_pair_local_is_the_released_computation(sd: SDComponents) -> None:
    """The paper's CPM, unchanged by the Fig. 3a fixes: g_n on patches, max-pool, 25 global + 50 cond."""
    module = build(sd, "pair_local", seed=2)
    batch = make_batch(["cat", "dog"], seed=5)
    src, _ = module.prompt_pair(batch)
    weights = module.state_dict()
    hidden = torch.cat([batch.src_tokens, batch.trg_tokens], dim=-1) @ weights["g_d.weight"].T
    hidden = hidden + weights["g_d.bias"]
    hidden = (hidden.transpose(1, 2) @ weights["g_n.weight"].T + weights["g_n.bias"]).transpose(1, 2)
    cond = (adaptive_max_pool_by_hand(hidden, 50) + weights["omega_pos"]) * torch.tanh(weights["omega_alpha"])
    sos, eos = sos_eos_embeddings(sd.text_encoder, sd.tokenizer)
    expected = torch.cat(
        [sos.expand(2, 1, D), weights["global_prompt"].expand(2, -1, -1), cond, eos.expand(2, 1, D)], dim=1
    )
    torch.testing.assert_close(src, expected, atol=1e-5, rtol=1e-5)


def test_cpm_pair_prompt_depends_on_both_images(sd: SDComponents) -> None:
    module = build(sd, "pair_local")
    batch = make_batch(["cat", "dog"], seed=6)
    other = make_batch(["cat", "dog"], seed=7)
    other.src_tokens = batch.src_tokens
    assert not torch.allclose(module.prompt_pair(batch)[0], module.prompt_pair(other)[0])


def test_cpm_individual_prompt_depends_on_its_own_image_only(sd: SDComponents) -> None:
    module = build(sd, "individual_local")
    batch = make_batch(["cat", "dog"], seed=6)
    other = make_batch(["cat", "dog"], seed=7)
    other.src_tokens = batch.src_tokens
    assert torch.equal(module.prompt_pair(other)[0], module.prompt_pair(batch)[0])


@pytest.mark.parametrize("case", ["pair_global", "individual_global"])
def test_cpm_global_descriptor_needs_only_descriptors(sd: SDComponents, case: str) -> None:
    module = build(sd, case)
    full = make_batch(["cat", "dog"], seed=9)
    batch = PromptBatch(["cat", "dog"], src_global=full.src_global, trg_global=full.trg_global)
    src, trg = module.prompt_pair(batch)
    assert torch.equal(src, module.prompt_pair(full)[0]) and torch.equal(trg, module.prompt_pair(full)[1])
    # one token broadcast over the 50 positions: theta_cond / tanh(alpha) - Omega_pos is the same row 50 times
    rows = src[:, 26:76] / torch.tanh(module.omega_alpha) - module.omega_pos
    torch.testing.assert_close(rows, rows[:, :1].expand(-1, 50, -1), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="src_global"):
        module.prompt_pair(
            PromptBatch(["cat"], src_tokens=full.src_tokens[:1], trg_tokens=full.trg_tokens[:1])
        )


def test_cpm_without_global_prompt_pads_like_the_authors(sd: SDComponents) -> None:
    """Case 5: [SOS, 50 conditional, EOS at position 51, token 0 at positions 52..76] (G0-C50)."""
    module = build(sd, "no_global_prompt")
    assert module.global_prompt is None and "global_prompt" not in module.state_dict()
    assert module.learned_length == 50 and module.tail.shape == (26, D)
    src, _ = module.prompt_pair(make_batch(["cat", "dog"], seed=10))
    assert torch.equal(src[:, 51], input_row(sd, sd.tokenizer.eos_token_id, 51).expand(2, D))
    for position in (52, 76):
        assert torch.equal(src[:, position], input_row(sd, 0, position).expand(2, D))
    assert not any(name in ("sos", "tail") for name in module.state_dict())


def test_cpm_longer_than_the_sequence_is_refused(sd: SDComponents) -> None:
    with pytest.raises(ValueError, match=r"n_global \(30\) \+ CPMConfig.n_cond \(50\) exceed the 75"):
        build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=CPMConfig(n_global=30, dino_dim=DINO))
    short = CPMConfig(n_global=20, dino_dim=DINO)  # the authors' G20-C50: padded like case 5
    module = build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=short)
    src, _ = module.prompt_pair(make_batch(["cat"]))
    assert module.learned_length == 70 and torch.equal(
        src[0, 71], input_row(sd, sd.tokenizer.eos_token_id, 71)
    )


def test_case_5_with_75_conditional_vectors_is_a_config_choice(sd: SDComponents) -> None:
    """The authors' G0-C75 (no global prompt, 75 conditional vectors, no padding) is one config line away."""
    from sd4match.config import load_config, validate_config

    config = load_config(REPO / "config.yaml")
    variant = {"kind": "cpm", "global_prompt": False, "n_cond": 75}
    config["sd4match"]["variants"]["cpm_no_global_c75"] = variant
    options = validate_config(config)["sd4match"]["variants"]["cpm_no_global_c75"]
    cfg = CPMConfig(**{k: v for k, v in options.items() if k != "kind"}, dino_dim=DINO)
    module = build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=cfg)
    assert module.learned_length == 75 and tuple(module.omega_pos.shape) == (75, D)
    src, _ = module.prompt_pair(make_batch(["cat"]))
    assert torch.equal(src[0, 76], input_row(sd, sd.tokenizer.eos_token_id, 76))


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
    assert not any(name.startswith(("sos", "tail")) for name in module.state_dict())
    src, trg = module.prompt_pair(make_batch(["cat", "cat"]))
    loss = (
        encode_sequence(sd.text_encoder, src).square().mean() + encode_sequence(sd.text_encoder, trg).mean()
    )
    loss.backward()
    used = {name for name, _ in module.named_parameters()}
    if case == "class":  # only the "cat" prompt was used: the others get no gradient at all
        used = {"prompts.1"}  # bird, cat, dog
    for name, param in module.named_parameters():
        if name in used:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    for param in sd.text_encoder.parameters():
        assert not param.requires_grad and param.grad is None


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


def test_class_prompt_saved_stacked_still_loads(sd: SDComponents, tmp_path: Path) -> None:
    """Files saved before one parameter per category hold one ``prompts`` tensor (C, 75, D), rows in the
    sidecar's sorted category order: they load as the same prompts."""
    path = tmp_path / "prompt.safetensors"
    save_prompt(build(sd, "class"), path, {"step": 1})
    assert sorted(load_file(path)) == ["prompts.0", "prompts.1", "prompts.2"]
    rows = torch.randn(3, 75, D, generator=torch.Generator().manual_seed(4))
    save_file({"prompts": rows}, path)  # the earlier layout, beside the same sidecar
    module, _ = load_prompt(path, sd.text_encoder, sd.tokenizer)
    prompt = module.prompt_for_images(["dog", "bird", "cat"])
    assert torch.equal(prompt[:, 1:76], rows[[2, 0, 1]])
    save_file({"prompts": rows[:2]}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*\(2, 75, 32\).*one row per category"):
        load_prompt(path, sd.text_encoder, sd.tokenizer)


def test_cpm_without_global_prompt_saved_with_75_conditional_vectors_loads_as_trained(
    sd: SDComponents, tmp_path: Path
) -> None:
    """Before case 5 followed the authors' code, it had 25 + 50 = 75 conditional vectors and no padding; such
    a file loads as exactly that module (n_cond = 75)."""
    path = tmp_path / "prompt.safetensors"
    legacy = CPMConfig(global_prompt=False, n_cond=75, dino_dim=DINO)
    module = build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=legacy, seed=3)
    save_prompt(module, path, {"step": 1})
    side = sidecar_path(path)
    sidecar = json.loads(side.read_text())
    side.write_text(json.dumps({**sidecar, "cpm": {**sidecar["cpm"], "n_cond": 50}}))  # as written then
    loaded, _ = load_prompt(path, sd.text_encoder, sd.tokenizer)
    assert loaded.config.n_cond == 75 and loaded.learned_length == 75
    batch = make_batch(["cat"], seed=2)
    src = loaded.prompt_pair(batch)[0]
    weights = module.state_dict()
    features = torch.cat([batch.src_tokens, batch.trg_tokens], dim=-1)
    expected = framed_by_hand(sd, conditional_by_hand(weights, features, local=True))
    torch.testing.assert_close(src, expected, atol=1e-5, rtol=1e-5)


def test_global_descriptor_cpm_saved_with_g_n_still_loads(sd: SDComponents, tmp_path: Path) -> None:
    """Cases 2 and 4 used to carry a 1 x 1 g_n; their sidecars say use_gn: true and they load as trained."""
    config = CPMConfig(features="global", use_gn=True, dino_dim=DINO)
    module = build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=config)
    assert tuple(module.g_n.weight.shape) == (1, 1)
    path = tmp_path / "prompt.safetensors"
    save_prompt(module, path, {})
    loaded, _ = load_prompt(path, sd.text_encoder, sd.tokenizer)
    batch = make_batch(["cat"], seed=3)
    assert torch.equal(loaded.prompt_pair(batch)[0], module.prompt_pair(batch)[0])
    torch.testing.assert_close(loaded.prompt_pair(batch)[0], cpm_by_hand(module, batch, sd)[0])


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
        build_prompt_module("cpm", sd.text_encoder, sd.tokenizer, cpm=CPMConfig(n_global=26))
    with pytest.raises(ValueError, match="src_tokens"):
        PromptBatch(["cat", "dog"], src_tokens=torch.zeros(3, PATCHES, DINO))
