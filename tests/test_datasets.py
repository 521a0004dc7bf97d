"""Tests of the official-layout parsers and the normalised pairs table (sd4match.datasets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from sd4match import datasets as ds

SPAIR_TEST_PER_CATEGORY = [
    690,
    650,
    702,
    702,
    870,
    644,
    564,
    600,
    646,
    640,
    600,
    600,
    702,
    650,
    862,
    664,
    756,
    692,
]
PAIR_167 = "000167-2008_007604-2009_001056:aeroplane"
NAN = float("nan")


def _data(shared_data: Path, name: str) -> Path:
    """A subfolder of the shared real data, or skip naming it."""
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------


def test_category_constants_match_protocol() -> None:
    assert len(ds.SPAIR_CATEGORIES) == 18 and list(ds.SPAIR_CATEGORIES) == sorted(ds.SPAIR_CATEGORIES)
    assert len(ds.PFPASCAL_CLASSES) == 20
    assert ds.PFPASCAL_CLASSES[0] == "aeroplane" and ds.PFPASCAL_CLASSES[10] == "diningtable"
    assert ds.PFPASCAL_CLASSES[17] == "sofa" and ds.PFPASCAL_CLASSES[19] == "tvmonitor"
    assert set(ds.PFPASCAL_CLASSES) - set(ds.SPAIR_CATEGORIES) == {"diningtable", "sofa"}
    assert ds.PFWILLOW_CLASSES[0] == "car(G)" and ds.PFWILLOW_CLASSES[-1] == "winebottle(woC)"
    assert len(ds.PFWILLOW_CLASSES) == 10


# --------------------------------------------------------------------------------------------------
# SPair-71k on real files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def spair_mini(shared_data: Path) -> Path:
    return _data(shared_data, "SPair-71k-mini")


def test_spair_mini_parses_twelve_test_pairs_in_list_order(spair_mini: Path) -> None:
    df = ds.build_pairs_table("spair", spair_mini, "test")
    listed = (spair_mini / "Layout" / "large" / "test.txt").read_text().split()
    assert len(df) == 12
    assert df["pair_id"].tolist() == listed
    assert list(df.columns) == list(ds.PAIRS_COLUMNS + ds.SPAIR_EXTRA_COLUMNS)
    assert df["category"].value_counts().to_dict() == {
        c: 2 for c in ("aeroplane", "cow", "dog", "horse", "motorbike", "pottedplant")
    }
    assert set(df["dataset"]) == {"spair"} and set(df["split"]) == {"test"}
    assert set(df["threshold_kind"]) == {"bbox"} and not df["flip"].any()


def test_spair_mini_exact_values_of_pair_167(spair_mini: Path) -> None:
    df = ds.parse_spair(spair_mini, "test")
    row = df[df["pair_id"] == PAIR_167].iloc[0]
    assert row["category"] == "aeroplane"
    assert row["src_image"] == "JPEGImages/aeroplane/2008_007604.jpg"
    assert row["trg_image"] == "JPEGImages/aeroplane/2009_001056.jpg"
    assert (row["src_width"], row["src_height"], row["trg_width"], row["trg_height"]) == (333, 500, 500, 334)
    assert row["src_bbox"] == [1.0, 25.0, 333.0, 494.0]
    assert row["trg_bbox"] == [14.0, 71.0, 483.0, 220.0]
    assert row["n_kps"] == 7 and len(row["src_kps"]) == 7 and len(row["trg_kps"]) == 7
    assert row["src_kps"][0] == [62.0, 462.0] and row["src_kps"][-1] == [260.0, 27.0]
    assert row["trg_kps"][0] == [480.0, 180.0] and row["trg_kps"][-1] == [37.0, 75.0]
    assert row["kps_ids"] == ["0", "1", "2", "16", "18", "22", "23"]
    assert (row["mirror"], row["viewpoint_variation"], row["scale_variation"]) == (0, 1, 1)
    assert (row["truncation"], row["occlusion"]) == (1, 0)


def test_spair_mini_sizes_agree_with_image_headers(spair_mini: Path) -> None:
    df = ds.parse_spair(spair_mini, "test")
    for rec in ds.records(df):
        assert ds.image_size(spair_mini / rec.src_image) == (rec.src_width, rec.src_height)
        assert ds.image_size(spair_mini / rec.trg_image) == (rec.trg_width, rec.trg_height)


def test_spair_official_split_lists_counts(shared_data: Path) -> None:
    layout = _data(shared_data, "spair-layout") / "Layout" / "large"
    counts = {s: len(ds.read_spair_split_list(layout / f"{s}.txt")) for s in ds.SPLITS}
    assert counts == {"trn": 53340, "val": 5384, "test": 12234}
    test = ds.read_spair_split_list(layout / "test.txt")
    per_category = [sum(stem.endswith(f":{c}") for stem in test) for c in ds.SPAIR_CATEGORIES]
    assert per_category == SPAIR_TEST_PER_CATEGORY
    assert {stem.rsplit(":", 1)[1] for stem in test} == set(ds.SPAIR_CATEGORIES)


def test_spair_split_list_without_annotations_names_missing_file(shared_data: Path) -> None:
    root = _data(shared_data, "spair-layout")
    with pytest.raises(
        FileNotFoundError, match=r"PairAnnotation/test/000001-2008_002719-2008_004100:aeroplane\.json"
    ):
        ds.parse_spair(root, "test")


# --------------------------------------------------------------------------------------------------
# SPair-71k synthetic error paths
# --------------------------------------------------------------------------------------------------


def _spair_ann(**overrides: object) -> dict[str, object]:
    ann: dict[str, object] = {
        "src_imname": "a.jpg",
        "trg_imname": "b.jpg",
        "src_imsize": [40, 30, 3],
        "trg_imsize": [50, 20, 3],
        "src_bndbox": [1, 2, 30, 25],
        "trg_bndbox": [3, 4, 45, 18],
        "category": "cat",
        "src_kps": [[1, 2], [3, 4]],
        "trg_kps": [[5, 6], [7, 8]],
        "kps_ids": ["0", "5"],
        "mirror": 0,
        "viewpoint_variation": 2,
        "scale_variation": 1,
        "truncation": 0,
        "occlusion": 1,
    }
    ann.update(overrides)
    return ann


def _make_spair(
    root: Path, ann: dict[str, object], stem: str = "000001-a-b:cat", images: bool = True
) -> Path:
    (root / "Layout" / "large").mkdir(parents=True)
    (root / "Layout" / "large" / "val.txt").write_text(stem + "\n")
    (root / "PairAnnotation" / "val").mkdir(parents=True)
    (root / "PairAnnotation" / "val" / f"{stem}.json").write_text(json.dumps(ann))
    if images:
        (root / "JPEGImages" / "cat").mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "cat" / "a.jpg")
        Image.new("RGB", (50, 20)).save(root / "JPEGImages" / "cat" / "b.jpg")
    return root / "PairAnnotation" / "val" / f"{stem}.json"


def test_spair_synthetic_pair_parses_exactly(tmp_path: Path) -> None:
    _make_spair(tmp_path, _spair_ann())
    rec = ds.records(ds.parse_spair(tmp_path, "val"))[0]
    assert rec.pair_id == "000001-a-b:cat" and rec.split == "val"
    assert (rec.src_width, rec.src_height, rec.trg_width, rec.trg_height) == (40, 30, 50, 20)
    assert rec.src_kps == [[1.0, 2.0], [3.0, 4.0]] and rec.trg_kps == [[5.0, 6.0], [7.0, 8.0]]
    assert rec.src_bbox == [1.0, 2.0, 30.0, 25.0] and rec.trg_bbox == [3.0, 4.0, 45.0, 18.0]
    assert (rec.viewpoint_variation, rec.occlusion, rec.kps_ids) == (2, 1, ["0", "5"])


def test_spair_missing_json_key_names_file_and_key(tmp_path: Path) -> None:
    ann = _spair_ann()
    del ann["trg_bndbox"]
    path = _make_spair(tmp_path, ann)
    with pytest.raises(ValueError, match=r"000001-a-b:cat\.json: missing key 'trg_bndbox'") as info:
        ds.parse_spair(tmp_path, "val")
    assert str(path) in str(info.value)


def test_spair_wrong_length_keypoints_raise(tmp_path: Path) -> None:
    _make_spair(tmp_path, _spair_ann(trg_kps=[[5, 6]]))
    with pytest.raises(
        ValueError, match=r"000001-a-b:cat\.json: src_kps/trg_kps/kps_ids lengths differ \(2, 1, 2\)"
    ):
        ds.parse_spair(tmp_path, "val")


def test_spair_malformed_point_raises(tmp_path: Path) -> None:
    _make_spair(tmp_path, _spair_ann(src_kps=[[1, 2], [3, 4, 5]]))
    with pytest.raises(ValueError, match=r"src_kps\[1\] must be an \[x, y\] pair"):
        ds.parse_spair(tmp_path, "val")


def test_spair_unknown_category_raises(tmp_path: Path) -> None:
    _make_spair(tmp_path, _spair_ann(category="unicorn"))
    with pytest.raises(ValueError, match=r"unknown SPair-71k category 'unicorn'"):
        ds.parse_spair(tmp_path, "val")


def test_spair_split_list_naming_missing_annotation(tmp_path: Path) -> None:
    _make_spair(tmp_path, _spair_ann())
    (tmp_path / "Layout" / "large" / "val.txt").write_text("000001-a-b:cat\n000002-b-a:cat\n")
    with pytest.raises(
        FileNotFoundError,
        match=r"val\.txt lists a pair whose annotation file is missing: .*000002-b-a:cat\.json",
    ):
        ds.parse_spair(tmp_path, "val")


def test_spair_missing_image_raises(tmp_path: Path) -> None:
    _make_spair(tmp_path, _spair_ann(), images=False)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*JPEGImages/cat/a\.jpg"):
        ds.parse_spair(tmp_path, "val")


def test_spair_missing_split_list_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Layout/small/test\.txt"):
        ds.parse_spair(tmp_path, "test", layout="small")
    with pytest.raises(ValueError, match=r"unknown split 'train'"):
        ds.parse_spair(tmp_path, "train")


# --------------------------------------------------------------------------------------------------
# PF-Willow on real files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def willow(shared_data: Path) -> Path:
    return _data(shared_data, "pf-willow")


def test_pfwillow_real_table(willow: Path) -> None:
    df = ds.build_pairs_table("pfwillow", willow, "test")
    assert len(df) == 900
    assert df["category"].value_counts().to_dict() == {c: 90 for c in ds.PFWILLOW_CLASSES}
    assert (df["n_kps"] == 10).all()
    assert df["src_bbox"].isna().all() and df["trg_bbox"].isna().all()
    assert set(df["threshold_kind"]) == {"kps"} and set(df["split"]) == {"test"}
    first = ds.records(df)[0]
    assert first.pair_id == "0" and first.category == "car(G)"
    assert (first.src_image, first.trg_image) == (
        "PF-dataset/car(G)/Cars_006a.png",
        "PF-dataset/car(G)/Cars_007a.png",
    )
    # PNG IHDR of Cars_006a.png: 300 x 200; Cars_007a.png: 300 x 225.
    assert (first.src_width, first.src_height, first.trg_width, first.trg_height) == (300, 200, 300, 225)
    assert first.src_kps[0] == [47.93528064146622, 98.15864833906066]
    assert first.src_kps[9] == [131.1769759450172, 61.7096219931271]
    assert first.trg_kps[0] == [38.448019995313615, 159.2107318597203]


def test_pfwillow_mat_agrees_with_csv(willow: Path) -> None:
    df = ds.parse_pfwillow(willow, willow / "test_pairs.csv")
    mat = ds.read_pfwillow_mat(willow / "PF-dataset" / "car(G)" / "Cars_006a.mat")
    assert mat.shape == (10, 2)
    assert mat.tolist() == df.iloc[0]["src_kps"]


# --------------------------------------------------------------------------------------------------
# PF-Willow synthetic error paths
# --------------------------------------------------------------------------------------------------


def _willow_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _willow_row(
    a: str = "PF-dataset/duck(S)/a.png", b: str = "PF-dataset/duck(S)/b.png"
) -> dict[str, object]:
    row: dict[str, object] = {"imageA": a, "imageB": b}
    for side, offset in (("A", 0.0), ("B", 100.0)):
        row.update({f"X{side}{i}": offset + i for i in range(1, 11)})
        row.update({f"Y{side}{i}": offset + 0.5 * i for i in range(1, 11)})
    return row


def _willow_images(root: Path) -> None:
    (root / "PF-dataset" / "duck(S)").mkdir(parents=True)
    Image.new("RGB", (300, 210)).save(root / "PF-dataset" / "duck(S)" / "a.png")
    Image.new("RGB", (280, 200)).save(root / "PF-dataset" / "duck(S)" / "b.png")


def test_pfwillow_synthetic_row(tmp_path: Path) -> None:
    _willow_images(tmp_path)
    csv = _willow_csv(tmp_path / "test_pairs.csv", [_willow_row()])
    rec = ds.records(ds.parse_pfwillow(tmp_path, csv))[0]
    assert (rec.src_width, rec.src_height, rec.trg_width, rec.trg_height) == (300, 210, 280, 200)
    assert rec.src_kps[0] == [1.0, 0.5] and rec.src_kps[9] == [10.0, 5.0]
    assert rec.trg_kps[0] == [101.0, 100.5] and rec.trg_kps[9] == [110.0, 105.0]
    assert rec.src_bbox is None and rec.n_kps == 10 and rec.category == "duck(S)"


def test_pfwillow_wrong_column_count(tmp_path: Path) -> None:
    row = _willow_row()
    del row["YB7"]
    csv = _willow_csv(tmp_path / "test_pairs.csv", [row])
    with pytest.raises(ValueError, match=r"test_pairs\.csv: row 0 has 41 columns; the PF-Willow list has 42"):
        ds.parse_pfwillow(tmp_path, csv)


def test_pfwillow_missing_image(tmp_path: Path) -> None:
    csv = _willow_csv(tmp_path / "test_pairs.csv", [_willow_row()])
    with pytest.raises(FileNotFoundError, match=r"image not found: .*PF-dataset/duck\(S\)/a\.png"):
        ds.parse_pfwillow(tmp_path, csv)


def test_pfwillow_unknown_or_mixed_subclass(tmp_path: Path) -> None:
    _willow_images(tmp_path)
    csv = _willow_csv(tmp_path / "x.csv", [_willow_row(a="PF-dataset/goose/a.png")])
    with pytest.raises(ValueError, match=r"x\.csv: row 0: unknown PF-Willow sub-class 'goose'"):
        ds.parse_pfwillow(tmp_path, csv)
    csv = _willow_csv(tmp_path / "y.csv", [_willow_row(b="PF-dataset/car(G)/b.png")])
    with pytest.raises(ValueError, match=r"y\.csv: row 0: imageA and imageB belong to different sub-classes"):
        ds.parse_pfwillow(tmp_path, csv)


def test_pfwillow_non_numeric_and_nan_coordinates(tmp_path: Path) -> None:
    _willow_images(tmp_path)
    row = _willow_row()
    row["XA3"] = "abc"
    with pytest.raises(ValueError, match=r"row 0, column XA3: not a number: 'abc'"):
        ds.parse_pfwillow(tmp_path, _willow_csv(tmp_path / "a.csv", [row]))
    row["XA3"] = "nan"
    with pytest.raises(ValueError, match=r"row 0: keypoint A3 is not finite"):
        ds.parse_pfwillow(tmp_path, _willow_csv(tmp_path / "b.csv", [row]))


def test_read_pfwillow_mat_errors(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "wrong.mat", {"pts_coord": np.zeros((2, 9))})
    with pytest.raises(ValueError, match=r"wrong\.mat: pts_coord must be 2 x 10, got shape \(2, 9\)"):
        ds.read_pfwillow_mat(tmp_path / "wrong.mat")
    scipy.io.savemat(tmp_path / "nokey.mat", {"kps": np.zeros((2, 10))})
    with pytest.raises(ValueError, match=r"nokey\.mat: missing key 'pts_coord'"):
        ds.read_pfwillow_mat(tmp_path / "nokey.mat")
    with pytest.raises(FileNotFoundError, match=r"absent\.mat"):
        ds.read_pfwillow_mat(tmp_path / "absent.mat")
    (tmp_path / "junk.mat").write_bytes(b"not a matlab file at all")
    with pytest.raises(ValueError, match=r"cannot read MATLAB file .*junk\.mat"):
        ds.read_pfwillow_mat(tmp_path / "junk.mat")


def test_build_pairs_table_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cub'"):
        ds.build_pairs_table("cub", tmp_path, "test")
    with pytest.raises(ValueError, match=r"PF-Willow has only a test split, got 'trn'"):
        ds.build_pairs_table("pfwillow", tmp_path, "trn")
    with pytest.raises(ValueError, match=r"spair takes its pairs from Layout/large/test\.txt"):
        ds.build_pairs_table("spair", tmp_path, "test", pairs_csv=tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match=r"pair list not found: .*test_pairs\.csv"):
        ds.build_pairs_table("pfwillow", tmp_path, "test")


# --------------------------------------------------------------------------------------------------
# PF-Pascal on real CSVs (no images in shared data)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pascal_pairs(shared_data: Path) -> Path:
    return _data(shared_data, "pf-pascal-pairs")


def test_pfpascal_real_test_csv(pascal_pairs: Path) -> None:
    rows = ds.read_pfpascal_csv(pascal_pairs / "test_pairs.csv")
    assert len(rows) == 299
    first = rows[0]
    assert first.source_image == "PF-dataset-PASCAL/JPEGImages/2011_001407.jpg"
    assert first.target_image == "PF-dataset-PASCAL/JPEGImages/2010_004184.jpg"
    assert first.class_id == 1 and first.flip is False
    assert first.src_kps is not None and first.trg_kps is not None
    assert len(first.src_kps) == 11 and len(first.trg_kps) == 11
    assert first.src_kps[0] == [253.631662222222, 58.1813333333333]
    assert first.trg_kps[0] == [272.801888, 65.2755428571429]
    assert first.src_kps[10] == [224.62768, 90.496]
    assert len(rows[1].src_kps or []) == 13


def test_pfpascal_real_train_and_val_csvs(pascal_pairs: Path) -> None:
    train = ds.read_pfpascal_csv(pascal_pairs / "train_pairs.csv")
    assert len(train) == 2940
    assert sum(r.flip for r in train) == 1470
    assert (train[0].class_id, train[0].flip, train[1].class_id, train[1].flip) == (2, False, 6, True)
    assert train[0].src_kps is None
    val = ds.read_pfpascal_csv(pascal_pairs / "val_pairs.csv")
    assert len(val) == 308
    assert (val[0].class_id, val[0].flip, val[1].class_id) == (8, False, 16)


def test_pfpascal_real_table_needs_images(pascal_pairs: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"image not found: .*PF-dataset-PASCAL/JPEGImages/2011_001407\.jpg"
    ):
        ds.build_pairs_table("pfpascal", pascal_pairs, "test")
    with pytest.raises(
        FileNotFoundError, match=r"image not found: .*PF-dataset-PASCAL/JPEGImages/2008_006579\.jpg"
    ):
        ds.build_pairs_table("pfpascal", pascal_pairs, "trn")
    assert ds.find_pfpascal_pairs_csv(pascal_pairs, "trn") == pascal_pairs / "train_pairs.csv"


# --------------------------------------------------------------------------------------------------
# PF-Pascal synthetic .mat / flip / errors
# --------------------------------------------------------------------------------------------------


def _pascal_tree(root: Path, *, mats: bool = True) -> Path:
    """Two images (40x30 and 50x20) of class 'cat' with official-format annotations."""
    base = root / "PF-dataset-PASCAL"
    (base / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(base / "JPEGImages" / "a.jpg")
    Image.new("RGB", (50, 20)).save(base / "JPEGImages" / "b.jpg")
    if mats:
        (base / "Annotations" / "cat").mkdir(parents=True)
        kps_a = np.array([[1.0, 2.0], [NAN, NAN], [5.0, 6.0], [7.0, 8.0]])
        kps_b = np.array([[10.0, 11.0], [12.0, 13.0], [NAN, NAN], [15.0, 16.0]])
        scipy.io.savemat(
            base / "Annotations" / "cat" / "a.mat", {"kps": kps_a, "bbox": np.array([[2, 3, 30, 25]])}
        )
        scipy.io.savemat(
            base / "Annotations" / "cat" / "b.mat", {"kps": kps_b, "bbox": np.array([[1, 1, 45, 18]])}
        )
    return base


def _flip_csv(path: Path, rows: list[tuple[str, str, object, object]]) -> Path:
    lines = ["source_image,target_image,class,flip"] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


A_IMG = "PF-dataset-PASCAL/JPEGImages/a.jpg"
B_IMG = "PF-dataset-PASCAL/JPEGImages/b.jpg"


def test_pfpascal_mat_keypoints_bboxes_and_flip(tmp_path: Path) -> None:
    _pascal_tree(tmp_path)
    _flip_csv(tmp_path / "trn_pairs.csv", [(A_IMG, B_IMG, 8, 0), (A_IMG, B_IMG, 8, 1)])
    df = ds.build_pairs_table("pfpascal", tmp_path, "trn")
    plain, flipped = ds.records(df)
    assert (plain.pair_id, plain.category, plain.split, plain.flip) == ("0", "cat", "trn", False)
    assert (plain.src_width, plain.src_height, plain.trg_width, plain.trg_height) == (40, 30, 50, 20)
    # rows 1 (src NaN) and 2 (trg NaN) are not mutually visible
    assert plain.src_kps == [[1.0, 2.0], [7.0, 8.0]]
    assert plain.trg_kps == [[10.0, 11.0], [15.0, 16.0]]
    assert plain.n_kps == 2 and plain.threshold_kind == "img"
    assert plain.src_bbox == [2.0, 3.0, 30.0, 25.0] and plain.trg_bbox == [1.0, 1.0, 45.0, 18.0]
    # flipped: x -> W - x (W = 40 source, 50 target); bbox x1' = W - x2, x2' = W - x1
    assert flipped.pair_id == "1" and flipped.flip is True
    assert flipped.src_kps == [[39.0, 2.0], [33.0, 8.0]]
    assert flipped.trg_kps == [[40.0, 11.0], [35.0, 16.0]]
    assert flipped.src_bbox == [10.0, 3.0, 38.0, 25.0]
    assert flipped.trg_bbox == [5.0, 1.0, 49.0, 18.0]


def test_pfpascal_test_keypoints_come_from_the_mats_and_the_inline_copy_is_cross_checked(
    tmp_path: Path,
) -> None:
    """As the authors read them: the .mat annotations; the CSV's inline copy is compared and reported."""
    _pascal_tree(tmp_path, mats=False)
    header = "source_image,target_image,class,XA,YA,XB,YB\n"
    agreeing = f"{A_IMG},{B_IMG},8,1;nan;5;7,2;nan;6;8,10;12;nan;15,11;13;nan;16\n"
    differing = f"{A_IMG},{B_IMG},8,1.5;2;nan;4,3;4;5;6,10;11;12;NaN,13;14;15;16\n"
    csv = tmp_path / "test_pairs.csv"
    csv.write_text(header + differing)
    with pytest.raises(FileNotFoundError, match=r"PF-Pascal annotation not found: .*Annotations/cat/a\.mat"):
        ds.parse_pfpascal(tmp_path, "test", csv)
    _pascal_tree(tmp_path / "with_mats")
    (tmp_path / "with_mats" / "test_pairs.csv").write_text(header + agreeing + differing)
    df, report = ds.build_pairs("pfpascal", tmp_path / "with_mats", "test")
    for rec in ds.records(df):  # rows 1 (src NaN) and 2 (trg NaN) of the .mat files are not mutually visible
        assert rec.src_kps == [[1.0, 2.0], [7.0, 8.0]] and rec.trg_kps == [[10.0, 11.0], [15.0, 16.0]]
        assert rec.src_bbox == [2.0, 3.0, 30.0, 25.0] and rec.trg_bbox == [1.0, 1.0, 45.0, 18.0]
    assert [d.pair_id for d in report.disagreements] == ["1"]
    assert (
        "the CSV lists 2 mutually visible keypoints, the .mat files 2" not in report.disagreements[0].detail
    )
    assert "differ by up to" in report.disagreements[0].detail
    assert report.to_dict()["inline_keypoint_disagreements"] == 1


