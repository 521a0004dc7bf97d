"""Prompts: input embeddings (token + position), the frozen CLIP text encoder path, SOS/EOS, text prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd4match.models import SDComponents, load_stable_diffusion
from sd4match.prompts import (
    PromptSource,
    TextPrompt,
    category_phrase,
    encode_sequence,
    encode_text,
    sos_eos_embeddings,
    text_input_embeddings,
)
from sd4match.tiny_models import build_tiny_stable_diffusion

TEXTS = ["a photo of a cat", "", "a photo of a car ( g )", "a photo of a pottedplant"]


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("prompts_sd") / "sd21", seed=0)


@pytest.fixture(scope="session")
def sd(sd_folder: Path) -> SDComponents:
    return load_stable_diffusion(sd_folder)


@pytest.fixture(scope="session")
def vocab(sd_folder: Path) -> dict[str, int]:
    return json.loads((sd_folder / "tokenizer" / "vocab.json").read_text())


def test_encode_text_equals_text_encoder_on_token_ids(sd: SDComponents) -> None:
    ids = sd.tokenizer(
        TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = sd.text_encoder(input_ids=ids).last_hidden_state
        actual = encode_text(sd.text_encoder, sd.tokenizer, TEXTS)
    assert actual.shape == (4, 77, 32)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_text_input_embeddings_are_token_plus_position(sd: SDComponents, vocab: dict[str, int]) -> None:
    tokens = sd.text_encoder.embeddings.token_embedding.weight
    positions = sd.text_encoder.embeddings.position_embedding.weight
    ids = [vocab["<|startoftext|>"], vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"]]
    ids += [vocab["cat</w>"], vocab["<|endoftext|>"]] + [vocab["!"]] * 70
    expected = tokens[torch.tensor(ids)] + positions
    actual = text_input_embeddings(sd.text_encoder, sd.tokenizer, ["a photo of a cat"])
    torch.testing.assert_close(actual[0], expected, atol=0, rtol=0)


def test_sos_eos_embeddings_use_positions_0_and_76(sd: SDComponents, vocab: dict[str, int]) -> None:
    tokens = sd.text_encoder.embeddings.token_embedding.weight
    positions = sd.text_encoder.embeddings.position_embedding.weight
    sos, eos = sos_eos_embeddings(sd.text_encoder, sd.tokenizer)
    torch.testing.assert_close(sos, tokens[vocab["<|startoftext|>"]] + positions[0], atol=0, rtol=0)
    torch.testing.assert_close(eos, tokens[vocab["<|endoftext|>"]] + positions[76], atol=0, rtol=0)
    empty = text_input_embeddings(sd.text_encoder, sd.tokenizer, [""])[0]
    torch.testing.assert_close(sos, empty[0], atol=0, rtol=0)


def test_encode_sequence_is_causal_with_final_layer_norm(sd: SDComponents) -> None:
    norm = sd.text_encoder.final_layer_norm
    assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
    base = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    changed = base.clone()
    changed[:, 10] += torch.linspace(-1.0, 1.0, 32)  # not a constant shift, which layer norms would remove
    with torch.no_grad():
        out_base = encode_sequence(sd.text_encoder, base)
        out_changed = encode_sequence(sd.text_encoder, changed)
    torch.testing.assert_close(out_changed[:, :10], out_base[:, :10], atol=0, rtol=0)
    later_change = (out_changed[:, 10:] - out_base[:, 10:]).abs().amax(dim=(0, 2))
    assert later_change.min() > 1e-3  # position 10 and, through attention, every later position
    torch.testing.assert_close(out_base.mean(dim=-1), torch.zeros(2, 77), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_base.var(dim=-1, unbiased=False), torch.ones(2, 77), atol=1e-3, rtol=0)


def test_encode_sequence_passes_gradients_to_learned_embeddings(sd: SDComponents) -> None:
    learned = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    encode_sequence(sd.text_encoder, learned).square().sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.text_encoder.parameters())
    assert len(sd.text_encoder.embeddings._forward_hooks) == 0


def test_encode_sequence_rejects_bad_shapes(sd: SDComponents) -> None:
    with pytest.raises(ValueError, match=r"\(B, 77, 32\)"):
        encode_sequence(sd.text_encoder, torch.zeros(1, 75, 32))
    with pytest.raises(ValueError, match=r"\(B, 77, 32\)"):
        encode_sequence(sd.text_encoder, torch.zeros(77, 32))


@pytest.mark.parametrize(
    ("category", "phrase"),
    [
        ("car(G)", "car"),
        ("winebottle(woC)", "winebottle"),
        ("potted_plant", "potted plant"),
        ("tvmonitor", "tvmonitor"),
        ("dining_table (x)", "dining table"),
    ],
)
def test_category_phrase(category: str, phrase: str) -> None:
    assert category_phrase(category) == phrase


def test_category_phrase_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        category_phrase("(G)")


def test_text_prompt_templates(sd: SDComponents) -> None:
    prompt = TextPrompt("a photo of a {category}", sd.text_encoder, sd.tokenizer)
    assert isinstance(prompt, PromptSource)
    assert prompt.texts(["car(G)", "cat"]) == ["a photo of a car", "a photo of a cat"]
    expected = text_input_embeddings(sd.text_encoder, sd.tokenizer, ["a photo of a car", "a photo of a cat"])
    torch.testing.assert_close(prompt.embeddings(["car(G)", "cat"]), expected, atol=0, rtol=0)
    empty = TextPrompt("", sd.text_encoder, sd.tokenizer)
    assert empty.texts(["cat", "dog"]) == ["", ""]
    assert empty.embeddings(["cat", "dog"]).shape == (2, 77, 32)
    with pytest.raises(ValueError, match="only"):
        TextPrompt("a {thing}", sd.text_encoder, sd.tokenizer)
