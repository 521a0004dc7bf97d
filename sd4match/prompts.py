"""Prompts as sequences of CLIP input embeddings, encoded by the frozen text encoder into UNet conditioning.

Every prompt (text, learned Single/Class/CPM prompt) is a (B, 77, D) tensor of *input* embeddings, i.e.
token embedding + CLIP positional embedding per position. ``encode_sequence`` runs the frozen CLIP text
transformer (causal mask, final layer norm) on it to give the UNet's ``encoder_hidden_states``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

CATEGORY_QUALIFIER = re.compile(r"\([^)]*\)")
SOS_POSITION = 0


def _text_embeddings(text_encoder: nn.Module) -> nn.Module:
    """The CLIPTextEmbeddings module (token + position tables) of a CLIP text encoder.

    transformers 5 keeps it at ``text_encoder.embeddings``, transformers 4 under ``text_encoder.text_model``.
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    embeddings = getattr(inner, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "token_embedding"):
        raise ValueError(f"{type(text_encoder).__name__} has no CLIP text embeddings (token/position tables)")
    return embeddings


def sequence_length(text_encoder: nn.Module) -> int:
    """Number of prompt positions (77 for CLIP): the size of the positional embedding table."""
    return int(_text_embeddings(text_encoder).position_embedding.num_embeddings)


def hidden_size(text_encoder: nn.Module) -> int:
    """Width D of the text encoder's embeddings (1024 for SD 2-1, 768 for SD 1-5)."""
    return int(_text_embeddings(text_encoder).token_embedding.embedding_dim)


def position_embeddings(text_encoder: nn.Module) -> Tensor:
    """CLIP's positional embedding table, (77, D)."""
    return _text_embeddings(text_encoder).position_embedding.weight


def token_embeddings(text_encoder: nn.Module, token_ids: Tensor) -> Tensor:
    """Token embeddings (without positions) of integer ``token_ids``, shape ``token_ids.shape + (D,)``."""
    table = _text_embeddings(text_encoder).token_embedding
    return table(token_ids.to(table.weight.device))


def encode_sequence(text_encoder: nn.Module, inputs_embeds: Tensor) -> Tensor:
    """Frozen CLIP text transformer on input embeddings (positions included): (B, 77, D) -> (B, 77, D).

    The model's own forward runs (its causal mask, encoder and final layer norm) with the embedding layer's
    output replaced by ``inputs_embeds`` through a forward hook; gradients flow back to ``inputs_embeds``.
    """
    length, width = sequence_length(text_encoder), hidden_size(text_encoder)
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[1:] != (length, width):
        raise ValueError(
            f"encode_sequence: inputs_embeds must be (B, {length}, {width}), got {tuple(inputs_embeds.shape)}"
        )
    embeddings = _text_embeddings(text_encoder)
    device = embeddings.token_embedding.weight.device

    def replace_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return inputs_embeds.to(device=output.device, dtype=output.dtype)

    handle = embeddings.register_forward_hook(replace_output)
    try:
        ignored_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=device)
        return text_encoder(input_ids=ignored_ids).last_hidden_state
    finally:
        handle.remove()


def tokenize(tokenizer, texts: list[str], length: int) -> Tensor:
    """Token ids of ``texts``, padded with the pad token and truncated to ``length``: (B, length)."""
    batch = tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return batch.input_ids