def test_pfpascal_unknown_class_id(tmp_path: Path) -> None:
    csv = _flip_csv(tmp_path / "val_pairs.csv", [(A_IMG, B_IMG, 21, 0)])
    with pytest.raises(ValueError, match=r"val_pairs\.csv: row 0, column class: unknown class id 21"):
        ds.read_pfpascal_csv(csv)
    csv = _flip_csv(tmp_path / "v2.csv", [(A_IMG, B_IMG, "cat", 0)])
    with pytest.raises(ValueError, match=r"v2\.csv: row 0, column class: not an integer: 'cat'"):
        ds.read_pfpascal_csv(csv)


def test_pfpascal_bad_flip_value(tmp_path: Path) -> None:
    csv = _flip_csv(tmp_path / "val_pairs.csv", [(A_IMG, B_IMG, 8, 0), (A_IMG, B_IMG, 8, 2)])
    with pytest.raises(ValueError, match=r"row 1, column flip: expected 0 or 1, got '2'"):
        ds.read_pfpascal_csv(csv)


def test_pfpascal_wrong_length_coordinate_list(tmp_path: Path) -> None:
    csv = tmp_path / "test_pairs.csv"
    csv.write_text(
        f"source_image,target_image,class,XA,YA,XB,YB\n{A_IMG},{B_IMG},8,1;2;3,4;5,6;7;8,9;10;11\n"
    )
    with pytest.raises(ValueError, match=r"test_pairs\.csv: row 0: coordinate lists have different lengths"):
        ds.read_pfpascal_csv(csv)


