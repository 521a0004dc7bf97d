"""The evaluation's matching path gives the same predictions and the same PCK tables as the per-pair path it
replaced (issue 9, "Matching on the device").

The reference below is a copy of the per-pair path as it was before the change (commit f047961:
``evaluation.predict_pair`` / ``score_pair`` / ``evaluate_pairs`` with ``matching.match_keypoints``): features
moved to the CPU as fp32, one correlation per pair *and per method*, scored pair by pair. It is kept here,
independent of ``sd4match.matching``, so that any later change to the package is compared with it.

Tolerance: ``PRED_ATOL`` = 1e-3 px in the S frame for the soft localisers, exact for nearest neighbour.
The correlation is a matmul over C channels; batching pairs (and padding their keypoints) changes how a
multi-threaded BLAS (or a GPU) splits the sums, hence the last ulps (~5e-7) of a cosine. A soft localiser
moves by about (spread of the probability mass, ~1 cell) * d / T for a correlation error d: ~1e-5 cells,
~2e-4 px at S = 768 (measured on this CPU at C = 1280: 0.0 with one thread, at most 2.4e-4 px with two);
nearest neighbour moves only on an exact tie. A difference within the tolerance can flip a PCK decision
only where the distance lies within sqrt(2) * PRED_ATOL of alpha * theta; the tests assert every single
decision (keypoint x method x alpha) equal, and the per-pair PCK tables equal exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sd4match.datasets import parse_pfwillow, parse_spair
from sd4match.demo_world import DemoWorldSpec, make_pfwillow, make_spair
from sd4match.evaluation import (
    ImageKey,
    MatchingSettings,
    evaluate_pairs,
    iter_predictions,
    predict_pair,
    score_pair,
    sd_text_prompt_features,
)
from sd4match.features import SDFeaturizer
from sd4match.fetch import extract
from sd4match.matching import MATCHING_METHODS
from sd4match.metrics import PairScore, pck, pck_threshold, per_pair_frame
from sd4match.models import load_stable_diffusion
from sd4match.prompts import TextPrompt
from sd4match.tiny_models import build_tiny_stable_diffusion

PRED_ATOL = 1e-3  # px in the S frame; see the module docstring
ALPHAS = (0.05, 0.1, 0.15)
REAL_S, REAL_GRID, REAL_C = 768, 48, 96  # the paper's frame and grid; fewer channels than 1280 for speed
TINY_S = 128


# ---------------------------------------------------------------------------------------------------------
# Reference: the per-pair path before issue 9 (copied, not imported)
# ---------------------------------------------------------------------------------------------------------


def _ref_squash(points: torch.Tensor, width: float, height: float, size: int) -> torch.Tensor:
    return points * torch.tensor([size / width, size / height], dtype=points.dtype)


def _ref_targets(row: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    src = _ref_squash(torch.tensor(row.src_kps, dtype=torch.float32), row.src_width, row.src_height, size)
    trg = _ref_squash(torch.tensor(row.trg_kps, dtype=torch.float32), row.trg_width, row.trg_height, size)
    src, trg = src.clip(0, size - 1), trg.clip(0, size - 1)
    bbox = None
    if row.trg_bbox is not None:
        sx, sy = size / row.trg_width, size / row.trg_height
        bbox = torch.tensor(row.trg_bbox, dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
    return src, trg, pck_threshold(row.threshold_kind, trg_bbox=bbox, trg_kps=trg, image_size=size)


def _ref_grid_xy(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = corr.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=corr.dtype), torch.arange(w, dtype=corr.dtype), indexing="ij"
    )
    return xs.reshape(-1), ys.reshape(-1)


def _ref_nn(corr: torch.Tensor) -> torch.Tensor:
    w = corr.shape[-1]
    idx = corr.flatten(-2).argmax(dim=-1)
    return torch.stack([idx % w, idx // w], dim=-1).to(corr.dtype)


def _ref_soft(corr: torch.Tensor, temperature: float) -> torch.Tensor:
    flat = corr.flatten(-2)
    prob = torch.softmax((flat - flat.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    xs, ys = _ref_grid_xy(corr)
    return torch.stack([(prob * xs).sum(dim=-1), (prob * ys).sum(dim=-1)], dim=-1)


def _ref_kernel(corr: torch.Tensor, sigma: float, temperature: float) -> torch.Tensor:
    peak = _ref_nn(corr)
    xs, ys = _ref_grid_xy(corr)
    sq_dist = (xs - peak[..., :1]) ** 2 + (ys - peak[..., 1:]) ** 2
    gauss = torch.exp(-sq_dist / (2.0 * sigma**2)).reshape(corr.shape)
    return _ref_soft(corr * gauss, temperature)


def _ref_match(
    src_feat: torch.Tensor, trg_feat: torch.Tensor, src_kps: torch.Tensor, size: int, method: str, s: Any
) -> torch.Tensor:
    """Old ``match_keypoints`` for one pair: (C, h, w) features, (K, 2) S-frame points -> (K, 2)."""
    src_feat, trg_feat = src_feat[None].cpu().float(), trg_feat[None].cpu().float()
    norm = src_kps[None] * (2.0 / (size - 1)) - 1.0
    sampled = F.grid_sample(
        src_feat, norm[:, :, None, :], mode="bilinear", padding_mode="border", align_corners=True
    )
    desc = F.normalize(sampled[..., 0].transpose(1, 2), dim=-1)
    corr = torch.einsum("bkc,bchw->bkhw", F.normalize(desc, dim=-1), F.normalize(trg_feat, dim=1))
    if method == "nn":
        grid_xy = _ref_nn(corr)
    elif method == "soft_argmax":
        grid_xy = _ref_soft(corr, s.temperature)
    else:
        grid_xy = _ref_kernel(corr, s.kernel_sigma, s.temperature)
    w = trg_feat.shape[-1]
    return (grid_xy * ((size - 1) / (w - 1)))[0]


def ref_predictions(row: Any, src_feat: torch.Tensor, trg_feat: torch.Tensor, s: Any) -> dict:
    """Old ``predict_pair``: every method on its own correlation."""
    src, _, _ = _ref_targets(row, s.image_size)
    return {m: _ref_match(src_feat, trg_feat, src, s.image_size, m, s) for m in s.methods}


def ref_scores(row: Any, predictions: dict, s: Any) -> list[PairScore]:
    """Old ``score_predictions``."""
    _, trg, threshold = _ref_targets(row, s.image_size)
    out = []
    for method, pred in predictions.items():
        correct = pck(pred, trg, threshold, s.alphas)
        out.extend(
            PairScore(row.pair_id, row.category, method, a, len(trg), int(correct[a]), float(threshold))
            for a in s.alphas
        )
    return out


def _keys(row: Any) -> tuple[ImageKey, ImageKey]:
    flip = bool(row.flip)
    return ImageKey(row.src_image, flip, row.category), ImageKey(row.trg_image, flip, row.category)


def ref_evaluate(
    pairs: pd.DataFrame, feats: dict[ImageKey, torch.Tensor], s: Any
) -> tuple[pd.DataFrame, dict]:
    """Old ``evaluate_pairs`` on precomputed features: (per-pair table, {pair_id: predictions})."""
    scores, preds = [], {}
    for _, group in pairs.groupby("category", sort=False):
        for row in group.itertuples():
            src_key, trg_key = _keys(row)
            preds[row.pair_id] = ref_predictions(row, feats[src_key], feats[trg_key], s)
            scores.extend(ref_scores(row, preds[row.pair_id], s))
    return per_pair_frame(scores), preds


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _settings(size: int) -> MatchingSettings:
    return MatchingSettings(image_size=size, methods=MATCHING_METHODS, alphas=ALPHAS)


def synthetic_features(keys: Sequence[ImageKey], channels: int, grid: int) -> dict[ImageKey, torch.Tensor]:
    """L2-normalised (C, grid, grid) maps: a position code shared by all images plus per-image noise, so
    predictions land near the source position (non-trivial PCK) without being exact."""
    gen = torch.Generator().manual_seed(1234)
    freqs = torch.randn(channels, 2, generator=gen) * 0.25
    phase = torch.rand(channels, generator=gen) * 2 * math.pi
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    code = torch.cos(freqs[:, :1, None] * xs + freqs[:, 1:, None] * ys + phase[:, None, None])
    out = {}
    for i, key in enumerate(sorted(set(keys), key=str)):
        noise = torch.randn(channels, grid, grid, generator=torch.Generator().manual_seed(i))
        out[key] = F.normalize(code + 0.8 * noise, dim=0)
    return out


def _all_keys(pairs: pd.DataFrame) -> list[ImageKey]:
    return sorted({k for row in pairs.itertuples() for k in _keys(row)}, key=str)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Demo SPair-71k (varying K, bbox thresholds) and PF-Willow with tiny SD 2-1 DIFT features."""
    base = tmp_path_factory.mktemp("matching_equivalence")
    spec = DemoWorldSpec()
    extract(make_spair(base / "archives", spec), base / "spair")
    images_zip, pairs_csv = make_pfwillow(base / "archives", spec)
    extract(images_zip, base / "willow")
    components = load_stable_diffusion(build_tiny_stable_diffusion(base / "sd21", seed=0))
    featurizer = SDFeaturizer(components, max_batch=8)
    prompt = TextPrompt("a photo of a {category}", components.text_encoder, components.tokenizer)
    worlds = {}
    for name, pairs, root in (
        ("spair", parse_spair(base / "spair" / "SPair-71k", "test"), base / "spair" / "SPair-71k"),
        ("pfwillow", parse_pfwillow(base / "willow", pairs_csv), base / "willow"),
    ):
        features_for = sd_text_prompt_features(featurizer, prompt, root, TINY_S, 50, 2, seed=0)
        keys = _all_keys(pairs)
        worlds[name] = (pairs, dict(zip(keys, features_for(keys), strict=True)))
    return worlds