def text_input_embeddings(text_encoder: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """Input embeddings of texts padded to 77: token embedding + positional embedding, (B, 77, D)."""
    ids = tokenize(tokenizer, texts, sequence_length(text_encoder))
    return token_embeddings(text_encoder, ids) + position_embeddings(text_encoder)


def encode_text(text_encoder: nn.Module, tokenizer, texts: list[str]) -> Tensor:
    """UNet conditioning of plain texts: ``encode_sequence(text_input_embeddings(texts))``, (B, 77, D)."""
    return encode_sequence(text_encoder, text_input_embeddings(text_encoder, tokenizer, texts))


def sos_eos_embeddings(text_encoder: nn.Module, tokenizer) -> tuple[Tensor, Tensor]:
    """SOS and EOS input embeddings (D,) with CLIP's positional embedding of positions 0 and 76 added.

    These frame every learned prompt: ``[SOS, N learned vectors, EOS]`` with N = 75.
    """
    positions = position_embeddings(text_encoder)
    ids = torch.tensor([tokenizer.bos_token_id, tokenizer.eos_token_id])
    sos, eos = token_embeddings(text_encoder, ids).unbind(0)
    return sos + positions[SOS_POSITION], eos + positions[positions.shape[0] - 1]


def category_phrase(category: str) -> str:
    """Category name as words in a prompt: qualifiers in parentheses dropped, underscores become spaces.

    ``"car(G)" -> "car"`` (PF-Willow sub-classes), ``"potted_plant" -> "potted plant"``.
    """
    phrase = " ".join(CATEGORY_QUALIFIER.sub(" ", category).replace("_", " ").split())
    if not phrase:
        raise ValueError(f"category {category!r} gives an empty prompt phrase")
    return phrase


@runtime_checkable
class PromptSource(Protocol):
    """Anything that gives the (B, 77, D) input embeddings of the prompts for a batch of categories."""

    def embeddings(self, categories: list[str]) -> Tensor:
        """Input embeddings (B, 77, D) for ``categories`` (one per pair/image), positions included."""
        ...


@dataclass
class TextPrompt:
    """A fixed text prompt: ``""`` (empty) or a template such as ``"a photo of a {category}"``."""

    template: str
    text_encoder: nn.Module
    tokenizer: object

    def __post_init__(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        if fields - {"category"}:
            raise ValueError(
                f"prompt template {self.template!r}: only {{category}} may be filled, got {fields}"
            )

    def texts(self, categories: list[str]) -> list[str]:
        """Prompt strings: the template with ``{category}`` filled by each category's phrase."""
        if "{category}" not in self.template:
            return [self.template for _ in categories]
        return [self.template.format(category=category_phrase(category)) for category in categories]

    def embeddings(self, categories: list[str]) -> Tensor:
        """Input embeddings (B, 77, D) of the prompt strings for ``categories``."""
        return text_input_embeddings(self.text_encoder, self.tokenizer, self.texts(categories))


def encode_prompt_pair(text_encoder: nn.Module, src_embeds: Tensor, trg_embeds: Tensor) -> Tensor:
    """``encode_sequence`` of ``cat([src, trg])`` (2B, 77, D); when source and target prompts are the same
    (CPM on a pair, Single, Class) the B prompts are encoded once and repeated."""
    if src_embeds is trg_embeds or (
        src_embeds.shape == trg_embeds.shape and torch.equal(src_embeds, trg_embeds)
    ):
        hidden = encode_sequence(text_encoder, src_embeds)
        return torch.cat([hidden, hidden])
    return encode_sequence(text_encoder, torch.cat([src_embeds, trg_embeds]))


class CategoryPromptEncoder:
    """UNet conditioning of prompts that depend only on the image's category (text templates, Single,
    Class): each *distinct* prompt goes through the text encoder once and is reused.

    Prompts are compared by content, so Single and an empty text prompt are encoded once per job and Class or
    "a photo of a {category}" once per category. Each prompt is encoded alone (batch of one), exactly as a
    per-image call would. Valid while the prompt does not change (one evaluation, one validation pass).
    """

    def __init__(self, text_encoder: nn.Module, prompt: PromptSource) -> None:
        self.text_encoder = text_encoder
        self.prompt = prompt
        self._by_category: dict[str, Tensor] = {}
        self._distinct: list[tuple[Tensor, Tensor]] = []

    @property
    def encoded(self) -> int:
        """Number of distinct prompts the text encoder has run on."""
        return len(self._distinct)

    @torch.no_grad()
    def _encode(self, category: str) -> Tensor:
        """Conditioning (1, 77, D) of one category: reused when an identical prompt was already encoded."""
        device = _text_embeddings(self.text_encoder).token_embedding.weight.device
        embeds = self.prompt.embeddings([category]).to(device)
        for known, hidden in self._distinct:
            if known.shape == embeds.shape and torch.equal(known, embeds):
                return hidden
        hidden = encode_sequence(self.text_encoder, embeds)
        self._distinct.append((embeds, hidden))
        return hidden

    def __call__(self, categories: list[str]) -> Tensor:
        """Conditioning (B, 77, D) of images with these categories."""
        if isinstance(categories, str):
            raise ValueError(f"CategoryPromptEncoder: categories must be a list, got {categories!r}")
        for category in categories:
            if category not in self._by_category:
                self._by_category[category] = self._encode(category)
        return torch.cat([self._by_category[c] for c in categories])