def test_pfpascal_wrong_column_counts(tmp_path: Path) -> None:
    csv = tmp_path / "test_pairs.csv"
    csv.write_text(f"source_image,target_image,XA,YA,XB\n{A_IMG},{B_IMG},8,1,2\n")
    with pytest.raises(ValueError, match=r"test_pairs\.csv: row 0 has 5 columns .*a PF-Pascal list has 3 "):
        ds.read_pfpascal_csv(csv)
    csv.write_text(f"h1,h2,h3,h4\n{A_IMG},{B_IMG},8,0\n{A_IMG},{B_IMG},8,1,1;2,3;4,5;6\n")
    with pytest.raises(ValueError, match=r"test_pairs\.csv: row 1 has 7 columns \(row 0: 4\)"):
        ds.read_pfpascal_csv(csv)
    csv.write_text("source_image,target_image,class,flip\n")
    with pytest.raises(ValueError, match="holds no pairs"):
        ds.read_pfpascal_csv(csv)


def test_pfpascal_missing_mat_for_train(tmp_path: Path) -> None:
    _pascal_tree(tmp_path, mats=False)
    csv = _flip_csv(tmp_path / "trn_pairs.csv", [(A_IMG, B_IMG, 8, 0)])
    with pytest.raises(FileNotFoundError, match=r"PF-Pascal annotation not found: .*Annotations/cat/a\.mat"):
        ds.parse_pfpascal(tmp_path, "trn", csv)


