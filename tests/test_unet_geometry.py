"""The image-size rule of the config is the SD UNet's geometry, checked on a real UNet2DConditionModel."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from sd4match.tiny_models import tiny_unet
from sd4match.unet_geometry import (
    UNET_DOWN_BLOCKS,
    feature_image_size_problem,
    feature_stride,
    min_unet_image_size,
    unet_image_size_problem,
)


def up_block_sides(unet: UNet2DConditionModel, size: int) -> list[int]:
    """Output side of every up block for an S x S image (latent S / 8)."""
    sides: list[int] = []
    hooks = [
        block.register_forward_hook(lambda m, a, o: sides.append(o.shape[-1])) for block in unet.up_blocks
    ]
    latent = torch.zeros(1, 4, size // 8, size // 8)
    context = torch.zeros(1, 77, unet.config.cross_attention_dim)
    try:
        with torch.no_grad():
            unet(latent, torch.tensor(10), encoder_hidden_states=context)
    finally:
        for hook in hooks:
            hook.remove()
    return sides


def test_block_structure_is_sd_s():
    assert len(tiny_unet("sd21", 0).config.down_block_types) == UNET_DOWN_BLOCKS
    assert len(UNet2DConditionModel().config.down_block_types) == UNET_DOWN_BLOCKS  # diffusers default = SD


def test_strides_and_minimum_by_hand():
    assert [feature_stride(i) for i in range(4)] == [32, 16, 8, 8]
    assert min_unet_image_size() == 64
    assert 768 // feature_stride(1) == 48 and 128 // feature_stride(1) == 8


@pytest.mark.parametrize("size", [64, 128, 192])
def test_feature_grids_of_a_real_unet_match_the_strides(size: int):
    sides = up_block_sides(tiny_unet("sd21", 0), size)
    assert sides == [size // feature_stride(i) for i in range(4)]


def test_below_the_minimum_the_unet_breaks():
    unet = tiny_unet("sd21", 0)
    assert up_block_sides(unet, min_unet_image_size())[1] == 4  # 64 px: one latent cell at the deepest level
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        up_block_sides(unet, 32)  # 32 px: the deepest levels collapse onto a single cell


def test_problem_messages():
    assert feature_image_size_problem(768, 1) is None and feature_image_size_problem(128, 1) is None
    assert "below the 64 px" in feature_image_size_problem(32, 1)
    assert "not a multiple of 16" in feature_image_size_problem(776, 1)
    assert "not a multiple of 32" in feature_image_size_problem(784, 0)
    assert unet_image_size_problem(64) is None and "not a multiple of 8" in unet_image_size_problem(100)
    with pytest.raises(ValueError, match="up_block_index must be in"):
        feature_stride(4)
