"""Tests of sd4match.metrics: thresholds, PCK counts and the per-image / per-keypoint aggregation."""

from __future__ import annotations

import pandas as pd
import pytest

from sd4match.matching import bbox_to_squashed_frame, to_squashed_frame
from sd4match.metrics import (
    PER_PAIR_COLUMNS,
    SUMMARY_COLUMNS,
    PairScore,
    pair_scores,
    pck,
    pck_fraction,
    pck_threshold,
    per_pair_frame,
    summarise,
)


def test_bbox_threshold_of_squashed_spair_box() -> None:
    # 500x334 image, box [14, 71, 483, 220] -> 768: w = 469 * 768 / 500 = 720.384, h = 149 * 768 / 334 ~ 342.6
    box = bbox_to_squashed_frame([14, 71, 483, 220], 500, 334, 768)
    assert pck_threshold("bbox", trg_bbox=box) == pytest.approx(469 * 768 / 500, rel=1e-12)
    # a tall box: h wins
    assert pck_threshold("bbox", trg_bbox=[10.0, 20.0, 30.0, 120.0]) == 100.0


def test_img_threshold_is_image_size() -> None:
    assert pck_threshold("img", image_size=768) == 768.0


def test_kps_threshold_is_max_extent_of_squashed_keypoints() -> None:
    # 400x200 image -> 768: x * 1.92, y * 3.84; x-range 40 * 1.92 = 76.8, y-range 70 * 3.84 = 268.8
    kps = to_squashed_frame([[10, 20], [50, 35], [30, 90]], 400, 200, 768)
    assert pck_threshold("kps", trg_kps=kps) == pytest.approx(70 * 3.84, rel=1e-12)


def test_threshold_errors_name_kind_and_argument() -> None:
    with pytest.raises(ValueError, match="'box'"):
        pck_threshold("box", trg_bbox=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="trg_bbox"):
        pck_threshold("bbox")
    with pytest.raises(ValueError, match="trg_kps"):
        pck_threshold("kps", image_size=768)
    with pytest.raises(ValueError, match="image_size"):
        pck_threshold("img", trg_bbox=[0, 0, 1, 1])


def test_pck_threshold_is_inclusive() -> None:
    gt = [[10.0, 10.0], [10.0, 10.0], [0.0, 0.0]]
    pred = [[13.0, 14.0], [10.0, 15.01], [0.0, 0.0]]  # distances 5, 5.01, 0
    # alpha * theta: 0.05 * 100 = 5 (the 3-4-5 point is exactly on the edge), 0.1 * 100 = 10, 0.01 * 100 = 1
    assert pck(pred, gt, 100.0, alphas=(0.01, 0.05, 0.1)) == {0.01: 1, 0.05: 2, 0.1: 3}
    assert pck_fraction(pred, gt, 100.0, alphas=(0.05,)) == {0.05: 2 / 3}


def test_pck_rejects_mismatched_and_empty_inputs() -> None:
    with pytest.raises(ValueError, match="differ"):
        pck([[0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]], 10.0)
    with pytest.raises(ValueError, match="without keypoints"):
        pck([], [], 10.0)


def test_pair_score_pck_and_validation() -> None:
    assert PairScore("p", "cat", "nn", 0.1, 8, 6, 100.0).pck == 75.0
    with pytest.raises(ValueError, match="'q'"):
        PairScore("q", "cat", "nn", 0.1, 2, 3, 100.0)


def _three_pairs() -> pd.DataFrame:
    """Pairs with 1/2, 3/3 and 0/5 correct keypoints (cat, dog, dog) for one method and alpha."""
    scores = [
        PairScore("a", "cat", "nn", 0.1, 2, 1, 100.0),
        PairScore("b", "dog", "nn", 0.1, 3, 3, 100.0),
        PairScore("c", "dog", "nn", 0.1, 5, 0, 100.0),
    ]
    return per_pair_frame(scores)


def test_per_pair_frame_columns_and_pck() -> None:
    frame = _three_pairs()
    assert tuple(frame.columns) == PER_PAIR_COLUMNS
    assert frame["pck"].tolist() == [50.0, 100.0, 0.0]


def test_summarise_per_image_differs_from_per_keypoint() -> None:
    summary = summarise(_three_pairs())
    assert tuple(summary.columns) == SUMMARY_COLUMNS
    assert summary["category"].tolist() == ["cat", "dog", "All"]
    assert summary["n_pairs"].tolist() == [1, 2, 3]
    assert summary["n_kps"].tolist() == [2, 8, 10]
    # per image: mean of per-pair PCK; All = (50 + 100 + 0) / 3 over pairs (not the category mean 50 + 50 / 2)
    assert summary["pck_per_image"].tolist() == pytest.approx([50.0, 50.0, 150.0 / 3], abs=1e-12)
    # per keypoint: pooled counts; dog 3 / 8, All 4 / 10
    assert summary["pck_per_keypoint"].tolist() == pytest.approx([50.0, 37.5, 40.0], abs=1e-12)


def test_summarise_all_row_is_mean_over_pairs_not_categories() -> None:
    scores = [
        PairScore("a", "cat", "nn", 0.1, 1, 1, 1.0),
        PairScore("b", "dog", "nn", 0.1, 1, 0, 1.0),
        PairScore("c", "dog", "nn", 0.1, 1, 0, 1.0),
        PairScore("d", "dog", "nn", 0.1, 1, 0, 1.0),
    ]
    summary = summarise(per_pair_frame(scores))
    overall = summary[summary["category"] == "All"]
    assert overall["pck_per_image"].tolist() == [25.0]  # category mean would be (100 + 0) / 2 = 50


def test_summarise_groups_methods_and_alphas() -> None:
    scores = pair_scores(
        "a", "cat", "nn", [[0.0, 0.0], [8.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], 100.0, (0.05, 0.1)
    )
    scores += pair_scores(
        "a", "cat", "soft_argmax", [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], 100.0
    )
    summary = summarise(per_pair_frame(scores))
    cat = summary[summary["category"] == "cat"]
    got = {(m, a): p for m, a, p in zip(cat["method"], cat["alpha"], cat["pck_per_image"], strict=True)}
    assert got == {
        ("nn", 0.05): 50.0,
        ("nn", 0.1): 100.0,
        ("soft_argmax", 0.05): 100.0,
        ("soft_argmax", 0.1): 100.0,
        ("soft_argmax", 0.15): 100.0,
    }
    assert len(summary) == 10  # the same five rows again for "All"


def test_summarise_rejects_duplicates_and_missing_columns() -> None:
    frame = _three_pairs()
    with pytest.raises(ValueError, match="duplicated"):
        summarise(pd.concat([frame, frame.iloc[:1]], ignore_index=True))
    with pytest.raises(ValueError, match="n_correct"):
        summarise(frame.drop(columns="n_correct"))