def test_pfpascal_missing_image(tmp_path: Path) -> None:
    csv = _flip_csv(tmp_path / "trn_pairs.csv", [(A_IMG, B_IMG, 8, 0)])
    with pytest.raises(
        FileNotFoundError,
        match=r"image not found: .*JPEGImages/a\.jpg \(referenced by .*trn_pairs\.csv row 0\)",
    ):
        ds.parse_pfpascal(tmp_path, "trn", csv)


def test_pfpascal_mat_errors(tmp_path: Path) -> None:
    base = _pascal_tree(tmp_path)
    mat = base / "Annotations" / "cat" / "a.mat"
    scipy.io.savemat(mat, {"bbox": np.array([[2, 3, 30, 25]])})
    with pytest.raises(ValueError, match=r"a\.mat: missing key 'kps'"):
        ds.read_pfpascal_mat(mat)
    scipy.io.savemat(mat, {"kps": np.zeros((4, 3)), "bbox": np.array([[2, 3, 30, 25]])})
    with pytest.raises(ValueError, match=r"a\.mat: kps must be an N x 2 array, got shape \(4, 3\)"):
        ds.read_pfpascal_mat(mat)
    scipy.io.savemat(mat, {"kps": np.zeros((4, 2)), "bbox": np.array([[2, 3, 30]])})
    with pytest.raises(ValueError, match=r"a\.mat: bbox must hold 4 numbers"):
        ds.read_pfpascal_mat(mat)
    scipy.io.savemat(mat, {"kps": np.zeros((3, 2)), "bbox": np.array([[2, 3, 30, 25]])})
    csv = _flip_csv(tmp_path / "trn_pairs.csv", [(A_IMG, B_IMG, 8, 0)])
    with pytest.raises(ValueError, match=r"row 0: .*a\.mat has 3 keypoints but .*b\.mat has 4"):
        ds.parse_pfpascal(tmp_path, "trn", csv)


