"""Zero-shot baselines on the tiny models: ViT patch grids, the ODISE implicit captioner, SD+DINO(*)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sd4match import baselines as B
from sd4match.evaluation import ImageKey, MatchingSettings
from sd4match.frames import pad_image
from sd4match.matching import grid_to_image
from sd4match.models import load_clip_vision, load_dino, load_dinov2, load_stable_diffusion
from sd4match.prompts import TextPrompt, encode_text
from sd4match.tiny_models import (
    TEXT_HIDDEN_SIZE,
    build_tiny_clip_vision,
    build_tiny_dino_vit,
    build_tiny_dinov2,
    build_tiny_stable_diffusion,
)

SD_SIZE = 128  # latent 16 -> decoder maps s5 2x2, s4 4x4, s3 8x8
DINO_SIZE = 112  # 8 x 8 patches of 14 px
LEARNED_KEYS = (
    "clip_project.linear.weight",
    "clip_project.linear.bias",
    "clip_project.positional_embedding",
    "alpha_cond",
    "time_embed_project.linear.weight",
    "time_embed_project.linear.bias",
    "time_embed_project.positional_embedding",
    "alpha_cond_time_embed",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny SD 1-5, DINOv2, DINO and CLIP vision models plus a tiny captioner checkpoint."""
    root = tmp_path_factory.mktemp("tiny_baselines")
    components = load_stable_diffusion(build_tiny_stable_diffusion(root / "sd15", variant="sd15"))
    dinov2, _ = load_dinov2(build_tiny_dinov2(root / "dinov2"))
    dino, _ = load_dino(build_tiny_dino_vit(root / "dino"))
    clip, processor = load_clip_vision(build_tiny_clip_vision(root / "clip"))
    checkpoint = B.build_tiny_implicit_captioner_weights(
        root / "captioner.pth", root / "clip", TEXT_HIDDEN_SIZE
    )
    return {
        "root": root,
        "sd": components,
        "dinov2": dinov2,
        "dino": dino,
        "clip": clip,
        "processor": processor,
        "checkpoint": checkpoint,
    }