def _serve(feats: dict[ImageKey, torch.Tensor]):
    """A FeatureFn serving precomputed features (and recording what was asked)."""

    def features_for(keys: Sequence[ImageKey]) -> torch.Tensor:
        return torch.stack([feats[k] for k in keys])

    return features_for


# ---------------------------------------------------------------------------------------------------------
# Assertions
# ---------------------------------------------------------------------------------------------------------


def _decisions(pred: torch.Tensor, trg: torch.Tensor, threshold: float, alphas) -> np.ndarray:
    """Per-keypoint PCK decisions (alphas x K booleans), float64 as ``metrics.pck``."""
    dist = np.linalg.norm(pred.double().numpy() - trg.double().numpy(), axis=1)
    return np.stack([dist <= a * threshold for a in alphas])


def assert_close_predictions(row: Any, got: dict, want: dict, s: MatchingSettings) -> int:
    """Same methods, nn exact, soft localisers within PRED_ATOL, every PCK decision the same; returns how
    many soft decisions lie within sqrt(2) * PRED_ATOL of their threshold (the only ones a within-tolerance
    difference could flip; they are among those asserted equal)."""
    assert list(got) == list(want) == list(s.methods)
    _, trg, threshold = _ref_targets(row, s.image_size)
    near = 0
    for method in s.methods:
        atol = 0.0 if method == "nn" else PRED_ATOL
        torch.testing.assert_close(got[method], want[method], rtol=0, atol=atol)
        np.testing.assert_array_equal(
            _decisions(got[method], trg, threshold, s.alphas),
            _decisions(want[method], trg, threshold, s.alphas),
        )
        if method != "nn":
            dist = np.linalg.norm(want[method].double().numpy() - trg.double().numpy(), axis=1)
            near += int((np.abs(dist[None] - np.array(s.alphas)[:, None] * threshold) <= 2**0.5 * atol).sum())
    return near