def test_pfpascal_no_mutually_visible_keypoints(tmp_path: Path) -> None:
    base = _pascal_tree(tmp_path)
    scipy.io.savemat(
        base / "Annotations" / "cat" / "b.mat", {"kps": np.full((4, 2), NAN), "bbox": [[1, 1, 9, 9]]}
    )
    csv = tmp_path / "test_pairs.csv"
    csv.write_text(f"source_image,target_image,class,XA,YA,XB,YB\n{A_IMG},{B_IMG},8,nan;1,1;1,2;nan,2;2\n")
    with pytest.raises(ValueError, match=r"test_pairs\.csv: pair '0': no mutually visible keypoints"):
        ds.parse_pfpascal(tmp_path, "test", csv)


def test_find_pfpascal_pairs_csv(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"trn_pairs\.csv.*train_pairs\.csv"):
        ds.find_pfpascal_pairs_csv(tmp_path, "trn")
    (tmp_path / "train_pairs.csv").write_text("x")
    assert ds.find_pfpascal_pairs_csv(tmp_path, "trn") == tmp_path / "train_pairs.csv"
    (tmp_path / "trn_pairs.csv").write_text("x")
    assert ds.find_pfpascal_pairs_csv(tmp_path, "trn") == tmp_path / "trn_pairs.csv"
    (tmp_path / "val_pairs.csv").write_text("x")
    assert ds.find_pfpascal_pairs_csv(tmp_path, "val") == tmp_path / "val_pairs.csv"
    with pytest.raises(ValueError, match=r"unknown split 'train'"):
        ds.find_pfpascal_pairs_csv(tmp_path, "train")


