"""Image sizes the Stable Diffusion UNet can take, derived from its block structure (SD 1-5 and SD 2-1).

The VAE maps an S x S image to an S/8 latent. The UNet has four down blocks; all but the last end with a
stride-2 downsampler, so its deepest level works on S / (8 * 2^3) = S/64 cells. Each up block but the last
upsamples by 2 on its way out, so ``up_blocks[1]`` (the feature block) outputs S/16 cells: 16 pixels per
cell, 48 x 48 at S = 768 (paper), 8 x 8 at S = 128 (demo). Torch-free, so the config check at parse time
stays cheap; ``tests/test_unet_geometry.py`` checks every number against a real ``UNet2DConditionModel``.
"""

from __future__ import annotations

VAE_DOWNSAMPLING = 8  # the VAE encoder's three stride-2 stages
UNET_DOWN_BLOCKS = 4  # down_blocks of SD 1-5 / 2-1 (CrossAttnDownBlock2D x 3, DownBlock2D)
MIN_FEATURE_CELLS = 2  # matching, PCK and the loss map points with align-corners: s - 1 >= 1


def unet_downsamplers(n_down_blocks: int = UNET_DOWN_BLOCKS) -> int:
    """Stride-2 downsamplers of the UNet: every down block but the last has one."""
    return n_down_blocks - 1


def feature_stride(up_block_index: int, n_down_blocks: int = UNET_DOWN_BLOCKS) -> int:
    """Image pixels per feature cell at the output of ``unet.up_blocks[up_block_index]`` (16 for index 1)."""
    n_down = unet_downsamplers(n_down_blocks)
    if not 0 <= up_block_index <= n_down:
        raise ValueError(f"feature_stride: up_block_index must be in [0, {n_down}], got {up_block_index}")
    upsampled = min(up_block_index + 1, n_down)
    return VAE_DOWNSAMPLING * 2 ** (n_down - upsampled)


def min_unet_image_size(n_down_blocks: int = UNET_DOWN_BLOCKS) -> int:
    """Smallest S whose deepest UNet level still holds one whole latent cell: 8 * 2^3 = 64.

    Below it the downsamplers pad a 1-cell map onto itself, and the deepest blocks see a single value per
    normalisation group (the demo's tiny UNet then fails inside the job).
    """
    return VAE_DOWNSAMPLING * 2 ** unet_downsamplers(n_down_blocks)


def unet_image_size_problem(size: int, multiple_of: int = VAE_DOWNSAMPLING) -> str | None:
    """Why the UNet cannot take an S x S image (None if it can): S >= 64 and a multiple of ``multiple_of``."""
    minimum = min_unet_image_size()
    if size < minimum:
        return (
            f"is {size} px, below the {minimum} px the SD UNet needs (the VAE divides by "
            f"{VAE_DOWNSAMPLING} and the UNet's {unet_downsamplers()} downsamplers by "
            f"{2 ** unet_downsamplers()} more, leaving one latent cell at its deepest level)"
        )
    if size % multiple_of:
        return f"is {size} px, not a multiple of {multiple_of}"
    return None


def feature_image_size_problem(size: int, up_block_index: int) -> str | None:
    """Why SD features from ``up_blocks[up_block_index]`` cannot be taken at S x S (None when they can).

    S must suit the UNet, be a multiple of the block's stride (S / stride cells exactly: the frame contract
    of docs/ARCHITECTURE.md) and give at least two cells per side.
    """
    stride = feature_stride(up_block_index)
    problem = unet_image_size_problem(size, multiple_of=stride)
    if problem is not None:
        return problem + f" (unet.up_blocks[{up_block_index}] has {stride} px per feature cell)"
    if size // stride < MIN_FEATURE_CELLS:
        return (
            f"gives {size // stride} feature cell(s) per side at unet.up_blocks[{up_block_index}] "
            f"({stride} px per cell); matching needs >= {MIN_FEATURE_CELLS}"
        )
    return None
