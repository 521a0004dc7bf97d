"""The zero-shot peers' own evaluations (issue 10 §3): sd-dino's padded square, DIFT's original frame, the
PCK rules, and sd-dino's pair-weighted "All" — exact values computed by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd4match.frames import (
    count_correct,
    evaluate_with_scorer,
    original_targets,
    pad_geometry,
    pad_image,
    padded_targets,
    score_targets,
)
from sd4match.peer_protocols import (
    OriginalFrameScorer,
    PaddedFrameScorer,
    PatchGrid,
    dift_pixels,
    original_frame_cosine,
    pixel_centre_descriptors,
    upsampled_norms,
)
from sd4match.predictions import PredictionLog
from sd4match.table_protocols import (
    ESTIMATORS,
    RowProtocol,
    category_weighted_pck,
    method_row_protocol,
    paper_protocol,
)


def _row(**fields):
    """A pairs-table row (attribute access, as ``itertuples``) with defaults for the unused fields."""
    base = {"pair_id": "p", "category": "cat", "flip": False, "src_bbox": None, "trg_bbox": None,
            "src_image": "s.png", "trg_image": "t.png"}  # fmt: skip
    return SimpleNamespace(**(base | fields))


# ------------------------------------------------------------------------------------ sd-dino's padded square


def test_pad_geometry_of_a_landscape_image_and_a_keypoint_there_and_back():
    geometry = pad_geometry(300, 200, 960)
    # scale 960 / 300; short side round(960 * 200 / 300) = 640, centred: (960 - 640) // 2 = 160 rows above
    assert geometry == type(geometry)(size=960, scale=3.2, offset_x=0, offset_y=160, width=960, height=640)
    point = torch.tensor([[150.0, 100.0], [0.0, 0.0], [300.0, 200.0]])
    padded = geometry.to_padded(point)
    assert padded.tolist() == [[480.0, 480.0], [0.0, 160.0], [960.0, 800.0]]
    assert geometry.from_padded(padded).tolist() == point.tolist()


def test_pad_geometry_portrait_square_and_half_to_even_rounding():
    assert pad_geometry(200, 300, 840) == type(pad_geometry(1, 1, 1))(840, 2.8, 140, 0, 560, 840)
    assert pad_geometry(64, 64, 840) == type(pad_geometry(1, 1, 1))(840, 13.125, 0, 0, 840, 840)
    # 4 * 5 / 8 = 2.5 rounds to 2 (numpy's around, as sd-dino), so the offset is (4 - 2) // 2 = 1
    assert pad_geometry(8, 5, 4).height == 2 and pad_geometry(8, 5, 4).offset_y == 1
    # 4 * 7 / 8 = 3.5 rounds to 4: no padding row
    assert pad_geometry(8, 7, 4).height == 4 and pad_geometry(8, 7, 4).offset_y == 0
    with pytest.raises(ValueError, match="need positive sizes"):
        pad_geometry(0, 10, 840)


def test_pad_image_centres_the_resized_image_on_black():
    padded = pad_image(Image.new("RGB", (300, 200), (200, 100, 50)), 960)
    pixels = np.asarray(padded)
    assert padded.size == (960, 960)
    assert (pixels[:160] == 0).all() and (pixels[800:] == 0).all()  # 160 black rows above and below
    assert (pixels[160:800] == (200, 100, 50)).all()  # the resized image (a constant stays constant)


def test_padded_targets_scale_the_threshold_as_sd_dino():
    kps = [[150.0, 100.0], [30.0, 20.0]]
    spair = _row(src_width=300, src_height=200, trg_width=200, trg_height=300, src_kps=kps, trg_kps=kps,
                 trg_bbox=[10.0, 20.0, 110.0, 180.0], threshold_kind="bbox")  # fmt: skip
    src, trg, threshold = padded_targets(spair, 960)
    assert src.tolist() == [[480.0, 480.0], [96.0, 224.0]]  # x 3.2, +160 rows
    assert trg.tolist() == [[640.0, 320.0], [256.0, 64.0]]  # x 3.2, +160 columns (portrait target)
    assert threshold == pytest.approx(160 * 3.2)  # the box's max side, scaled
    pascal = _row(**{**vars(spair), "threshold_kind": "img"})
    assert padded_targets(pascal, 960)[2] == 960.0  # sd-dino: alpha x the padded size
    willow = _row(**{**vars(spair), "threshold_kind": "kps"})
    assert padded_targets(willow, 960)[2] == pytest.approx(120 * 3.2)  # keypoint extent (x: 120), scaled


def test_original_targets_use_the_original_frame():
    row = _row(
        src_width=300,
        src_height=200,
        trg_width=200,
        trg_height=300,
        src_kps=[[1.0, 2.0]],
        trg_kps=[[3.0, 4.0], [13.0, 9.0]],
        trg_bbox=[10.0, 20.0, 110.0, 180.0],
        threshold_kind="bbox",
    )
    src, trg, threshold = original_targets(row)
    assert src.tolist() == [[1.0, 2.0]] and trg.tolist() == [[3.0, 4.0], [13.0, 9.0]] and threshold == 160.0
    assert original_targets(_row(**{**vars(row), "threshold_kind": "img"}))[2] == 300.0  # max(W, H)
    assert original_targets(_row(**{**vars(row), "threshold_kind": "kps"}))[2] == 10.0  # max(10, 5)


# ------------------------------------------------------------------------------------------- the PCK rules


def test_pck_rules_differ_exactly_at_the_boundary():
    gt = torch.zeros(1, 2, dtype=torch.float64)
    on_boundary = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # d = 1 = 0.1 x 10
    assert count_correct(on_boundary, gt, 10.0, [0.1], "le") == {0.1: 1}  # this pipeline: d <= alpha theta
    assert count_correct(on_boundary, gt, 10.0, [0.1], "ratio_le") == {0.1: 1}  # DIFT: d / theta <= alpha
    assert count_correct(on_boundary, gt, 10.0, [0.1], "lt") == {0.1: 0}  # sd-dino: d < alpha theta
    # 0.15 x 6 = 0.8999999999999999 in floating point, but 0.9 / 6 = 0.15: DIFT's ratio counts it
    rounding = torch.tensor([[0.9, 0.0]], dtype=torch.float64)
    assert count_correct(rounding, gt, 6.0, [0.15], "le") == {0.15: 0}
    assert count_correct(rounding, gt, 6.0, [0.15], "ratio_le") == {0.15: 1}
    with pytest.raises(ValueError, match="unknown PCK rule 'eq'"):
        count_correct(rounding, gt, 6.0, [0.15], "eq")
    with pytest.raises(ValueError, match="threshold must be > 0"):
        count_correct(rounding, gt, 0.0, [0.15], "lt")


def test_score_targets_counts_per_method_and_alpha():
    targets = (torch.zeros(3, 2), torch.tensor([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]]), 100.0)
    pred = {"nn": torch.zeros(3, 2)}  # errors 0, 5, 50
    scores = score_targets(_row(), targets, pred, (0.05, 0.1), rule="lt")
    assert [(s.method, s.alpha, s.n_correct, s.n_kps, s.threshold) for s in scores] == [
        ("nn", 0.05, 1, 3, 100.0),  # 5 < 5 is false
        ("nn", 0.1, 2, 3, 100.0),
    ]


# ----------------------------------------------------------------------------------- sd-dino's patch matching


def test_patch_grid_cells_and_centres_are_sd_dinos():
    grid = PatchGrid.square_cells(840, 60)  # DINOv2-B/14 at 840 px
    assert (grid.stride, grid.patch) == (14, 14)
    points = torch.tensor([[20.0, 0.0], [839.9, 840.0], [13.999, 14.0]])
    assert grid.cells(points).tolist() == [[1, 0], [59, 59], [0, 1]]  # floor(x * 60 / 840); border clamped
    assert grid.centres(torch.tensor([[1.0, 0.0], [59.0, 59.0]])).tolist() == [[20.5, 6.5], [832.5, 832.5]]
    dino_v1 = PatchGrid(224, 55, 4, 8)  # DINO ViT-S/8 at 224 px, stride 4 (sd-dino's DINOv1)
    assert dino_v1.centres(torch.tensor([[0.0, 54.0]])).tolist() == [[3.5, 219.5]]
    with pytest.raises(ValueError, match="not a whole number of the 7 feature cells"):
        PatchGrid.square_cells(50, 7)


def test_padded_frame_scorer_matches_patches_and_predicts_their_centres():
    # a 56 px square, 4 x 4 cells of 14 px; every source cell has its own one-hot descriptor and the target
    # holds the same descriptors with rows and columns swapped: source cell (x, y) matches target (y, x)
    src = torch.eye(16).reshape(16, 4, 4)
    trg = src.transpose(1, 2).contiguous()
    row = _row(src_width=56, src_height=28, trg_width=28, trg_height=56, threshold_kind="bbox",
               src_kps=[[5.0, 3.0], [40.0, 10.0]], trg_kps=[[6.0, 7.0], [20.0, 50.0]],
               trg_bbox=[0.0, 0.0, 20.0, 25.0])  # fmt: skip
    # source (landscape, scale 1, 14 rows of padding): (5, 17) -> cell (0, 1); (40, 24) -> cell (2, 1)
    # their matches: target cells (1, 0), (1, 2) -> centres (20.5, 6.5), (20.5, 34.5)
    # target (portrait, scale 1, 14 columns of padding): gt (20, 7), (34, 50); theta = 25 px
    scorer = PaddedFrameScorer(56, (0.05, 0.1, 0.15))
    scores = scorer(row, src, trg)
    # errors: |(20.5, 6.5) - (20, 7)| = 0.71, |(20.5, 34.5) - (34, 50)| = 20.55: one correct at every alpha
    assert [(s.alpha, s.n_correct, s.n_kps) for s in scores] == [(0.05, 1, 2), (0.1, 1, 2), (0.15, 1, 2)]
    assert {s.threshold for s in scores} == {25.0} and {s.method for s in scores} == {"nn"}


def test_padded_frame_scorer_records_its_predictions_in_the_original_target_frame():
    """predictions.parquet of sd-dino's protocol: the patch centres (20.5, 6.5), (20.5, 34.5) of the test
    above, minus the portrait target's 14 columns of padding at scale 1: (6.5, 6.5), (6.5, 34.5)."""
    src = torch.eye(16).reshape(16, 4, 4)
    row = _row(Index=3, src_width=56, src_height=28, trg_width=28, trg_height=56, threshold_kind="bbox",
               src_kps=[[5.0, 3.0], [40.0, 10.0]], trg_kps=[[6.0, 7.0], [20.0, 50.0]],
               trg_bbox=[0.0, 0.0, 20.0, 25.0])  # fmt: skip
    log = PredictionLog(image_size=64)  # the squashed S is not used by a peer's own frame
    plain = PaddedFrameScorer(56, (0.1,))(row, src, src.transpose(1, 2).contiguous())
    assert PaddedFrameScorer(56, (0.1,), predictions=log)(row, src, src.transpose(1, 2).contiguous()) == plain
    frame = log.frame()
    assert frame[["pred_x", "pred_y"]].to_numpy().tolist() == [[6.5, 6.5], [6.5, 34.5]]
    assert frame[["trg_x", "trg_y"]].to_numpy().tolist() == [[6.0, 7.0], [20.0, 50.0]]
    assert list(frame["method"]) == ["nn", "nn"] and list(frame["kp"]) == [0, 1]