def _images(n: int, seed: int = 0, size: tuple[int, int] = (120, 90)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _captioner(tiny) -> B.ImplicitCaptioner:
    captioner = B.build_implicit_captioner(tiny["clip"], tiny["processor"], tiny["sd"])
    B.load_implicit_captioner_weights(captioner, tiny["checkpoint"])
    return captioner


# ---------------------------------------------------------------------------------------------- ViT


def test_vit_pixels_resize_and_imagenet_normalisation():
    image = Image.new("RGB", (30, 20), (255, 0, 128))
    pixels = B.vit_pixels([image], 28)
    assert pixels.shape == (1, 3, 28, 28)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        assert torch.allclose(pixels[0, channel], torch.full((28, 28), value), atol=1e-6)


def test_vit_grid_shape_and_unit_norm(tiny):
    images = _images(2)
    v2 = B.vit_patch_features(tiny["dinov2"], images, DINO_SIZE)
    v1 = B.vit_patch_features(tiny["dino"], images, 64)
    assert v2.shape == (2, 32, DINO_SIZE // 14, DINO_SIZE // 14)
    assert v1.shape == (2, 32, 64 // 8, 64 // 8)
    for feats in (v2, v1):
        assert torch.allclose(feats.norm(dim=1), torch.ones(feats.shape[0], *feats.shape[2:]), atol=1e-6)


def test_vit_grid_is_the_last_hidden_state_patch_tokens(tiny):
    model, images = tiny["dinov2"], _images(2, seed=1)
    grid = B.vit_patch_features(model, images, DINO_SIZE)
    grid_pre_norm = B.vit_patch_features(model, images, DINO_SIZE, final_norm=False)
    with torch.no_grad():
        output = model(pixel_values=B.vit_pixels(images, DINO_SIZE), output_hidden_states=True)
    side = DINO_SIZE // 14
    for b in range(2):
        for row, col in [(0, 0), (2, 5), (7, 7), (5, 1)]:
            token = 1 + row * side + col  # CLS first, then patches row by row
            assert torch.equal(grid[b, :, row, col], F.normalize(output.last_hidden_state[b, token], dim=0))
            assert torch.equal(
                grid_pre_norm[b, :, row, col], F.normalize(output.hidden_states[-1][b, token], dim=0)
            )


def test_patch_token_offset_counts_cls_and_registers(tiny):
    assert B.patch_token_offset(tiny["dinov2"]) == 1
    model = tiny["dinov2"]
    model.config.num_register_tokens = 4
    try:
        assert B.patch_token_offset(model) == 5
    finally:
        del model.config.num_register_tokens


def test_vit_size_must_be_a_multiple_of_the_patch(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        B.vit_patch_features(tiny["dinov2"], _images(1), 100)


def test_vit_feature_fn_flips_per_key(tiny, tmp_path):
    from sd4match.evaluation import ImageKey

    image = _images(1, seed=3)[0]
    image.save(tmp_path / "a.png")
    fn = B.vit_feature_fn(tiny["dinov2"], tmp_path, DINO_SIZE, batch_size=1)
    feats = fn([ImageKey("a.png", False, "cat"), ImageKey("a.png", True, "cat")])
    loaded = Image.open(tmp_path / "a.png").convert("RGB")
    assert torch.equal(feats[0], B.vit_patch_features(tiny["dinov2"], [loaded], DINO_SIZE)[0])
    assert torch.equal(
        feats[1], B.vit_patch_features(tiny["dinov2"], [ImageOps.mirror(loaded)], DINO_SIZE)[0]
    )


def _vit_inputs(model, images, size):
    """Normalised pixels of ``images`` at ``size`` and the model's hidden states (block inputs/outputs)."""
    pixels = B.vit_pixels(images, size)
    kwargs = {"interpolate_pos_encoding": True} if isinstance(model, B.ViTModel) else {}
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states
    return pixels, hidden


def _grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side * side, C) patch tokens -> the L2-normalised (B, C, side, side) grid."""
    return F.normalize(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side), dim=1)


def test_key_facet_hook_equals_the_key_projection_by_hand(tiny):
    images = _images(2, seed=5, size=(70, 50))
    # DINO v1 ViT (patch 8): block 1's key projection of its LayerNorm'ed input, CLS dropped
    dino = tiny["dino"]
    _, hidden = _vit_inputs(dino, images, 64)
    block = dino.layers[1]
    with torch.no_grad():
        keys = block.attention.k_proj(block.layernorm_before(hidden[1]))[:, 1:]
    facet = B.vit_patch_features(dino, images, 64, facet=B.VitFacet("key", 1))
    assert facet.shape == (2, 32, 8, 8)
    assert torch.allclose(facet, _grid(keys, 8), atol=1e-6)
    # DINOv2 (patch 14): block 0's key projection (norm1), CLS dropped
    dinov2 = tiny["dinov2"]
    _, hidden = _vit_inputs(dinov2, images, DINO_SIZE)
    block = dinov2.encoder.layer[0]
    with torch.no_grad():
        keys = block.attention.k_proj(block.norm1(hidden[0]))[:, 1:]
    facet = B.vit_patch_features(dinov2, images, DINO_SIZE, facet=B.VitFacet("key", 0))
    assert torch.allclose(facet, _grid(keys, 8), atol=1e-6)


def test_token_facet_of_a_block_is_its_output_and_the_default_is_unchanged(tiny):
    images = _images(2, seed=6)
    dino = tiny["dino"]
    _, hidden = _vit_inputs(dino, images, 64)
    token0 = B.vit_patch_features(dino, images, 64, facet=B.VitFacet("token", 0))
    assert torch.allclose(token0, _grid(hidden[1][:, 1:], 8), atol=1e-6)  # block 0's output, no final norm
    default = B.vit_patch_features(dino, images, 64)
    assert torch.equal(default, B.vit_patch_features(dino, images, 64, facet=B.LAST_LAYER_TOKENS))
    assert torch.equal(default, B.vit_patch_features(dino, images, 64, facet=B.VitFacet(stride=8)))


def test_strided_patches_overlap_with_interpolated_positions(tiny):
    dino = tiny["dino"]
    pixels = B.vit_pixels(_images(1, seed=7), 64)
    with torch.no_grad():
        tokens = B.strided_embeddings(dino, pixels, 4)
        positions = dino.embeddings.interpolate_pos_encoding(tokens, 15 * 8, 15 * 8)
        projection = dino.embeddings.patch_embeddings.projection
        for i, j in (
            (0, 0),
            (3, 11),
            (14, 14),
        ):  # token (row i, column j) sees pixels [4i, 4i + 8) x [4j, 4j + 8)
            crop = pixels[:, :, 4 * i : 4 * i + 8, 4 * j : 4 * j + 8]
            expected = F.conv2d(crop, projection.weight, projection.bias).flatten()
            assert torch.allclose(
                tokens[0, 1 + 15 * i + j] - positions[0, 1 + 15 * i + j], expected, atol=1e-5
            )
        assert torch.allclose(tokens[0, 0] - positions[0, 0], dino.embeddings.cls_token[0, 0])
    grid = B.vit_patch_features(dino, _images(1, seed=7), 64, facet=B.VitFacet("key", 1, stride=4))
    assert grid.shape == (1, 32, 15, 15) and B.vit_grid_side(dino, 224, 4) == 55  # sd-dino's DINOv1 grid


def test_facet_errors_name_the_problem(tiny):
    with pytest.raises(ValueError, match="the key facet needs a layer"):
        B.VitFacet("key")
    with pytest.raises(ValueError, match="facet must be one of"):
        B.VitFacet("value", 1)
    with pytest.raises(ValueError, match="facet layer 5 does not exist: the model has 2 blocks"):
        B.vit_patch_features(tiny["dino"], _images(1), 64, facet=B.VitFacet("key", 5))
    with pytest.raises(ValueError, match="supported for DINO v1 ViTModel only, not Dinov2Model"):
        B.vit_patch_features(tiny["dinov2"], _images(1), DINO_SIZE, facet=B.VitFacet(stride=7))
    facet = B.VitFacet.from_method({"kind": "vit", "facet": "key", "layer": 9, "stride": 4})
    assert facet == B.VitFacet("key", 9, 4) and facet.label() == "key facet, layer 9, stride 4"
    assert B.VitFacet.from_method({"kind": "vit"}).label() == "last-layer tokens"


def test_vit_feature_fn_pads_to_the_square(tiny, tmp_path):
    image = _images(1, seed=8, size=(90, 60))[0]
    image.save(tmp_path / "a.png")
    features_for = B.vit_feature_fn(tiny["dinov2"], tmp_path, DINO_SIZE, pad=True)
    got = features_for([ImageKey("a.png", False, "cat")])
    expected = B.vit_patch_features(tiny["dinov2"], [pad_image(image, DINO_SIZE)], DINO_SIZE)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------- implicit captioner


def test_captioner_is_empty_prompt_plus_gated_projection(tiny):
    captioner, images = _captioner(tiny), _images(2, seed=4)
    state = torch.load(tiny["checkpoint"], weights_only=True)["model"]
    p = {key: state[B.ODISE_PREFIX + key] for key in LEARNED_KEYS}
    with torch.no_grad():
        pixel_values = tiny["processor"](images=images, return_tensors="pt")["pixel_values"]
        embeds = tiny["clip"](pixel_values=pixel_values).image_embeds
        empty = encode_text(tiny["sd"].text_encoder, tiny["sd"].tokenizer, [""])
    projected = embeds @ p["clip_project.linear.weight"].T + p["clip_project.linear.bias"]
    expected = empty + torch.tanh(p["alpha_cond"]) * (
        projected[:, None] + p["clip_project.positional_embedding"]
    )
    hidden = B.implicit_captioner_hidden_states(captioner, images)
    assert hidden.shape == (2, 77, TEXT_HIDDEN_SIZE)
    assert torch.allclose(hidden, expected, atol=1e-6)
    time_projected = embeds @ p["time_embed_project.linear.weight"].T + p["time_embed_project.linear.bias"]
    expected_time = torch.tanh(p["alpha_cond_time_embed"]) * (
        time_projected + p["time_embed_project.positional_embedding"][:, 0]
    )
    condition = captioner.condition(images)
    assert condition.time_condition.shape == (2, 128)
    assert torch.allclose(condition.time_condition, expected_time, atol=1e-6)
    assert torch.allclose(condition.encoder_hidden_states, expected, atol=1e-6)


def test_captioner_with_zero_gate_is_exactly_the_empty_prompt(tiny):
    captioner = _captioner(tiny)
    with torch.no_grad():
        captioner.alpha_cond.zero_()
        empty = encode_text(tiny["sd"].text_encoder, tiny["sd"].tokenizer, [""])
    hidden = B.implicit_captioner_hidden_states(captioner, _images(3, seed=5))
    assert torch.equal(hidden, empty.expand(3, -1, -1))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_captioner_weights_round_trip(tiny, tmp_path, suffix):
    path = B.build_tiny_implicit_captioner_weights(
        tmp_path / f"w{suffix}", tiny["root"] / "clip", TEXT_HIDDEN_SIZE, seed=7, prefix="m."
    )
    state = B.read_checkpoint_state(path)
    assert sorted(state) == sorted("m." + key for key in LEARNED_KEYS)
    assert state["m.alpha_cond"].shape == (1, 77, TEXT_HIDDEN_SIZE)
    assert state["m.clip_project.linear.weight"].shape == (TEXT_HIDDEN_SIZE, 32)
    assert state["m.time_embed_project.positional_embedding"].shape == (1, 1, 128)
    captioner = B.build_implicit_captioner(tiny["clip"], tiny["processor"], tiny["sd"])
    B.load_implicit_captioner_weights(captioner, path, prefix="m.")
    learned = captioner.learned_parameters()
    assert sorted(learned) == sorted(LEARNED_KEYS)
    for key in LEARNED_KEYS:
        assert torch.equal(learned[key].detach(), state["m." + key])


def test_captioner_checkpoint_extra_keys_ignored_and_wrappers_unpacked(tiny, tmp_path):
    state = B.read_checkpoint_state(tiny["checkpoint"])
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {**state, "other.weight": torch.ones(3)}, "iteration": 5}, path)
    captioner = B.build_implicit_captioner(tiny["clip"], tiny["processor"], tiny["sd"])
    B.load_implicit_captioner_weights(captioner, path)
    assert torch.equal(captioner.alpha_cond.detach(), state[B.ODISE_PREFIX + "alpha_cond"])


def test_captioner_missing_key_names_key_and_file(tiny, tmp_path):
    state = B.read_checkpoint_state(tiny["checkpoint"])
    del state[B.ODISE_PREFIX + "alpha_cond"]
    path = B.save_checkpoint_state(state, tmp_path / "broken.pth")
    captioner = B.build_implicit_captioner(tiny["clip"], tiny["processor"], tiny["sd"])
    with pytest.raises(ValueError, match=r"broken\.pth.*backbone\.feature_extractor\.alpha_cond"):
        B.load_implicit_captioner_weights(captioner, path)


def test_captioner_shape_mismatch_and_missing_file(tiny, tmp_path):
    state = B.read_checkpoint_state(tiny["checkpoint"])
    state[B.ODISE_PREFIX + "alpha_cond_time_embed"] = torch.zeros(64)
    path = B.save_checkpoint_state(state, tmp_path / "bad.safetensors")
    captioner = B.build_implicit_captioner(tiny["clip"], tiny["processor"], tiny["sd"])
    with pytest.raises(ValueError, match=r"bad\.safetensors.*alpha_cond_time_embed.*\(64,\).*\(128,\)"):
        B.load_implicit_captioner_weights(captioner, path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        B.load_implicit_captioner_weights(captioner, tmp_path / "nope.pth")


# ------------------------------------------------------------------------------ decoder features


def _unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, SD_SIZE // 8, SD_SIZE // 8, generator=generator)
    hidden = torch.randn(2, 77, TEXT_HIDDEN_SIZE, generator=generator)
    return sample, hidden


def _full_unet_layer_outputs(unet, sample, hidden, t, time_condition=None) -> list[torch.Tensor]:
    """Outputs of the second-to-last layer of up blocks 0, 1, 2 (tiny: 2 layers each) in a full pass."""
    layers = [unet.up_blocks[0].resnets[0], unet.up_blocks[1].attentions[0], unet.up_blocks[2].attentions[0]]
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(layers)
    ]
    if time_condition is not None:
        handles.append(unet.time_embedding.register_forward_hook(lambda m, a, out: out + time_condition))
    try:
        with torch.no_grad():
            unet(sample, torch.tensor(t), encoder_hidden_states=hidden)
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[i] for i in range(3)]


def _call_counter(modules) -> tuple[dict[str, int], list]:
    counts = {name: 0 for name in modules}
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts[name] + 1))
        for name, module in modules.items()
    ]
    return counts, handles


@pytest.fixture(scope="module")
def unet_reference(tiny):
    """UNet inputs and full-pass outputs of the three feature layers, without and with a time condition."""
    unet = tiny["sd"].unet
    sample, hidden = _unet_inputs()
    condition = torch.randn(2, 128, generator=torch.Generator().manual_seed(9))
    return {
        "sample": sample,
        "hidden": hidden,
        "condition": condition,
        "plain": _full_unet_layer_outputs(unet, sample, hidden, 100),
        "conditioned": _full_unet_layer_outputs(unet, sample, hidden, 100, time_condition=condition),
    }


def test_decoder_features_equal_the_full_unet_from_one_truncated_pass(tiny, unet_reference):
    unet, ref = tiny["sd"].unet, unet_reference
    watched = {
        "time_embedding": unet.time_embedding,
        "up2_last_resnet": unet.up_blocks[2].resnets[1],
        "up2_upsampler": unet.up_blocks[2].upsamplers[0],
        "up3": unet.up_blocks[3],
        "conv_out": unet.conv_out,
    }
    counts, handles = _call_counter(watched)
    try:
        with torch.no_grad():
            maps = B.capture_decoder_features(unet, ref["sample"], 100, ref["hidden"], (0, 1, 2))
    finally:
        for handle in handles:
            handle.remove()
    assert counts == {"time_embedding": 1, "up2_last_resnet": 0, "up2_upsampler": 0, "up3": 0, "conv_out": 0}
    assert [tuple(m.shape) for m in maps] == [(2, 64, 2, 2), (2, 64, 4, 4), (2, 32, 8, 8)]
    for got, want in zip(maps, ref["plain"], strict=True):
        assert torch.equal(got, want)


def test_decoder_features_follow_the_requested_order(tiny, unet_reference):
    unet, ref = tiny["sd"].unet, unet_reference
    with torch.no_grad():
        s3, s5 = B.capture_decoder_features(unet, ref["sample"], 100, ref["hidden"], (2, 0))
    assert torch.equal(s3, ref["plain"][2]) and torch.equal(s5, ref["plain"][0])
    with pytest.raises(ValueError, match="distinct"):
        B.capture_decoder_features(unet, ref["sample"], 100, ref["hidden"], (1, 1))
    with pytest.raises(ValueError, match=r"up block index must be in \[0, 4\)"):
        B.capture_decoder_features(unet, ref["sample"], 100, ref["hidden"], (4,))


def test_time_condition_is_added_to_the_time_embedding(tiny, unet_reference):
    unet, ref = tiny["sd"].unet, unet_reference
    with torch.no_grad():
        maps = B.capture_decoder_features(
            unet, ref["sample"], 100, ref["hidden"], (0, 1, 2), time_condition=ref["condition"]
        )
    for got, want, without in zip(maps, ref["conditioned"], ref["plain"], strict=True):
        assert torch.equal(got, want)
        assert not torch.allclose(got, without)


# ------------------------------------------------------------------------------------------ co-PCA


def test_joint_pca_basis_is_the_pca_of_both_maps_stacked():
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(6, 3, 4, generator=generator)
    trg = torch.randn(6, 3, 4, generator=generator) + 2.0
    basis = B.joint_pca_basis([src, trg], 4)
    cells = torch.cat([src.reshape(6, -1).T, trg.reshape(6, -1).T])  # 24 cells x 6 channels
    assert torch.allclose(basis.mean, cells.mean(dim=0), atol=1e-6)
    centred = cells - cells.mean(dim=0)
    covariance = centred.T @ centred
    comps = basis.components
    assert comps.shape == (6, 4)
    assert torch.allclose(comps.T @ comps, torch.eye(4), atol=1e-5)
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0)  # descending
    for k in range(4):
        assert torch.allclose(covariance @ comps[:, k], eigenvalues[k] * comps[:, k], atol=1e-4)
    src_k, trg_k = B.co_pca(src, trg, 4)
    assert src_k.shape == trg_k.shape == (4, 3, 4)
    # one basis for both images: each map is its cells minus the JOINT mean, times the same components
    assert torch.allclose(src_k.reshape(4, -1).T, (src.reshape(6, -1).T - basis.mean) @ comps, atol=1e-5)
    assert torch.allclose(trg_k.reshape(4, -1).T, (trg.reshape(6, -1).T - basis.mean) @ comps, atol=1e-5)
    own = B.joint_pca_basis([src], 4)
    assert not torch.allclose(own.mean, basis.mean, atol=0.1)


def test_full_rank_co_pca_reconstructs_and_extra_components_are_zero():
    generator = torch.Generator().manual_seed(1)
    src, trg = torch.randn(5, 2, 3, generator=generator), torch.randn(5, 2, 3, generator=generator)
    basis = B.joint_pca_basis([src, trg], 5)
    src_k = B.pca_project(src, basis)
    rebuilt = (src_k.reshape(5, -1).T @ basis.components.T + basis.mean).T.reshape(5, 2, 3)
    assert torch.allclose(rebuilt, src, atol=1e-5)
    small_src, small_trg = (
        torch.randn(6, 1, 2, generator=generator),
        torch.randn(6, 1, 2, generator=generator),
    )
    padded = B.joint_pca_basis([small_src, small_trg], 6)  # 4 cells: at most 4 components
    assert torch.equal(padded.components[:, 4:], torch.zeros(6, 2))
    assert torch.equal(B.pca_project(small_src, padded)[4:], torch.zeros(2, 1, 2))


def test_fuse_pyramid_by_hand():
    s5 = torch.full((1, 1, 1, 1), 3.0)
    s4 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    s3 = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    fused = B.fuse_pyramid([s5, s4, s3])
    assert fused.shape == (1, 4, 4, 4)
    assert torch.equal(fused[:, :2], s3)
    # bilinear x2 (align_corners=False) of [[1, 2], [3, 4]]: source rows/cols at -0.25, 0.25, 0.75, 1.25
    expected_s4 = torch.tensor(
        [[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]
    )
    assert torch.allclose(fused[0, 2], expected_s4)
    assert torch.equal(fused[0, 3], torch.full((4, 4), 3.0))
    with pytest.raises(ValueError, match="coarse to fine"):
        B.fuse_pyramid([s3, s4])


# ----------------------------------------------------------------------------------------- SD+DINO


def _featurizer(tiny, dino: bool, **kwargs) -> B.SDDinoFeaturizer:
    settings = B.SDDinoSettings(
        sd_image_size=SD_SIZE, dino_image_size=kwargs.pop("dino_image_size", DINO_SIZE), seed=3, **kwargs
    )
    return B.SDDinoFeaturizer(
        tiny["sd"], B.captioner_conditioning(_captioner(tiny)), tiny["dinov2"] if dino else None, settings
    )


def test_sd_maps_average_the_shared_noise_ensemble(tiny):
    featurizer = _featurizer(tiny, dino=False, ensemble=2, max_batch=3)
    images = _images(2, seed=6)
    maps = featurizer.sd_maps(images, ["cat", "cat"])
    assert featurizer.unet_passes == 2  # 2 images x 2 noise copies in chunks of 3
    latents = featurizer.latents(images)
    condition = _captioner(tiny).condition(images)
    singles = []
    for noise in featurizer.shared_noise(latents.shape):
        noisy = tiny["sd"].scheduler.add_noise(latents, noise.expand_as(latents), torch.tensor([100, 100]))
        with torch.no_grad():
            singles.append(
                B.capture_decoder_features(
                    tiny["sd"].unet,
                    noisy,
                    100,
                    condition.encoder_hidden_states,
                    (0, 1, 2),
                    condition.time_condition,
                )
            )
    for i, got in enumerate(maps):
        assert torch.allclose(got, (singles[0][i] + singles[1][i]) / 2, atol=1e-5)


def test_sd_dino_features_fuse_equal_weight_parts(tiny):
    images = _images(2, seed=7)
    fused_src, fused_trg = _featurizer(tiny, dino=True).pair_features(images[0], images[1], "dog")
    sd_src, sd_trg = _featurizer(tiny, dino=False).pair_features(images[0], images[1], "dog")
    n_sd = 64 + 64 + 32  # co-PCA keeps min(256, C) channels of s5, s4, s3
    assert fused_src.shape == fused_trg.shape == (n_sd + 32, 8, 8)
    assert sd_src.shape == (n_sd, 8, 8)
    ones = torch.ones(8, 8)
    for fused, sd in ((fused_src, sd_src), (fused_trg, sd_trg)):
        assert torch.allclose(fused.norm(dim=0), ones, atol=1e-5)
        assert torch.allclose(fused[:n_sd].norm(dim=0), ones / math.sqrt(2), atol=1e-5)
        assert torch.allclose(fused[n_sd:].norm(dim=0), ones / math.sqrt(2), atol=1e-5)
        assert torch.allclose(fused[:n_sd] * math.sqrt(2), sd, atol=1e-5)  # SD+DINO* = the SD part
    dino = B.vit_patch_features(tiny["dinov2"], images, DINO_SIZE, final_norm=False)
    assert torch.allclose(fused_src[n_sd:] * math.sqrt(2), dino[0], atol=1e-5)


def test_sd_part_is_the_joint_co_pca_of_the_pair(tiny):
    featurizer = _featurizer(tiny, dino=False)
    a, b, c = _images(3, seed=8)
    maps = featurizer.sd_maps([a, b], ["cat", "cat"])
    src, _ = featurizer.pair_features(a, b, "cat")
    reduced = []
    for m in maps:
        basis = B.joint_pca_basis([m[0], m[1]], m.shape[1])
        reduced.append(B.pca_project(m[0], basis)[None])
    assert torch.allclose(src, F.normalize(B.fuse_pyramid(reduced)[0], dim=0), atol=1e-5)
    other, _ = featurizer.pair_features(a, c, "cat")  # same image, another partner: another PCA basis
    assert not torch.allclose(src, other, atol=1e-3)


def test_dino_grid_resized_to_the_sd_grid(tiny):
    featurizer = _featurizer(tiny, dino=True, dino_image_size=56)  # 4 x 4 DINO tokens, 8 x 8 SD grid
    src, trg = featurizer.pair_features(*_images(2, seed=9), "cat")
    assert src.shape == trg.shape == (192, 8, 8)
    assert torch.allclose(src[160:].norm(dim=0), torch.full((8, 8), 1 / math.sqrt(2)), atol=1e-5)


def test_sd_dino_with_text_conditioning_and_bad_settings(tiny):
    prompt = TextPrompt("a photo of a {category}", tiny["sd"].text_encoder, tiny["sd"].tokenizer)
    featurizer = B.SDDinoFeaturizer(
        tiny["sd"], B.text_conditioning(prompt), settings=B.SDDinoSettings(sd_image_size=SD_SIZE)
    )
    src, _ = featurizer.pair_features(*_images(2, seed=10), "car(G)")
    assert src.shape == (160, 8, 8)
    with pytest.raises(ValueError, match="2 pca_dims for 3 blocks"):
        B.SDDinoSettings(pca_dims=(8, 8))
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        B.SDDinoFeaturizer(tiny["sd"], B.text_conditioning(prompt), settings=B.SDDinoSettings(timestep=1000))


def test_pad_preprocessing_feeds_every_network_sd_dinos_padded_squares(tiny):
    """sd-dino's inputs: SD and the captioner's CLIP see the image padded to the SD size, DINO to its own."""
    images = _images(2, seed=9, size=(90, 60))
    seen: list[list[tuple[int, int]]] = []
    captioner = B.captioner_conditioning(_captioner(tiny))

    def spy(batch, categories):
        seen.append([image.size for image in batch])
        return captioner(batch, categories)

    settings = B.SDDinoSettings(sd_image_size=SD_SIZE, dino_image_size=DINO_SIZE, seed=3, preprocess="pad")
    padded = B.SDDinoFeaturizer(tiny["sd"], spy, tiny["dinov2"], settings)
    parts = padded.image_parts(images, ["cat", "cat"])
    assert seen == [[(SD_SIZE, SD_SIZE)] * 2]  # the captioner got the padded squares
    sd_squares = [pad_image(image, SD_SIZE) for image in images]
    expected_maps = padded.sd_maps(sd_squares, ["cat", "cat"])
    assert all(torch.equal(parts[0].sd_maps[i], expected_maps[i][0]) for i in range(3))
    dino_squares = [pad_image(image, DINO_SIZE) for image in images]
    assert torch.equal(parts[1].dino, padded.dino_part(dino_squares, (8, 8))[1])
    squashed = _featurizer(tiny, dino=True).image_parts(images, ["cat", "cat"])
    assert not torch.equal(squashed[0].dino, parts[0].dino)  # squashed and padded inputs differ
    with pytest.raises(ValueError, match="preprocess must be one of"):
        _featurizer(tiny, dino=False, preprocess="crop")


# -------------------------------------------------------------------------------- per-pair evaluation


def _pairs(root: Path) -> pd.DataFrame:
    """Three pairs of 64 x 64 images with keypoints on cells of an 8 x 8 grid; the last pair is flipped."""
    for i, image in enumerate(_images(3, seed=11, size=(64, 64))):
        image.save(root / f"img{i}.png")
    kps = grid_to_image(torch.tensor([[1.0, 2.0], [5.0, 3.0], [7.0, 7.0]]), 8, 64).tolist()
    return pd.DataFrame(
        {
            "pair_id": ["p0", "p1", "p2"],
            "category": ["cat", "cat", "dog"],
            "src_image": ["img0.png", "img1.png", "img2.png"],
            "trg_image": ["img1.png", "img2.png", "img0.png"],
            "src_width": 64,
            "src_height": 64,
            "trg_width": 64,
            "trg_height": 64,
            "src_kps": [kps] * 3,
            "trg_kps": [kps] * 3,
            "src_bbox": [None] * 3,
            "trg_bbox": [None] * 3,
            "flip": [False, False, True],
            "n_kps": 3,
            "threshold_kind": "img",
        }
    )


def test_evaluate_pairs_per_pair_loads_flips_and_scores(tmp_path):
    pairs = _pairs(tmp_path)
    seen: list[tuple[Image.Image, Image.Image, str]] = []
    one_hot = torch.eye(64).reshape(64, 8, 8)  # every cell its own descriptor: NN recovers the same cell

    def pair_fn(src: Image.Image, trg: Image.Image, category: str) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((src, trg, category))
        return one_hot, one_hot

    settings = MatchingSettings(image_size=64, methods=("nn", "kernel_softmax"), alphas=(0.05, 0.1))
    per_pair = B.evaluate_pairs_per_pair(pairs, pair_fn, settings, tmp_path)
    assert len(per_pair) == 3 * 2 * 2
    assert (per_pair.loc[per_pair.method == "nn", "pck"] == 100.0).all()
    assert [category for _, _, category in seen] == ["cat", "cat", "dog"]
    img2, img0 = (Image.open(tmp_path / name).convert("RGB") for name in ("img2.png", "img0.png"))
    assert np.array_equal(np.asarray(seen[2][0]), np.asarray(ImageOps.mirror(img2)))
    assert np.array_equal(np.asarray(seen[2][1]), np.asarray(ImageOps.mirror(img0)))
    assert np.array_equal(
        np.asarray(seen[0][1]), np.asarray(Image.open(tmp_path / "img1.png").convert("RGB"))
    )


def test_evaluate_pairs_per_pair_with_sd_dino(tiny, tmp_path):
    pairs = _pairs(tmp_path)
    featurizer = _featurizer(tiny, dino=True)
    settings = MatchingSettings(image_size=64, methods=("nn",), alphas=(0.05, 0.1))
    per_pair = B.evaluate_pairs_per_pair(pairs, featurizer.pair_features, settings, tmp_path)
    assert len(per_pair) == 3 * 1 * 2
    assert list(per_pair.pair_id) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert (per_pair.n_kps == 3).all()
    assert featurizer.unet_passes == 3


# ------------------------------------------------------------------------- SD+DINO once per image


def _network_samples(tiny) -> tuple[dict[str, int], list]:
    """Images seen by the UNet (per noise copy), VAE encoder, captioner CLIP and DINOv2 (hook counters)."""
    modules = {
        "unet": tiny["sd"].unet,
        "vae": tiny["sd"].vae.encoder,
        "clip": tiny["clip"],
        "dinov2": tiny["dinov2"],
    }
    seen = {name: 0 for name in modules}

    def counter(name):
        def hook(module, args, kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            seen[name] += first.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(counter(n), with_kwargs=True) for n, m in modules.items()]
    return seen, handles


def _shared_image_pairs(root: Path) -> pd.DataFrame:
    """Seven pairs over five images in two categories; images recur across pairs and one pair is flipped."""
    for i, image in enumerate(_images(5, seed=21, size=(80, 60))):
        image.save(root / f"im{i}.png")
    kps = [[5.0, 7.0], [40.0, 30.0], [70.0, 50.0]]
    links = [(0, 1, "cat"), (1, 0, "cat"), (0, 2, "cat"), (2, 1, "cat"), (3, 4, "dog"), (4, 3, "dog")]
    links.append((3, 4, "dog"))
    flips = [False] * 6 + [True]
    return pd.DataFrame(
        {
            "pair_id": [f"p{i}" for i in range(len(links))],
            "category": [c for _, _, c in links],
            "src_image": [f"im{a}.png" for a, _, _ in links],
            "trg_image": [f"im{b}.png" for _, b, _ in links],
            "src_width": 80,
            "src_height": 60,
            "trg_width": 80,
            "trg_height": 60,
            "src_kps": [kps] * len(links),
            "trg_kps": [kps[::-1]] * len(links),
            "src_bbox": [[0.0, 0.0, 79.0, 59.0]] * len(links),
            "trg_bbox": [[0.0, 0.0, 79.0, 59.0]] * len(links),
            "flip": flips,
            "n_kps": 3,
            "threshold_kind": "bbox",
        }
    )


def _old_pair_features(featurizer: B.SDDinoFeaturizer, src_image, trg_image, category):
    """The per-pair SD+DINO path as it was before features were computed per image (verbatim)."""
    src_sd, trg_sd = featurizer.sd_part(featurizer.sd_maps([src_image, trg_image], [category, category]))
    if featurizer.dino is None:
        return src_sd.cpu(), trg_sd.cpu()
    dino = featurizer.dino_part([src_image, trg_image], src_sd.shape[-2:])
    fused = F.normalize(torch.cat([torch.stack([src_sd, trg_sd]), dino], dim=1), dim=1)
    return fused[0].cpu(), fused[1].cpu()


@pytest.mark.parametrize("dino", [True, False])
def test_per_image_path_equals_the_per_pair_path(tiny, tmp_path, dino):
    pairs = _shared_image_pairs(tmp_path)
    settings = MatchingSettings(image_size=64, methods=("nn", "kernel_softmax"), alphas=(0.05, 0.1, 0.15))
    featurizer = _featurizer(tiny, dino=dino, ensemble=2, max_batch=3)
    seen, handles = _network_samples(tiny)
    try:
        old = lambda a, b, c: _old_pair_features(featurizer, a, b, c)  # noqa: E731
        before = B.evaluate_pairs_per_pair(pairs, old, settings, tmp_path)
        per_pair_seen, per_pair_passes = dict(seen), featurizer.unet_passes
        seen.update(dict.fromkeys(seen, 0))
        featurizer.unet_passes = 0
        after = B.evaluate_sd_dino(pairs, featurizer, settings, tmp_path, image_batch=2)
    finally:
        for handle in handles:
            handle.remove()
    pd.testing.assert_frame_equal(after, before)
    # per pair: 7 pairs x 2 images through every network (the UNet twice: 2 noise copies)
    assert per_pair_seen == {"unet": 28, "vae": 14, "clip": 14, "dinov2": 14 if dino else 0}
    assert per_pair_passes == 7 * 2  # 4 latents per pair in UNet calls of at most 3
    # per image: cat has im0-im2, dog has im3, im4 and their flipped copies = 7 distinct images
    assert seen == {"unet": 14, "vae": 7, "clip": 7, "dinov2": 7 if dino else 0}
    assert featurizer.unet_passes == 3 + 4  # latents per image batch: cat 4 + 2, dog 4 + 4; calls of <= 3
    src, trg = _images(2, seed=23)
    for new_feat, old_feat in zip(
        featurizer.pair_features(src, trg, "cat"),
        _old_pair_features(featurizer, src, trg, "cat"),
        strict=True,
    ):
        assert torch.equal(new_feat, old_feat)  # same batch of two: bit for bit


def test_per_image_parts_do_not_depend_on_the_batch(tiny):
    featurizer = _featurizer(tiny, dino=True)
    images = _images(3, seed=22)
    together = featurizer.image_parts(images, ["cat", "cat", "dog"])
    alone = [
        featurizer.image_parts([image], [category])[0]
        for image, category in zip(images, ["cat", "cat", "dog"], strict=True)
    ]
    for a, b in zip(together, alone, strict=True):
        for map_a, map_b in zip(a.sd_maps, b.sd_maps, strict=True):
            assert torch.allclose(map_a, map_b, atol=1e-5)  # batched convolutions differ in the last ulp
        assert torch.allclose(a.dino, b.dino, atol=1e-6)
    src, trg = featurizer.pair_from_parts(together[0], together[2])
    ref_src, ref_trg = featurizer.pair_features(images[0], images[2], "cat")
    # the co-PCA of the tiny maps (8 cells for 64 channels) has near-zero singular values that amplify the
    # last-ulp differences to ~1e-5; predictions stay the same (the tests above compare the PCK tables)
    assert torch.allclose(src, ref_src, atol=1e-4) and torch.allclose(trg, ref_trg, atol=1e-4)


def test_sd_dino_per_image_on_real_pfwillow_pairs(tiny, shared_data):
    from sd4match.datasets import parse_pfwillow

    willow = shared_data / "pf-willow"
    table = parse_pfwillow(willow, willow / "test_pairs.csv")
    pairs = pd.concat([g.head(6) for _, g in table.groupby("category", sort=False)][:2], ignore_index=True)
    settings = MatchingSettings(image_size=96, methods=("nn", "soft_argmax", "kernel_softmax"), alphas=(0.1,))
    featurizer = _featurizer(tiny, dino=True)
    before = B.evaluate_pairs_per_pair(pairs, featurizer.pair_features, settings, willow)
    passes_before, featurizer.unet_passes = featurizer.unet_passes, 0
    after = B.evaluate_sd_dino(pairs, featurizer, settings, willow)
    pd.testing.assert_frame_equal(after, before)
    n_images = sum(len(set(g.src_image) | set(g.trg_image)) for _, g in pairs.groupby("category", sort=False))
    assert passes_before == 12 and featurizer.unet_passes == sum(
        -(-len(set(g.src_image) | set(g.trg_image)) // 8) for _, g in pairs.groupby("category")
    )
    assert n_images < 2 * len(pairs)


def test_image_batch_must_be_positive(tiny, tmp_path):
    with pytest.raises(ValueError, match="image_batch must be >= 1"):
        B.image_parts_for(_featurizer(tiny, dino=False), [], tmp_path, 0)


def test_run_zero_shot_sd_dino_scores_every_pair_once_per_image(tiny, tmp_path):
    from sd4match.data_sources import DatasetLocation, write_location
    from sd4match.datasets import write_pairs_table
    from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
    from sd4match.models import ModelRecord, write_model_record
    from sd4match.zero_shot import Captioner, run_zero_shot

    pairs = _shared_image_pairs(tmp_path).assign(dataset="spair", split="test")
    write_pairs_table(pairs, tmp_path / "pairs.parquet")
    write_location(DatasetLocation("spair", str(tmp_path)), tmp_path / "fetch.json")
    records = {}
    for role, name in (("model", "sd15"), ("dino_model", "dinov2"), ("clip_model", "clip")):
        records[role] = tmp_path / f"{name}.json"
        write_model_record(
            ModelRecord(name, name, "main", "x", str(tiny["root"] / name), "local"), records[role]
        )
    method = {
        "kind": "sd_dino",
        "model": "sd15",
        "dino_model": "dinov2",
        "prompt": "implicit",
        "image_size": SD_SIZE,
        "dino_image_size": DINO_SIZE,
        "timestep": 100,
        "ensemble": 1,
    }
    matching = {"methods": ["nn"], "kernel_sigma": 7.0, "softmax_temperature": 0.04}
    features = {"precision": "fp32", "max_unet_batch": 8}
    summary = run_zero_shot(
        method,
        records,
        SplitInputs(tmp_path / "pairs.parquet", tmp_path / "fetch.json"),
        JobSettings(features, matching, [0.1], None, 64, 3),
        JobOutputs(tmp_path / "per_pair.csv", tmp_path / "summary.csv"),
        captioner=Captioner(tiny["checkpoint"], {"prefix": B.ODISE_PREFIX}),
    )
    per_pair = pd.read_csv(tmp_path / "per_pair.csv")
    reference = B.evaluate_pairs_per_pair(
        pairs, _featurizer(tiny, dino=True).pair_features, MatchingSettings(64, ("nn",), (0.1,)), tmp_path
    )
    assert list(per_pair.pair_id) == list(reference.pair_id)
    assert per_pair.pck.tolist() == reference.pck.tolist()
    assert int(summary.loc[summary.category == "All", "n_pairs"].iloc[0]) == 7
