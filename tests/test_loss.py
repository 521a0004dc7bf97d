"""Gaussian-window cross-entropy: hand-computed values, border masking, temperature, valid mask, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd4match.loss import check_finite, gaussian_window_weights, matching_loss


def _unit_vectors(angles: np.ndarray) -> torch.Tensor:
    """(1, 2, h, w) map of unit vectors at the given (h, w) angles: cosine with (1, 0) is cos(angle)."""
    return torch.from_numpy(np.stack([np.cos(angles), np.sin(angles)])[None]).float()


def _constant_source(h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w) source map equal to (2, 0) everywhere: every sampled descriptor is (1, 0) after L2."""
    feat = torch.zeros(1, 2, h, w)
    feat[:, 0] = 2.0
    return feat


def _bilinear(prob: np.ndarray, x: float, y: float) -> float:
    """Reference bilinear interpolation of an (h, w) array at an in-map point (x, y)."""
    h, w = prob.shape
    x0, y0 = min(int(math.floor(x)), w - 2), min(int(math.floor(y)), h - 2)
    fx, fy = x - x0, y - y0
    top = (1 - fx) * prob[y0, x0] + fx * prob[y0, x0 + 1]
    bottom = (1 - fx) * prob[y0 + 1, x0] + fx * prob[y0 + 1, x0 + 1]
    return (1 - fy) * top + fy * bottom