# --------------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------------


def test_load_image_rgb_and_flip(tmp_path: Path) -> None:
    img = Image.new("L", (3, 2), color=0)
    img.putpixel((0, 1), 200)
    img.save(tmp_path / "g.png")
    plain = ds.load_image(tmp_path, "g.png")
    assert plain.mode == "RGB" and plain.size == (3, 2)
    assert plain.getpixel((0, 1)) == (200, 200, 200) and plain.getpixel((2, 1)) == (0, 0, 0)
    flipped = ds.load_image(tmp_path, "g.png", flip=True)
    assert flipped.getpixel((2, 1)) == (200, 200, 200) and flipped.getpixel((0, 1)) == (0, 0, 0)


def test_load_image_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image not found: .*nope\.jpg"):
        ds.load_image(tmp_path, "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.jpg"):
        ds.load_image(tmp_path, "bad.jpg")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.jpg"):
        ds.image_size(tmp_path / "bad.jpg")
    Image.new("RGB", (64, 64), color=(9, 9, 9)).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.png"):
        ds.load_image(tmp_path, "cut.png")


# --------------------------------------------------------------------------------------------------
# Table validation and storage
# --------------------------------------------------------------------------------------------------


def _table() -> pd.DataFrame:
    rows = [
        {
            "pair_id": "0",
            "dataset": "pfwillow",
            "split": "test",
            "category": "car(G)",
            "src_image": "PF-dataset/car(G)/a.png",
            "trg_image": "PF-dataset/car(G)/b.png",
            "src_width": 300,
            "src_height": 200,
            "trg_width": 300,
            "trg_height": 225,
            "src_kps": [[1.5, 2.0], [3.0, 4.25]],
            "trg_kps": [[5.0, 6.0], [7.0, 8.0]],
            "src_bbox": None,
            "trg_bbox": None,
            "flip": False,
            "n_kps": 2,
            "threshold_kind": "kps",
        }
    ]
    return pd.DataFrame(rows, columns=list(ds.PAIRS_COLUMNS))