def assert_same_as_reference(pairs: pd.DataFrame, feats: dict, s: MatchingSettings) -> pd.DataFrame:
    """The batched evaluation path (``iter_predictions``/``evaluate_pairs``) and the per-pair entry point
    (``predict_pair``) against the reference: close predictions, equal decisions, equal tables."""
    ref_table, ref_preds = ref_evaluate(pairs, feats, s)
    seen = 0
    for rows, _, predictions in iter_predictions(pairs, _serve(feats), s):
        for row, got in zip(rows, predictions, strict=True):
            assert_close_predictions(row, got, ref_preds[row.pair_id], s)
            seen += 1
    assert seen == len(pairs)
    for row in pairs.itertuples():
        src_key, trg_key = _keys(row)
        got = predict_pair(row, feats[src_key], feats[trg_key], s)
        assert_close_predictions(row, got, ref_preds[row.pair_id], s)
    table = evaluate_pairs(pairs, _serve(feats), s)
    pd.testing.assert_frame_equal(table, ref_table, check_exact=True)
    return table


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["spair", "pfwillow"])
def test_tiny_world_dift_features_match_reference(tiny_world, dataset):
    pairs, feats = tiny_world[dataset]
    table = assert_same_as_reference(pairs, feats, _settings(TINY_S))
    assert len(table) == len(pairs) * 3 * 3