# -------------------------------------------------------------------------------- DIFT's original frame


def _peak_map(centre: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """A (2, 3, 3) map: the cell ``centre`` is (1, 0), every other cell (0, 1)."""
    feature = torch.zeros(2, 3, 3)
    feature[1] = 1.0
    feature[:, centre[1], centre[0]] = torch.tensor([1.0, 0.0])
    return feature


def test_pixel_centre_descriptors_are_the_upsampled_maps_pixels():
    feature = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    pixels = torch.tensor([[0.0, 0.0], [4.0, 7.0], [10.0, 2.0], [10.0, 14.0]])
    up = F.interpolate(feature[None], size=(15, 11), mode="bilinear", align_corners=False)[0]
    expected = F.normalize(torch.stack([up[:, int(y), int(x)] for x, y in pixels.tolist()]), dim=-1)
    assert torch.allclose(pixel_centre_descriptors(feature, pixels, 11, 15), expected, atol=1e-6)


def test_original_frame_cosine_equals_the_full_upsampled_map_and_has_a_known_peak():
    trg = _peak_map() + 0.1 * torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(1))
    desc = F.normalize(torch.tensor([[1.0, 0.0], [0.3, 0.7]]), dim=-1)
    up = F.normalize(F.interpolate(trg[None], size=(15, 9), mode="bilinear")[0], dim=0)  # DIFT's way
    reference = torch.einsum("kc,chw->khw", desc, up)
    assert torch.allclose(original_frame_cosine(desc, trg, (15, 9)), reference, atol=1e-6)
    norms = upsampled_norms(trg, (15, 9), chunk=1)  # chunked over channels: the same norms
    assert torch.allclose(norms, F.interpolate(trg[None], size=(15, 9), mode="bilinear")[0].norm(dim=0))