def test_validate_accepts_good_table() -> None:
    ds.validate_pairs_table(_table(), "good.parquet")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("trg_kps", [[5.0, 6.0]], r"t\.parquet: pair '0': src_kps has 2 points but trg_kps has 1"),
        ("n_kps", 3, r"t\.parquet: pair '0': n_kps is 3 but there are 2 keypoints"),
        (
            "src_kps",
            [[1.0, 2.0, 3.0], [3.0, 4.0]],
            r"t\.parquet: pair '0': src_kps must be a list of \[x, y\] points",
        ),
        ("trg_kps", [[5.0, 6.0], [NAN, 8.0]], r"t\.parquet: pair '0': trg_kps holds a non-finite coordinate"),
        ("src_bbox", [1.0, 2.0], r"t\.parquet: pair '0': src_bbox must be \[x1, y1, x2, y2\] or None"),
        ("trg_width", 0, r"t\.parquet: pair '0': trg_width must be positive"),
        ("threshold_kind", "bbox", r"t\.parquet: pair '0': threshold_kind 'bbox' is wrong for pfwillow"),
        ("split", "train", r"t\.parquet: pair '0': unknown dataset/split"),
    ],
)
def test_validate_rejects_bad_rows(column: str, value: object, message: str) -> None:
    df = _table()
    df.at[0, column] = value
    with pytest.raises(ValueError, match=message):
        ds.validate_pairs_table(df, "t.parquet")