def test_real_pfwillow_inputs_match_reference(shared_data):
    pairs = parse_pfwillow(shared_data / "pf-willow", shared_data / "pf-willow/test_pairs.csv")
    feats = synthetic_features(_all_keys(pairs), REAL_C, REAL_GRID)
    table = assert_same_as_reference(pairs, feats, _settings(REAL_S))
    assert len(table) == 900 * 9
    # the synthetic features give a non-trivial table: some but not all keypoints correct
    assert 0 < table["n_correct"].sum() < table["n_kps"].sum()


def test_real_spair_inputs_with_varying_keypoint_counts_match_reference(shared_data):
    pairs = parse_spair(shared_data / "SPair-71k-mini", "test")
    assert pairs["n_kps"].nunique() > 1
    feats = synthetic_features(_all_keys(pairs), REAL_C, REAL_GRID)
    assert_same_as_reference(pairs, feats, _settings(REAL_S))


def test_score_pair_matches_reference_for_one_method(shared_data):
    """``score_pair`` (training's validation entry point) keeps its signature and results."""
    pairs = parse_pfwillow(shared_data / "pf-willow", shared_data / "pf-willow/test_pairs.csv").head(20)
    feats = synthetic_features(_all_keys(pairs), REAL_C, REAL_GRID)
    s = MatchingSettings(REAL_S, ("nn",), (0.1,))
    for row in pairs.itertuples():
        src_key, trg_key = _keys(row)
        expected = ref_scores(row, ref_predictions(row, feats[src_key], feats[trg_key], s), s)
        assert score_pair(row, feats[src_key], feats[trg_key], s) == expected


@pytest.mark.parametrize("pair_batch", [1, 5, 64])
def test_one_correlation_per_pair_whatever_the_batch(shared_data, monkeypatch, pair_batch):
    """Each pair's correlation is computed once (not once per method) and the batch size changes nothing."""
    from sd4match import matching

    pairs = parse_spair(shared_data / "SPair-71k-mini", "test")
    feats = synthetic_features(_all_keys(pairs), 8, 12)
    correlated: list[int] = []
    original = matching.cosine_maps  # the one cosine correlation (``correlation`` calls it too)

    def counting(desc: torch.Tensor, trg_unit: torch.Tensor) -> torch.Tensor:
        correlated.append(desc.shape[0])
        return original(desc, trg_unit)

    monkeypatch.setattr(matching, "cosine_maps", counting)
    s = MatchingSettings(REAL_S, MATCHING_METHODS, ALPHAS, pair_batch=pair_batch)
    table = evaluate_pairs(pairs, _serve(feats), s)
    assert sum(correlated) == len(pairs) == 12
    per_category = pairs.groupby("category").size()
    assert len(correlated) == sum(-(-n // pair_batch) for n in per_category)
    pd.testing.assert_frame_equal(table, ref_evaluate(pairs, feats, s)[0], check_exact=True)
