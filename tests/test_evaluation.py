"""Evaluation: oracle predictions on the real ../shared/data pairs score exactly 100; features are reused."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sd4match.datasets import parse_pfwillow, parse_spair
from sd4match.evaluation import (
    ImageKey,
    MatchingSettings,
    _squashed_targets,
    evaluate_pairs,
    image_seed,
    score_predictions,
)
from sd4match.matching import grid_to_image
from sd4match.metrics import summarise

SETTINGS = MatchingSettings(image_size=768, methods=("nn",), alphas=(0.05, 0.1, 0.15))


def _oracle_scores(pairs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for row in pairs.itertuples():
        _, trg, _ = _squashed_targets(row, 768)
        rows.extend(score_predictions(row, {"oracle": trg}, SETTINGS))
    return pd.DataFrame([vars(s) | {"pck": s.pck} for s in rows])


def test_oracle_on_real_spair_pairs_is_100(shared_data):
    pairs = parse_spair(shared_data / "SPair-71k-mini", "test")
    scores = _oracle_scores(pairs)
    assert len(scores) == 12 * 3
    assert (scores["pck"] == 100.0).all()


def test_oracle_on_real_pfwillow_pairs_is_100(shared_data):
    pairs = parse_pfwillow(shared_data / "pf-willow", shared_data / "pf-willow/test_pairs.csv")
    scores = _oracle_scores(pairs)
    assert len(scores) == 900 * 3
    assert (scores["pck"] == 100.0).all()


def test_real_spair_threshold_is_the_squashed_target_bbox(shared_data):
    pairs = parse_spair(shared_data / "SPair-71k-mini", "test")
    row = next(pairs[pairs.pair_id == "000167-2008_007604-2009_001056:aeroplane"].itertuples())
    _, trg, threshold = _squashed_targets(row, 768)
    # target 500 x 334, bbox [14, 71, 483, 220]: w = 469 * 768 / 500, h = 149 * 768 / 334
    assert threshold == pytest.approx(469 * 768 / 500)
    assert trg[0].tolist() == pytest.approx([480 * 768 / 500, 180 * 768 / 334])
    # a prediction exactly 0.1 * theta away is correct at 0.1 (inclusive), one a hair further is not
    pred = trg.clone()
    pred[0, 0] += 0.1 * threshold
    scores = {(s.alpha): s.n_correct for s in score_predictions(row, {"nn": pred}, SETTINGS)}
    assert scores == {0.05: 6, 0.1: 7, 0.15: 7}


def _identity_pairs(n: int) -> pd.DataFrame:
    """Pairs of an image with itself, keypoints on feature-grid points of an 8 x 8 grid at S = 64."""
    grid = torch.tensor([[1.0, 2.0], [5.0, 3.0], [7.0, 7.0]])
    kps = grid_to_image(grid, 8, 64).tolist()
    return pd.DataFrame(
        {
            "pair_id": [str(i) for i in range(n)],
            "category": ["a" if i % 2 else "b" for i in range(n)],
            "src_image": [f"img{i}.png" for i in range(n)],
            "trg_image": [f"img{i}.png" for i in range(n)],
            "src_width": 64,
            "src_height": 64,
            "trg_width": 64,
            "trg_height": 64,
            "src_kps": [kps] * n,
            "trg_kps": [kps] * n,
            "src_bbox": [None] * n,
            "trg_bbox": [None] * n,
            "flip": False,
            "n_kps": 3,
            "threshold_kind": "img",
        }
    )


def test_evaluate_pairs_with_oracle_features_scores_100():
    """One-hot position features: every method recovers grid-aligned keypoints, so PCK is exactly 100."""
    onehot = torch.eye(64).reshape(64, 8, 8)
    pairs = _identity_pairs(4)
    settings = MatchingSettings(
        image_size=64, methods=("nn", "soft_argmax", "kernel_softmax"), alphas=(0.05,)
    )
    per_pair = evaluate_pairs(pairs, lambda keys: onehot.expand(len(keys), -1, -1, -1), settings)
    assert len(per_pair) == 4 * 3
    summary = summarise(per_pair)
    assert (summary["pck_per_image"] == 100.0).all()


def test_features_are_computed_once_per_distinct_image(shared_data):
    pairs = parse_pfwillow(shared_data / "pf-willow", shared_data / "pf-willow/test_pairs.csv")
    requested: list[ImageKey] = []

    def features_for(keys):
        requested.extend(keys)
        return torch.randn(len(keys), 4, 8, 8, generator=torch.Generator().manual_seed(len(requested)))

    per_pair = evaluate_pairs(pairs, features_for, SETTINGS)
    assert len(per_pair) == 900 * 3
    assert len(requested) == 100 == len(set(requested))


def test_image_seed_depends_on_image_and_flip_only():
    a = ImageKey("x.jpg", False, "cat")
    assert image_seed(0, a) == image_seed(0, ImageKey("x.jpg", False, "dog"))
    assert image_seed(0, a) != image_seed(0, ImageKey("x.jpg", True, "cat"))
    assert image_seed(0, a) != image_seed(1, a)