def test_original_frame_scorer_finds_the_known_peak_in_original_pixels():
    # 3 x 3 maps of 9 x 15 images: upsampled, pixel (4, 7) sits exactly on cell (1, 1) (scales 3 and 5),
    # so the source keypoint there reads (1, 0) and the only target pixel with cosine 1 is (4, 7); the
    # source keypoint (0, 0) reads (0, 1), found first (row-major argmax, as numpy's) at target pixel (0, 0)
    row = _row(
        src_width=9,
        src_height=15,
        trg_width=9,
        trg_height=15,
        src_kps=[[4.0, 7.0], [0.0, 0.0]],
        trg_kps=[[4.0, 7.0], [1.0, 0.0]],
        trg_bbox=[0.0, 0.0, 10.0, 5.0],
        threshold_kind="bbox",
    )
    cosine = original_frame_cosine(pixel_centre_descriptors(_peak_map(), torch.tensor([[4.0, 7.0]]), 9, 15),
                                   _peak_map(), (15, 9))  # fmt: skip
    assert cosine[0, 7, 4] == pytest.approx(1.0) and (cosine[0] < 1 - 1e-6).sum() == 15 * 9 - 1
    scores = OriginalFrameScorer((0.05, 0.1))(row, _peak_map(), _peak_map())
    # errors 0 and 1 with theta = 10 (the original box's max side): 1 / 10 <= 0.1 but not <= 0.05
    assert [(s.alpha, s.n_correct, s.threshold) for s in scores] == [(0.05, 1, 10.0), (0.1, 2, 10.0)]
    log = PredictionLog(image_size=64)
    OriginalFrameScorer((0.1,), log)(_row(**{**vars(row), "Index": 0}), _peak_map(), _peak_map())
    assert log.frame()[["pred_x", "pred_y"]].to_numpy().tolist() == [[4.0, 7.0], [0.0, 0.0]]  # its pixels


