"""Distinct prompts are encoded once per job (issue 9): Single once, Class and DIFT text prompts once per
distinct prompt, CPM's shared source/target prompt once per pair; the features equal the per-image path's.

The references below are copies of the evaluation's feature functions before the change (commit f047961),
which ran the text encoder per image (Single/Class/DIFT) and on ``cat([src, trg])`` per CPM batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from sd4match.caches import DinoCache, build_dino_cache, cache_meta, image_key
from sd4match.datasets import PFWILLOW_CLASSES, load_image, parse_pfwillow
from sd4match.demo_world import DemoWorldSpec, make_pfwillow
from sd4match.evaluation import (
    ConditionalFeatures,
    ImageKey,
    ImageLatents,
    _chunk_seed,
    _LatentMemo,
    _pair_keys,
    conditional_feature_batches,
    image_seed,
    sd_text_prompt_features,
)
from sd4match.features import SDFeaturizer
from sd4match.fetch import extract
from sd4match.models import ModelSpec, load_dinov2, load_stable_diffusion, resolve_model
from sd4match.prompt_learning import CPMConfig, PromptBatch, build_prompt_module
from sd4match.prompts import CategoryPromptEncoder, TextPrompt, encode_prompt_pair, encode_sequence
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion

S = 64
TINY_CPM = CPMConfig(dino_dim=32, n_patches=256)
WILLOW_PHRASES = 4  # car, duck, motorbike, winebottle: "(G)", "(M)", ... qualifiers are dropped


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("prompt_encoding")
    images_zip, pairs_csv = make_pfwillow(base / "archives", DemoWorldSpec())
    extract(images_zip, base / "root")
    pairs = parse_pfwillow(base / "root", pairs_csv)
    components = load_stable_diffusion(build_tiny_stable_diffusion(base / "sd21", seed=0))
    dino_dir = build_tiny_dinov2(base / "dinov2", seed=0)
    model, processor = load_dinov2(dino_dir)
    record = resolve_model(ModelSpec(name="dinov2", id=str(dino_dir), kind="dinov2"))
    meta = cache_meta(record, None, "dino", processor=processor)
    build_dino_cache([pairs], base / "root", model, processor, base / "dino.safetensors", meta)
    dino = DinoCache.load(base / "dino.safetensors", expect_meta={"kind": "dino"})
    return {"root": base / "root", "pairs": pairs, "components": components, "dino": dino}


class EncoderCalls:
    """Counts text-encoder forward calls and the prompts (rows) they encode, through a forward hook."""

    def __init__(self, text_encoder: torch.nn.Module) -> None:
        self.calls: list[int] = []
        self.handle = text_encoder.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls.append(int(kwargs["input_ids"].shape[0]))

    @property
    def rows(self) -> int:
        return sum(self.calls)

    def __enter__(self) -> EncoderCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _keys(pairs) -> list[ImageKey]:
    return sorted({k for row in pairs.itertuples() for k in _pair_keys(row)}, key=str)


def old_text_prompt_features(featurizer, prompt, root, image_size, timestep, ensemble, seed):
    """The per-image path before issue 9: the text encoder runs once per image."""

    def features_for(keys: Sequence[ImageKey]) -> torch.Tensor:
        out = []
        for key in keys:
            pixels = featurizer.preprocess([load_image(root, key.path, flip=key.flip)], image_size)
            with torch.no_grad():
                embeds = prompt.embeddings([key.category]).to(featurizer.device)
                hidden = encode_sequence(featurizer.text_encoder, embeds)
                generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, key))
                out.append(featurizer(pixels, hidden, timestep, ensemble, generator)[0].cpu())
        return torch.stack(out)

    return features_for


def old_cpm_features(pairs, module, featurizer, dino, root, timestep, ensemble, seed, pair_batch):
    """The CPM path before issue 9: ``encode_sequence(cat([src, trg]))`` per batch -> {pair_id: features}."""
    memo = _LatentMemo(ImageLatents(featurizer, root, S), seed)
    rows, out = list(pairs.itertuples()), {}
    for start in range(0, len(rows), pair_batch):
        chunk = rows[start : start + pair_batch]
        keys = [_pair_keys(row) for row in chunk]
        src_names = [image_key(s.path, s.flip) for s, _ in keys]
        trg_names = [image_key(t.path, t.flip) for _, t in keys]
        batch = PromptBatch(
            [row.category for row in chunk],
            dino.tokens(src_names),
            dino.tokens(trg_names),
            dino.global_(src_names),
            dino.global_(trg_names),
        )
        latents = torch.stack([memo(s) for s, _ in keys] + [memo(t) for _, t in keys])
        generator = torch.Generator().manual_seed(_chunk_seed(seed, [r.pair_id for r in chunk]))
        with torch.no_grad():
            src_embeds, trg_embeds = module.prompt_pair(batch)
            hidden = encode_sequence(featurizer.text_encoder, torch.cat([src_embeds, trg_embeds]))
            feats = featurizer.extract_from_latents(latents, hidden, timestep, ensemble, generator).cpu()
        for i, row in enumerate(chunk):
            out[row.pair_id] = (feats[i], feats[len(chunk) + i])
    return out


def _single(c):
    return build_prompt_module("single", c.text_encoder, c.tokenizer, seed=3)


def _class(c):
    return build_prompt_module("class", c.text_encoder, c.tokenizer, categories=list(PFWILLOW_CLASSES))


def _text(c, template):
    return TextPrompt(template, c.text_encoder, c.tokenizer)


PROMPTS = {
    "single": (_single, 1),
    "class": (_class, len(PFWILLOW_CLASSES)),
    "dift": (lambda c: _text(c, "a photo of a {category}"), WILLOW_PHRASES),
    "empty": (lambda c: _text(c, ""), 1),
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_per_image_prompts_encoded_once_per_distinct_prompt(world, name):
    c = world["components"]
    build, distinct = PROMPTS[name]
    prompt = build(c)
    keys = _keys(world["pairs"])
    assert len(keys) == 30 and len({k.category for k in keys}) == 10
    featurizer = SDFeaturizer(c, max_batch=8)
    with EncoderCalls(c.text_encoder) as counter:
        features_for = sd_text_prompt_features(featurizer, prompt, world["root"], S, 50, 2, seed=0)
        by_category = [features_for([k for k in keys if k.category == cat]) for cat in PFWILLOW_CLASSES]
    assert counter.calls == [1] * distinct  # one call per distinct prompt, one prompt each, over 30 images
    with EncoderCalls(c.text_encoder) as old_counter:
        old = old_text_prompt_features(featurizer, prompt, world["root"], S, 50, 2, seed=0)
        expected = [old([k for k in keys if k.category == cat]) for cat in PFWILLOW_CLASSES]
    assert old_counter.calls == [1] * 30
    for got, want in zip(by_category, expected, strict=True):
        assert torch.equal(got, want)


def test_category_prompt_encoder_reuses_identical_prompts_and_matches_encode_sequence(world):
    c = world["components"]
    prompt = _text(c, "a photo of a {category}")
    encoder = CategoryPromptEncoder(c.text_encoder, prompt)
    with torch.no_grad():
        hidden = encoder(["car(G)", "duck(S)", "car(M)", "car(G)"])
        expected = encode_sequence(
            c.text_encoder, prompt.embeddings(["car(G)", "duck(S)", "car(M)", "car(G)"])
        )
    assert encoder.encoded == 2  # "a photo of a car" and "a photo of a duck"
    assert hidden.shape == (4, 77, c.text_encoder.config.hidden_size)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)  # batch of 4 vs batches of 1
    assert torch.equal(hidden[0], hidden[2]) and torch.equal(hidden[0], hidden[3])
    with pytest.raises(ValueError, match="list"):
        encoder("car(G)")


@pytest.mark.parametrize(("condition", "rows_per_batch"), [("pair", 4), ("individual", 8)])
def test_cpm_shared_prompt_encoded_once_per_pair(world, condition, rows_per_batch):
    c = world["components"]
    cfg = CPMConfig(condition=condition, dino_dim=32, n_patches=256)
    module = build_prompt_module("cpm", c.text_encoder, c.tokenizer, cpm=cfg, seed=1).eval()
    featurizer = SDFeaturizer(c, max_batch=8)
    args = (world["pairs"], module, featurizer, world["dino"], world["root"])
    with EncoderCalls(c.text_encoder) as counter:
        source = ConditionalFeatures(
            module, featurizer, world["dino"], world["root"], S, 50, 2, 0, pair_batch=4
        )
        batches = list(conditional_feature_batches(world["pairs"], source))
    assert counter.calls == [rows_per_batch] * 15  # 60 pairs in 15 batches of 4
    expected = old_cpm_features(*args, 50, 2, 0, pair_batch=4)
    for rows, src, trg in batches:
        for i, row in enumerate(rows):
            assert torch.equal(src[i], expected[row.pair_id][0])
            assert torch.equal(trg[i], expected[row.pair_id][1])


def test_encode_prompt_pair_equals_encoding_the_concatenation(world):
    c = world["components"]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 77, c.text_encoder.config.hidden_size, generator=gen) for _ in range(2))
    with torch.no_grad(), EncoderCalls(c.text_encoder) as counter:
        same = encode_prompt_pair(c.text_encoder, a, a.clone())
        different = encode_prompt_pair(c.text_encoder, a, b)
        assert torch.equal(same, encode_sequence(c.text_encoder, torch.cat([a, a])))
        assert torch.equal(different, encode_sequence(c.text_encoder, torch.cat([a, b])))
    assert counter.calls[:2] == [3, 6]