def _reference_keypoint_loss(
    corr: np.ndarray, gx: float, gy: float, temperature: float, window: int, sigma: float
) -> float:
    """Reference in float64: -sum over in-map window cells of Gaussian weight * log(bilinear softmax)."""
    logits = (corr - corr.max()) / temperature
    prob = np.exp(logits) / np.exp(logits).sum()
    h, w = corr.shape
    total = 0.0
    for dy in range(-(window // 2), window // 2 + 1):
        for dx in range(-(window // 2), window // 2 + 1):
            x, y = gx + dx, gy + dy
            if 0 <= x <= w - 1 and 0 <= y <= h - 1:
                weight = math.exp(-(dx * dx + dy * dy) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
                total -= weight * math.log(_bilinear(prob, x, y))
    return total


def _loss(trg: torch.Tensor, trg_xy: list[list[float]], image_size: int, **kwargs) -> torch.Tensor:
    """Loss of one pair with a constant source map and target keypoints ``trg_xy`` (S frame)."""
    n = len(trg_xy)
    src = _constant_source(*trg.shape[-2:]).to(trg.dtype)
    kps = torch.tensor([trg_xy], dtype=trg.dtype)
    return matching_loss(
        src,
        trg,
        torch.zeros(1, n, 2, dtype=trg.dtype),
        kps,
        torch.ones(1, n, dtype=torch.bool),
        image_size,
        **kwargs,
    )


def test_gaussian_weights_are_unnormalised_2d_gaussian() -> None:
    offsets, weights = gaussian_window_weights(7, 1.5)
    assert offsets.tolist() == [-3, -2, -1, 0, 1, 2, 3]
    assert weights.shape == (7, 7)
    centre = 1 / (2 * math.pi * 2.25)
    assert weights[3, 3].item() == pytest.approx(centre, rel=1e-6)
    assert weights[3, 4].item() == pytest.approx(centre * math.exp(-1 / 4.5), rel=1e-6)
    assert weights[0, 6].item() == pytest.approx(centre * math.exp(-18 / 4.5), rel=1e-6)
    with pytest.raises(ValueError, match="odd"):
        gaussian_window_weights(4, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_window_weights(3, 0.0)


def test_uniform_map_centre_keypoint_by_hand() -> None:
    # identical target cells -> p = 1/9 everywhere; window 3 fully inside around the centre (1, 1)
    trg = _constant_source(3, 3)
    loss = _loss(trg, [[1.0, 1.0]], image_size=3, window=3, sigma=1.0)
    weight_sum = (1 + 4 * math.exp(-0.5) + 4 * math.exp(-1.0)) / (2 * math.pi)
    assert loss.item() == pytest.approx(weight_sum * math.log(9), rel=1e-6)


def test_window_cells_outside_the_map_are_masked() -> None:
    # corner (0, 0): only dx, dy in {0, 1} are inside -> 1 centre, 2 edge, 1 diagonal weight
    trg = _constant_source(3, 3)
    loss = _loss(trg, [[0.0, 0.0]], image_size=3, window=3, sigma=1.0)
    weight_sum = (1 + 2 * math.exp(-0.5) + math.exp(-1.0)) / (2 * math.pi)
    assert loss.item() == pytest.approx(weight_sum * math.log(9), rel=1e-6)
    # half-cell point x = 1.5: position 2.5 (dx = +1) falls outside the 3-wide map
    loss_half = _loss(trg, [[1.5, 1.0]], image_size=3, window=3, sigma=1.0)
    weight_sum_half = (1 + 3 * math.exp(-0.5) + 2 * math.exp(-1.0)) / (2 * math.pi)
    assert loss_half.item() == pytest.approx(weight_sum_half * math.log(9), rel=1e-6)


def test_integer_aligned_target_on_5x5_map_matches_reference() -> None:
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, math.pi, (5, 5))
    trg = _unit_vectors(angles)
    # S = 9 on a 5-cell grid: g = x * 4 / 8, so x = 4, y = 2 -> cell (2, 1)
    loss = _loss(trg, [[4.0, 2.0]], image_size=9, temperature=0.5, window=3, sigma=1.0)
    expected = _reference_keypoint_loss(np.cos(angles), 2.0, 1.0, 0.5, 3, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_single_cell_window_is_minus_log_softmax_by_hand() -> None:
    # 2x3 target map with cosines (1, 0, -1) on the first row, 0 below; window 1 reads one cell exactly
    angles = np.array([[0.0, math.pi / 2, math.pi], [math.pi / 2, math.pi / 2, math.pi / 2]])
    trg = _unit_vectors(angles)
    loss = _loss(trg, [[0.0, 0.0]], image_size=3, temperature=1.0, window=1, sigma=1.0)
    # softmax of cos/T with T = 1 over cells: e^0 (max subtracted) at the GT cell, e^-1 x 4, e^-2 x 1
    log_p = -math.log(1 + 4 * math.exp(-1) + math.exp(-2))
    assert loss.item() == pytest.approx(-log_p / (2 * math.pi), rel=1e-6)


def test_half_cell_target_averages_two_cells() -> None:
    angles = np.array([[0.0, math.pi / 3, math.pi / 2, math.pi]])
    angles = np.repeat(angles, 2, axis=0)
    trg = _unit_vectors(angles)
    # S = 7 on a 4-wide grid: g_x = x * 3 / 6 -> x = 1 gives 0.5 (between cells 0 and 1)
    loss = _loss(trg, [[1.0, 0.0]], image_size=7, temperature=1.0, window=1, sigma=1.0)
    logits = np.cos(angles) - 1.0
    prob = np.exp(logits) / np.exp(logits).sum()
    expected = -math.log((prob[0, 0] + prob[0, 1]) / 2) / (2 * math.pi)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    ref = _reference_keypoint_loss(np.cos(angles), 0.5, 0.0, 1.0, 1, 1.0)
    assert ref == pytest.approx(expected, rel=1e-12)


def test_defaults_on_9x9_map_with_half_cell_target_match_reference() -> None:
    rng = np.random.default_rng(1)
    angles = rng.uniform(0, math.pi, (9, 9))
    trg = _unit_vectors(angles)
    # S = 17 on a 9-cell grid: g = x / 2 -> (5, 14) gives (2.5, 7); the 7x7 window hits both borders
    loss = _loss(trg, [[5.0, 14.0]], image_size=17)
    expected = _reference_keypoint_loss(np.cos(angles), 2.5, 7.0, 0.04, 7, 1.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_temperature_sharpens_a_correct_peak() -> None:
    angles = np.full((5, 5), math.pi / 2)
    angles[2, 2] = 0.0
    trg = _unit_vectors(angles).double()  # float64: log p(GT) is within 1e-10 of 0 at T = 0.04
    losses = {}
    for temperature in (1.0, 0.1, 0.04):
        loss = _loss(trg, [[2.0, 2.0]], image_size=5, temperature=temperature, window=1, sigma=1.0)
        # p(GT) = 1 / (1 + 24 e^{-1/T}) for a cosine of 1 at the GT and 0 elsewhere
        expected = math.log(1 + 24 * math.exp(-1 / temperature)) / (2 * math.pi)
        assert loss.item() == pytest.approx(expected, rel=1e-9)
        losses[temperature] = loss.item()
    assert losses[1.0] > losses[0.1] > losses[0.04]


def test_source_descriptor_is_sampled_at_the_source_keypoint() -> None:
    # source map differs per cell: the descriptor at (x=2, y=0) (S = 3, 3x3 map) is cell (row 0, col 2)
    src_angles = np.zeros((3, 3))
    src_angles[0, 2] = math.pi / 2
    trg_angles = np.array([[0.0, 0.3, 0.9], [1.2, math.pi / 2, 2.0], [2.5, 3.0, math.pi]])
    src, trg = _unit_vectors(src_angles), _unit_vectors(trg_angles)
    loss = matching_loss(
        src,
        trg,
        torch.tensor([[[2.0, 0.0]]]),
        torch.tensor([[[1.0, 1.0]]]),
        torch.ones(1, 1, dtype=torch.bool),
        3,
        temperature=0.2,
        window=3,
        sigma=1.0,
    )
    corr = np.cos(trg_angles - math.pi / 2)  # cosine between unit vectors at pi/2 and at trg_angles
    expected = _reference_keypoint_loss(corr, 1.0, 1.0, 0.2, 3, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_valid_mask_and_batch_mean() -> None:
    rng = np.random.default_rng(2)
    angles = rng.uniform(0, math.pi, (2, 5, 5))
    trg = torch.cat([_unit_vectors(a) for a in angles])
    src = torch.cat([_constant_source(5, 5)] * 2)
    trg_kps = torch.tensor(
        [[[0.0, 0.0], [2.0, 3.0], [float("nan"), 1e6]], [[4.0, 4.0], [1.5, 2.5], [3.0, 1.0]]]
    )
    valid = torch.tensor([[True, True, False], [True, True, True]])
    loss = matching_loss(
        src, trg, torch.zeros(2, 3, 2), trg_kps, valid, 5, temperature=0.3, window=3, sigma=1.0
    )
    cos = np.cos(angles)
    pair0 = sum(_reference_keypoint_loss(cos[0], x, y, 0.3, 3, 1.0) for x, y in ((0, 0), (2, 3))) / 2
    pair1 = (
        sum(_reference_keypoint_loss(cos[1], x, y, 0.3, 3, 1.0) for x, y in ((4, 4), (1.5, 2.5), (3, 1))) / 3
    )
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, rel=1e-5)


def test_pair_without_valid_keypoint_names_batch_index() -> None:
    src = torch.cat([_constant_source(3, 3)] * 2)
    valid = torch.tensor([[True], [False]])
    with pytest.raises(ValueError, match=r"batch index \[1\]"):
        matching_loss(src, src, torch.zeros(2, 1, 2), torch.zeros(2, 1, 2), valid, 3)


def test_bad_shapes_are_rejected() -> None:
    src = _constant_source(3, 3)
    with pytest.raises(ValueError, match="matching_loss"):
        matching_loss(
            src, src, torch.zeros(1, 2, 2), torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), 3
        )
    with pytest.raises(ValueError, match="bool"):
        matching_loss(src, src, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.ones(1, 1), 3)


def test_gradient_flows_to_both_feature_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    trg = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    src_kps = torch.tensor([[[1.3, 7.2], [5.0, 2.0]], [[0.0, 8.0], [3.7, 3.1]]], dtype=torch.float64)
    trg_kps = torch.tensor([[[2.0, 4.5], [8.0, 8.0]], [[6.1, 0.4], [4.0, 4.0]]], dtype=torch.float64)
    valid = torch.tensor([[True, True], [True, False]])

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return matching_loss(s, t, src_kps, trg_kps, valid, 9, temperature=0.5, window=3, sigma=1.0)

    loss_fn(src, trg).backward()
    assert src.grad.abs().sum() > 0 and trg.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(loss_fn, (src.detach().requires_grad_(), trg.detach().requires_grad_()))


def test_check_finite_stops_on_nan_and_inf() -> None:
    check_finite(torch.tensor(1.25), step=3)
    with pytest.raises(FloatingPointError, match="step 12"):
        check_finite(torch.tensor(float("nan")), step=12)
    with pytest.raises(FloatingPointError, match="step 7"):
        check_finite(torch.tensor(float("inf")), step=7)
    src = _constant_source(3, 3)
    src[0, 0, 1, 1] = float("nan")
    loss = matching_loss(
        src, src, torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), 3, window=3
    )
    with pytest.raises(FloatingPointError, match="step 0"):
        check_finite(loss, step=0)