def test_validate_rejects_zero_keypoints_missing_columns_duplicates_and_empty() -> None:
    df = _table()
    df.at[0, "src_kps"], df.at[0, "trg_kps"], df.at[0, "n_kps"] = [], [], 0
    with pytest.raises(ValueError, match=r"t\.parquet: pair '0': no mutually visible keypoints"):
        ds.validate_pairs_table(df, "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: pairs table lacks columns \['flip'\]"):
        ds.validate_pairs_table(_table().drop(columns=["flip"]), "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: pair '0' appears more than once"):
        ds.validate_pairs_table(pd.concat([_table(), _table()], ignore_index=True), "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: pairs table has no pairs"):
        ds.validate_pairs_table(_table().iloc[:0], "t.parquet")
    spair = _table()
    spair["dataset"], spair["threshold_kind"] = "spair", "bbox"
    with pytest.raises(ValueError, match=r"t\.parquet: pair '0': threshold_kind 'bbox' needs trg_bbox"):
        ds.validate_pairs_table(spair, "t.parquet")


def test_round_trip_synthetic_table_keeps_none_bboxes(tmp_path: Path) -> None:
    path = tmp_path / "out" / "pairs.parquet"
    ds.write_pairs_table(_table(), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.parquet"]
    back = ds.read_pairs_table(path)
    assert list(back.columns) == list(ds.PAIRS_COLUMNS)
    row = back.iloc[0]
    assert row["src_kps"] == [[1.5, 2.0], [3.0, 4.25]] and isinstance(row["src_kps"][0][0], float)
    assert row["src_bbox"] is None and row["trg_bbox"] is None
    assert back["flip"].dtype == bool and back["flip"].tolist() == [False]
    assert ds.records(back) == ds.records(_table())


def test_round_trip_real_spair_table(spair_mini: Path, tmp_path: Path) -> None:
    df = ds.parse_spair(spair_mini, "test")
    path = tmp_path / "spair_test.parquet"
    ds.write_pairs_table(df, path)
    back = ds.read_pairs_table(path)
    assert list(back.columns) == list(df.columns)
    assert ds.records(back) == ds.records(df)
    assert back.iloc[0]["kps_ids"] == ["0", "1", "2", "16", "18", "22", "23"]
    assert back.iloc[0]["trg_bbox"] == [14.0, 71.0, 483.0, 220.0]
    assert back["n_kps"].dtype == np.int64 and back["flip"].dtype == bool


def test_write_refuses_invalid_table_and_read_errors(tmp_path: Path) -> None:
    df = _table()
    df.at[0, "n_kps"] = 5
    with pytest.raises(ValueError, match=r"bad\.parquet: pair '0': n_kps is 5"):
        ds.write_pairs_table(df, tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()
    with pytest.raises(FileNotFoundError, match=r"pairs table not found: .*none\.parquet"):
        ds.read_pairs_table(tmp_path / "none.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"cannot read pairs table .*junk\.parquet"):
        ds.read_pairs_table(tmp_path / "junk.parquet")


def test_flip_helpers_are_involutions() -> None:
    pts = [[0.0, 1.0], [12.5, 3.0]]
    assert ds.flip_points(pts, 20) == [[20.0, 1.0], [7.5, 3.0]]
    assert ds.flip_points(ds.flip_points(pts, 20), 20) == pts
    assert ds.flip_bbox([2.0, 3.0, 8.0, 9.0], 20) == [12.0, 3.0, 18.0, 9.0]
    assert ds.flip_bbox(None, 20) is None
    assert ds.mutually_visible(
        [[1.0, 2.0], [NAN, 1.0], [3.0, 4.0]], [[1.0, 2.0], [1.0, 1.0], [math.inf, 4.0]]
    ) == [0]
