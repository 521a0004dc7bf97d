"""Tests of sd4match.matching: frames, descriptor sampling, correlation and the three localisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd4match import matching
from sd4match.metrics import pck


def test_image_grid_mapping_values_and_round_trip() -> None:
    xy = torch.tensor([[0.0, 767.0], [383.5, 16.0]], dtype=torch.float64)
    grid = matching.image_to_grid(xy, 768, 48)
    # align corners: 767 -> 47, 383.5 -> 23.5, 16 -> 16 * 47 / 767
    torch.testing.assert_close(grid, torch.tensor([[0.0, 47.0], [23.5, 16 * 47 / 767]], dtype=torch.float64))
    torch.testing.assert_close(matching.grid_to_image(grid, 48, 768), xy)
    back = matching.image_to_grid(matching.grid_to_image(torch.tensor([[3.25, 46.0]]), 48, 768), 768, 48)
    torch.testing.assert_close(back, torch.tensor([[3.25, 46.0]]))


def test_mapping_rejects_degenerate_sizes() -> None:
    with pytest.raises(ValueError, match="grid_size"):
        matching.image_to_grid(torch.zeros(1, 2), 768, 1)


def test_to_squashed_frame_scales_and_clamps_numpy_and_torch() -> None:
    kps = [[500.0, 334.0], [250.0, 167.0], [-3.0, 0.0]]
    # 500x334 -> 768: x * 768 / 500, y * 768 / 334; (768, 768) is clamped to 767, -4.608 to 0
    expected = np.array([[767.0, 767.0], [384.0, 384.0], [0.0, 0.0]])
    np.testing.assert_allclose(matching.to_squashed_frame(kps, 500, 334, 768), expected, rtol=0, atol=1e-12)
    out = matching.to_squashed_frame(torch.tensor(kps, dtype=torch.float64), 500, 334, 768)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.from_numpy(expected))


def test_bbox_to_squashed_frame_scales_without_clamp() -> None:
    out = matching.bbox_to_squashed_frame([14, 71, 483, 334], 500, 334, 768)
    np.testing.assert_allclose(out, [14 * 768 / 500, 71 * 768 / 334, 483 * 768 / 500, 768.0], rtol=1e-15)
    with pytest.raises(ValueError, match="bbox"):
        matching.bbox_to_squashed_frame([1.0, 2.0, 3.0], 500, 334, 768)


def _features(c: int = 3, h: int = 5, w: int = 5) -> torch.Tensor:
    """Deterministic positive features (1, C, h, w) in float64."""
    return torch.arange(1, c * h * w + 1, dtype=torch.float64).reshape(1, c, h, w).remainder(7.0) + 0.5


def test_sample_descriptors_at_grid_points_and_midpoints() -> None:
    feat = _features()
    # S = 65, s = 5: grid = x * 4 / 64 = x / 16, so cell (x=2, y=3) is image point (32, 48)
    kps = torch.tensor([[[32.0, 48.0], [24.0, 16.0]]], dtype=torch.float64)
    desc = matching.sample_descriptors(feat, kps, 65)
    assert desc.shape == (1, 2, 3)
    col = feat[0, :, 3, 2]
    torch.testing.assert_close(desc[0, 0], col / col.norm())
    mid = 0.5 * (feat[0, :, 1, 1] + feat[0, :, 1, 2])  # (24, 16) -> cell (1.5, 1)
    torch.testing.assert_close(desc[0, 1], mid / mid.norm())


def test_sample_descriptors_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="sample_descriptors"):
        matching.sample_descriptors(_features(), torch.zeros(2, 2), 65)


def test_correlation_is_cosine_similarity() -> None:
    feat = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    feat[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    feat[0, :, 0, 1] = torch.tensor([0.0, -2.0])
    feat[0, :, 0, 2] = torch.tensor([1.0, 1.0])
    desc = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    corr = matching.correlation(desc, feat)
    torch.testing.assert_close(corr, torch.tensor([[[[0.6, 0.0, 2**-0.5]]]], dtype=torch.float64))


def test_nearest_neighbour_returns_x_then_y() -> None:
    corr = torch.zeros(2, 1, 4, 6)
    corr[0, 0, 1, 5] = 1.0  # row 1, column 5 -> (x=5, y=1)
    corr[1, 0, 3, 0] = 0.5
    nn = matching.nearest_neighbour(corr)
    assert nn.dtype == torch.float32
    torch.testing.assert_close(nn, torch.tensor([[[5.0, 1.0]], [[0.0, 3.0]]]))


def _symmetric_peak(h: int, w: int, x0: int, y0: int) -> torch.Tensor:
    """Map with 1 at (x0, y0), 0.5 at its 4-neighbours and 0 elsewhere (symmetric around the peak)."""
    corr = torch.zeros(h, w, dtype=torch.float64)
    corr[y0, x0] = 1.0
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        corr[y0 + dy, x0 + dx] = 0.5
    return corr


def test_soft_localisers_return_interior_symmetric_peak() -> None:
    corr = _symmetric_peak(7, 9, 3, 2)[None, None]
    expected = torch.tensor([[[3.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(matching.kernel_soft_argmax(corr), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(matching.soft_argmax(corr), expected, rtol=0, atol=1e-4)


def _numpy_soft_argmax(corr: np.ndarray, temperature: float) -> np.ndarray:
    """Reference: expectation of (x, y) under softmax(corr / T) over an (h, w) map."""
    ys, xs = np.mgrid[0 : corr.shape[0], 0 : corr.shape[1]]
    logits = corr / temperature
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    return np.array([(prob * xs).sum(), (prob * ys).sum()])


def test_kernel_softmax_suppresses_far_second_peak() -> None:
    corr = np.zeros((5, 5))
    corr[0, 0] = 1.0  # main peak at (x=0, y=0)
    corr[4, 4] = 0.98  # far secondary peak at (x=4, y=4)
    ys, xs = np.mgrid[0:5, 0:5]
    gauss = np.exp(-(xs**2 + ys**2) / (2 * 7.0**2))  # centred on the argmax (0, 0)
    expected_kernel = _numpy_soft_argmax(corr * gauss, 0.04)
    expected_plain = _numpy_soft_argmax(corr, 0.04)
    # plain: weights e^25 and e^24.5 -> x = y ~ 4 e^-0.5 / (1 + e^-0.5) ~ 1.51
    np.testing.assert_allclose(expected_plain, [4 * np.exp(-0.5) / (1 + np.exp(-0.5))] * 2, atol=1e-6)
    t = torch.from_numpy(corr)[None, None]
    got_kernel = matching.kernel_soft_argmax(t, sigma=7.0, temperature=0.04)[0, 0].numpy()
    got_plain = matching.soft_argmax(t, temperature=0.04)[0, 0].numpy()
    np.testing.assert_allclose(got_kernel, expected_kernel, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got_plain, expected_plain, rtol=0, atol=1e-10)
    assert got_kernel[0] < 0.01 and got_plain[0] > 1.5


def test_soft_argmax_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        matching.soft_argmax(torch.zeros(3, 3), temperature=0.0)


def _one_hot_positions(s: int) -> torch.Tensor:
    """(1, s*s, s, s) features whose cell (x, y) is the one-hot vector of index y * s + x."""
    return torch.eye(s * s, dtype=torch.float64).reshape(s * s, s, s)[None]


@pytest.mark.parametrize("method", matching.MATCHING_METHODS)
def test_oracle_one_hot_features_recover_flipped_keypoints(method: str) -> None:
    s, size = 5, 65  # grid cell x <-> image x = 16 x
    src_feat = _one_hot_positions(s)
    trg_feat = src_feat.flip(-1)  # target cell (x, y) holds source cell (s - 1 - x, y)
    src_kps = torch.tensor([[[0.0, 0.0], [16.0, 32.0], [64.0, 48.0], [48.0, 64.0]]], dtype=torch.float64)
    gt = src_kps.clone()
    gt[..., 0] = (size - 1) - gt[..., 0]
    pred = matching.match_keypoints(src_feat, trg_feat, src_kps, size, method)
    tol = 0.0 if method == "nn" else 1e-6
    torch.testing.assert_close(pred, gt, rtol=0, atol=tol)
    counts = pck(pred[0].numpy(), gt[0].numpy(), threshold=size, alphas=(0.05,))
    assert counts == {0.05: 4}


def test_match_keypoints_rejects_unknown_method() -> None:
    feat = _one_hot_positions(3)
    with pytest.raises(ValueError, match="'argmax'"):
        matching.match_keypoints(feat, feat, torch.zeros(1, 1, 2, dtype=torch.float64), 33, "argmax")


def test_localise_gives_every_method_from_one_map() -> None:
    corr = _symmetric_peak(7, 9, 3, 2)[None, None]
    out = matching.localise(corr, ("kernel_softmax", "nn", "soft_argmax"), temperature=0.04, sigma=7.0)
    assert list(out) == ["kernel_softmax", "nn", "soft_argmax"]
    assert torch.equal(out["nn"], torch.tensor([[[3.0, 2.0]]], dtype=torch.float64))
    assert torch.equal(out["soft_argmax"], matching.soft_argmax(corr, 0.04))
    assert torch.equal(out["kernel_softmax"], matching.kernel_soft_argmax(corr, 7.0, 0.04))
    with pytest.raises(ValueError, match="'argmax'"):
        matching.localise(corr, ("nn", "argmax"))
    with pytest.raises(ValueError, match="unknown method"):
        matching.localise(corr, ())


def test_localise_promotes_half_maps_to_fp32() -> None:
    corr = torch.zeros(1, 5, 5, dtype=torch.float16)
    corr[0, 1, 3] = 1.0
    out = matching.localise(corr, ("nn", "soft_argmax"))
    assert out["nn"].dtype == out["soft_argmax"].dtype == torch.float32
    # e^(1/0.04) = e^25 dwarfs the 24 cells at 0: the soft-argmax sits on (3, 1) to ~1e-9
    torch.testing.assert_close(out["soft_argmax"], torch.tensor([[3.0, 1.0]]), rtol=0, atol=1e-6)


def test_kernel_soft_argmax_with_given_peak_equals_recomputed_peak() -> None:
    corr = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    peak = matching.nearest_neighbour(corr)
    assert torch.equal(
        matching.kernel_soft_argmax(corr, 2.0, 0.1, peak=peak), matching.kernel_soft_argmax(corr, 2.0, 0.1)
    )


def test_match_all_equals_match_keypoints_per_method() -> None:
    gen = torch.Generator().manual_seed(0)
    src, trg = torch.randn(2, 2, 6, 5, 5, generator=gen, dtype=torch.float64)
    kps = torch.rand(2, 4, 2, generator=gen, dtype=torch.float64) * 64
    out = matching.match_all(src, trg, kps, 65)
    assert list(out) == list(matching.MATCHING_METHODS)
    for method in matching.MATCHING_METHODS:
        assert out[method].shape == (2, 4, 2)
        assert torch.equal(out[method], matching.match_keypoints(src, trg, kps, 65, method))
    with pytest.raises(ValueError, match="square"):
        matching.match_all(src, trg[..., :4], kps, 65)


def test_ieee_fp32_matmul_restores_the_setting_and_ignores_the_cpu() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with matching.ieee_fp32_matmul(torch.device("cuda")):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with matching.ieee_fp32_matmul(torch.device("cpu")):
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_sample_bank_descriptors_equal_sampling_the_gathered_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(5, 7, 6, 6, generator=gen)
    index = torch.tensor([3, 3, 0, 4, 3])  # image 3 serves three pairs, images 1 and 2 none
    kps = torch.rand(5, 4, 2, generator=gen) * 80
    got = matching.sample_bank_descriptors(bank, index, kps, 81)
    want = matching.sample_descriptors(bank[index], kps, 81)
    assert got.shape == (5, 4, 7) and got.stride() == want.stride()
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="sample_bank_descriptors"):
        matching.sample_bank_descriptors(bank, index[:2], kps, 81)


def test_match_in_bank_equals_match_all_on_the_gathered_pairs() -> None:
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64)
    src, trg = torch.tensor([0, 2, 2]), torch.tensor([1, 1, 3])
    kps = torch.rand(3, 4, 2, generator=gen, dtype=torch.float64) * 64
    unit = torch.nn.functional.normalize(bank, dim=1)
    got = matching.match_in_bank(bank, unit, src, trg, kps, 65)
    want = matching.match_all(bank[src], bank[trg], kps, 65)
    assert list(got) == list(want) == list(matching.MATCHING_METHODS)
    for method in matching.MATCHING_METHODS:
        torch.testing.assert_close(got[method], want[method], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="unit_bank"):
        matching.match_in_bank(bank, unit[:2], src, trg, kps, 65)
