"""SDFeaturizer on the tiny SD 2-1: truncated UNet == full UNet's up_blocks[1], ensemble, normalisation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd4match.features import SDFeaturizer, preprocess, sample_latents
from sd4match.models import SDComponents, load_stable_diffusion
from sd4match.prompts import encode_text
from sd4match.tiny_models import build_tiny_stable_diffusion

S = 128
T = 261
C_UP1 = 64  # reversed((32, 32, 64, 64))[1]


@pytest.fixture(scope="session")
def sd(tmp_path_factory: pytest.TempPathFactory) -> SDComponents:
    folder = build_tiny_stable_diffusion(tmp_path_factory.mktemp("features_sd") / "sd21", seed=0)
    return load_stable_diffusion(folder)


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 120), (140, 70))
    ]
    return preprocess(images, S)


@pytest.fixture(scope="session")
def context(sd: SDComponents) -> torch.Tensor:
    with torch.no_grad():
        return encode_text(sd.text_encoder, sd.tokenizer, ["a photo of a cat", "a photo of a dog"])


def _count_calls(modules: dict[str, torch.nn.Module]) -> tuple[Counter, list]:
    """Forward-hook counters that never interfere with the forward."""
    counts: Counter = Counter()
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: counts.update([name]))
        for name, module in modules.items()
    ]
    return counts, handles


def test_preprocess_exact_values_for_2x1_image() -> None:
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (255, 0, 51))
    image.putpixel((1, 0), (0, 255, 204))
    pixels = preprocess([image], 2)
    expected = torch.tensor(
        [
            [[1.0, -1.0], [1.0, -1.0]],
            [[-1.0, 1.0], [-1.0, 1.0]],
            [[51 / 127.5 - 1, 204 / 127.5 - 1], [51 / 127.5 - 1, 204 / 127.5 - 1]],
        ]
    )
    assert pixels.shape == (1, 3, 2, 2) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], expected, atol=1e-7, rtol=0)


def test_preprocess_is_anisotropic_and_validates() -> None:
    pixels = preprocess([Image.new("RGB", (100, 30), (0, 127, 255)), Image.new("L", (7, 300), 255)], 64)
    assert pixels.shape == (2, 3, 64, 64)
    torch.testing.assert_close(
        pixels[0, :, 5, 40], torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]), atol=1e-7, rtol=0
    )
    assert torch.equal(pixels[1], torch.ones(3, 64, 64))
    with pytest.raises(ValueError, match="image_size"):
        preprocess([Image.new("RGB", (2, 2))], 0)
    with pytest.raises(ValueError, match="empty"):
        preprocess([], 64)


def test_latents_match_cached_distribution_sampling(sd: SDComponents, pixels: torch.Tensor) -> None:
    featurizer = SDFeaturizer(sd)
    latents = featurizer.encode_latents(pixels, torch.Generator().manual_seed(5))
    assert latents.shape == (2, 4, S // 8, S // 8)
    mean, std = featurizer.latent_distribution(pixels)
    again = sample_latents(mean, std, featurizer.scaling_factor, torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, again, atol=0, rtol=0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, (mean + std * eps) * 0.18215, atol=1e-7, rtol=0)


def test_add_noise_is_forward_diffusion(sd: SDComponents) -> None:
    featurizer = SDFeaturizer(sd)
    latents, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)[T]
    expected = np.sqrt(alpha_bar) * 1.0 + np.sqrt(1.0 - alpha_bar) * 2.0
    noisy = featurizer.add_noise(latents, noise, T)
    torch.testing.assert_close(noisy, torch.full((1, 4, 2, 2), float(expected)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="timestep"):
        featurizer.add_noise(latents, noise, 1000)


def test_truncated_unet_equals_full_unet_up_block_1(
    sd: SDComponents, pixels: torch.Tensor, context: torch.Tensor
) -> None:
    featurizer = SDFeaturizer(sd)
    generator = torch.Generator().manual_seed(0)
    latents = featurizer.encode_latents(pixels, generator)
    noisy = featurizer.add_noise(latents, torch.randn(latents.shape, generator=generator), T)
    unet = sd.unet
    counts, handles = _count_calls({"up2": unet.up_blocks[2], "conv_out": unet.conv_out})
    captured: dict[str, torch.Tensor] = {}
    handles.append(unet.up_blocks[1].register_forward_hook(lambda m, a, o: captured.update(up1=o)))
    try:
        with torch.no_grad():
            full = unet(noisy, torch.tensor(T), encoder_hidden_states=context).sample
            assert counts == Counter({"up2": 1, "conv_out": 1}) and full.shape == (2, 4, 16, 16)
            counts.clear()
            truncated = featurizer.truncated_unet(noisy, T, context)
    finally:
        for handle in handles:
            handle.remove()
    assert counts == Counter()  # nothing after up_blocks[1] ran
    assert truncated.shape == (2, C_UP1, S // 16, S // 16)
    torch.testing.assert_close(truncated, captured["up1"], atol=1e-6, rtol=0)
    assert len(unet.up_blocks[1]._forward_hooks) == 0


def test_feature_shape_norm_and_pass_counts(
    sd: SDComponents, pixels: torch.Tensor, context: torch.Tensor
) -> None:
    featurizer = SDFeaturizer(sd, max_batch=4)
    assert featurizer.text_encoder is sd.text_encoder
    with torch.no_grad():
        features = featurizer(pixels, context, T, ensemble=3, generator=torch.Generator().manual_seed(0))
        assert (featurizer.unet_passes, featurizer.unet_samples) == (2, 6)  # 6 latents in chunks of 4
        featurizer(pixels, context, T, ensemble=3, generator=torch.Generator().manual_seed(0), max_batch=1)
    assert features.shape == (2, C_UP1, S // 16, S // 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, S // 16, S // 16), atol=1e-5, rtol=0)
    assert (featurizer.unet_passes, featurizer.unet_samples) == (8, 12)


def test_ensemble_is_mean_of_single_draws(
    sd: SDComponents, pixels: torch.Tensor, context: torch.Tensor
) -> None:
    featurizer = SDFeaturizer(sd)
    generator = torch.Generator().manual_seed(7)
    latents = featurizer.encode_latents(pixels, generator)
    alpha_bar = sd.scheduler.alphas_cumprod[T]
    raw = []
    with torch.no_grad():
        for _ in range(2):
            noise = torch.randn(latents.shape, generator=generator)
            noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
            raw.append(featurizer.truncated_unet(noisy, T, context))
        expected = F.normalize((raw[0] + raw[1]) / 2, dim=1)
        actual = featurizer(pixels, context, T, ensemble=2, generator=torch.Generator().manual_seed(7))
        chunked = featurizer(
            pixels, context, T, ensemble=2, generator=torch.Generator().manual_seed(7), max_batch=3
        )
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, actual, atol=1e-6, rtol=0)


def test_determinism_and_prompt_broadcast(
    sd: SDComponents, pixels: torch.Tensor, context: torch.Tensor
) -> None:
    featurizer = SDFeaturizer(sd)
    with torch.no_grad():
        first = featurizer(pixels, context, 50, ensemble=2, generator=torch.Generator().manual_seed(1))
        second = featurizer(pixels, context, 50, ensemble=2, generator=torch.Generator().manual_seed(1))
        other = featurizer(pixels, context, 50, ensemble=2, generator=torch.Generator().manual_seed(2))
        latents = featurizer.encode_latents(pixels, torch.Generator().manual_seed(3))
        single = featurizer.extract_from_latents(
            latents, context[:1], 50, generator=torch.Generator().manual_seed(4)
        )
        expanded = featurizer.extract_from_latents(
            latents, context[:1].expand(2, -1, -1), 50, generator=torch.Generator().manual_seed(4)
        )
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(single, expanded, atol=0, rtol=0)


def test_autocast_bfloat16_stays_close_to_float32(
    sd: SDComponents, pixels: torch.Tensor, context: torch.Tensor
) -> None:
    with torch.no_grad():
        exact = SDFeaturizer(sd)(pixels, context, T, generator=torch.Generator().manual_seed(0))
        mixed = SDFeaturizer(sd, autocast_dtype=torch.bfloat16)(
            pixels, context, T, generator=torch.Generator().manual_seed(0)
        )
    assert mixed.dtype == torch.float32
    cosine = (exact * mixed).sum(dim=1)
    assert cosine.min() > 0.99 and not torch.equal(exact, mixed)


def test_gradients_reach_the_prompt(sd: SDComponents, pixels: torch.Tensor, context: torch.Tensor) -> None:
    featurizer = SDFeaturizer(sd)
    learned = context.clone().requires_grad_(True)
    features = featurizer(pixels, learned, T, generator=torch.Generator().manual_seed(0))
    (features[0, :, 0, 0] * features[1, :, 1, 1]).sum().backward()
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    assert all(p.grad is None for p in sd.unet.parameters())


def test_hook_removed_on_error_and_bad_arguments(sd: SDComponents, pixels: torch.Tensor) -> None:
    featurizer = SDFeaturizer(sd)
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(RuntimeError):
        featurizer.truncated_unet(latents, T, torch.zeros(1, 77, 5))  # wrong width fails inside the UNet
    assert len(sd.unet.up_blocks[1]._forward_hooks) == 0
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        featurizer.extract_from_latents(torch.zeros(3, 4, 8, 8), torch.zeros(2, 77, 32), T)
    with pytest.raises(ValueError, match="ensemble"):
        featurizer.extract_from_latents(latents, torch.zeros(1, 77, 32), T, ensemble=0)
    with pytest.raises(ValueError, match="timestep"):
        featurizer.truncated_unet(latents, -1, torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match="pixels"):
        featurizer(pixels[:, :1], torch.zeros(2, 77, 32), T)
    with pytest.raises(ValueError, match="up_block_index"):
        SDFeaturizer(sd, up_block_index=4)
    with pytest.raises(ValueError, match="max_batch"):
        SDFeaturizer(sd, max_batch=0)