def test_dift_pixels_resize_bicubic_to_minus_one_one():
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    expected = np.asarray(image.resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = dift_pixels([image], 8)
    assert pixels.shape == (1, 3, 8, 8)
    assert torch.allclose(pixels[0], torch.from_numpy((expected / 255 - 0.5) * 2).permute(2, 0, 1))


def test_evaluate_with_scorer_computes_features_once_per_image_and_category():
    pairs = pd.DataFrame(
        {
            "pair_id": ["a", "b", "c"],
            "category": ["cat", "dog", "cat"],
            "src_image": ["1", "3", "2"],
            "trg_image": ["2", "1", "1"],
            "flip": False,
        }
    )
    calls: list[list[str]] = []

    def features_for(keys):
        calls.append([key.path for key in keys])
        return torch.stack([torch.full((1, 2, 2), float(key.path)) for key in keys])

    def scorer(row, src, trg):
        from sd4match.metrics import PairScore

        return [
            PairScore(row.pair_id, row.category, "nn", 0.1, 1, 1, float(src[0, 0, 0] * 10 + trg[0, 0, 0]))
        ]

    per_pair = evaluate_with_scorer(pairs, features_for, scorer)
    assert calls == [["1", "2"], ["1", "3"]]  # per category, each distinct image once
    assert list(zip(per_pair.pair_id, per_pair.threshold, strict=True)) == [
        ("a", 12.0),
        ("c", 21.0),
        ("b", 31.0),
    ]


# ------------------------------------------------------------------------------ the tables' row protocols


def test_row_protocols_of_configured_methods():
    assert method_row_protocol({"kind": "sd"}) == RowProtocol("squashed frame", "pck_per_image", None)
    assert method_row_protocol({"kind": "sd", "protocol": "original"}) == RowProtocol(
        "original frame (DIFT's eval)", "pck_per_image", "nn"
    )
    sddino = {"kind": "sd_dino", "protocol": "padded", "image_size": 960, "dino_image_size": 840}
    assert method_row_protocol(sddino) == RowProtocol(
        "padded 840×840 (sd-dino's eval)", "pck_category_weighted", "nn"
    )
    assert method_row_protocol({"kind": "vit", "protocol": "padded", "image_size": 224}).protocol == (
        "padded 224×224 (sd-dino's eval)"
    )
    assert RowProtocol.coerce(RowProtocol("x").to_dict()) == RowProtocol("x")
    assert ESTIMATORS["pck_category_weighted"] == "per keypoint; All = categories weighted by pairs"
    assert paper_protocol("SD+DINO")[0].startswith("sd-dino's eval, padded 840×840")
    assert paper_protocol("DIFT", "table1") == ("unstated", "per image")
    with pytest.raises(ValueError, match="unknown zero-shot protocol 'warped'"):
        method_row_protocol({"kind": "sd", "protocol": "warped"})
    with pytest.raises(ValueError, match="estimator must be one of"):
        RowProtocol("x", "pck_median")


def test_category_weighted_pck_is_sd_dinos_all():
    summary = pd.DataFrame({
        "category": ["cat", "dog", "All", "cat"], "method": ["nn", "nn", "nn", "kernel_softmax"],
        "alpha": [0.1, 0.1, 0.1, 0.1], "n_pairs": [3, 1, 4, 3], "n_kps": [30, 5, 35, 30],
        "pck_per_image": [0.0, 0.0, 0.0, 0.0], "pck_per_keypoint": [50.0, 90.0, 54.0, 10.0],
    })  # fmt: skip
    # (3 x 50 + 1 x 90) / 4 = 60, not the pooled per-keypoint 54 nor the plain category mean 70
    assert category_weighted_pck(summary, "nn", 0.1, "spair") == 60.0
    with pytest.raises(ValueError, match="summary spair: no category rows for method='nn', alpha=0.05"):
        category_weighted_pck(summary, "nn", 0.05, "spair")
    assert math.isclose(category_weighted_pck(summary, "kernel_softmax", 0.1, "x"), 10.0)


def test_original_frame_scorer_computes_a_targets_norm_map_once_per_category(monkeypatch):
    import sd4match.peer_protocols as P

    calls = []
    real = P.upsampled_norms
    monkeypatch.setattr(P, "upsampled_norms", lambda f, size, chunk=64: calls.append(size) or real(f, size))
    row = _row(src_width=9, src_height=15, trg_width=9, trg_height=15, src_kps=[[4.0, 7.0]],
               trg_kps=[[4.0, 7.0]], trg_bbox=[0.0, 0.0, 10.0, 5.0], threshold_kind="bbox",
               trg_image="t.png")  # fmt: skip
    scorer = OriginalFrameScorer((0.1,))
    first = scorer(row, _peak_map(), _peak_map())
    assert scorer(row, _peak_map(), _peak_map()) == first and calls == [(15, 9)]  # reused: same target
    scorer(_row(**{**vars(row), "category": "dog"}), _peak_map(), _peak_map())
    assert calls == [(15, 9), (15, 9)] and len(scorer._norms) == 1  # a new category drops the old maps
