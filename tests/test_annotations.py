"""Datasets as every peer reads them (issue 10 §2); annotation sanity against the real images (issue 7 §5)."""

from __future__ import annotations

import csv
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from sd4match import datasets as ds
from sd4match.annotation_checks import (
    PairsReport,
    pairs_note,
    read_pairs_report,
    report_path,
    write_pairs_report,
)
from sd4match.data_sources import acquire_dataset
from sd4match.demo_world import DemoWorldSpec, make_demo_world


def _data(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def _rewrite(src: Path, dest: Path, header: list[str] | None, prefix: str, sep: str = "/") -> Path:
    """The CSV under another header (or none) and another image path prefix, values untouched."""
    with open(src, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    out = []
    for row in rows:
        row = list(row)
        for i in (0, 1):
            parts = row[i].split("/")
            keep = parts[-2:] if src.parent.name == "pf-willow" else parts[-1:]
            row[i] = sep.join([prefix.rstrip("/").replace("/", sep), *keep])
        out.append(row)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header is not None:
            writer.writerow(header)
        writer.writerows(out)
    return dest


# ---------------------------------------------------------------------------------------------------------
# PF-Willow / PF-Pascal lists by column position and file name, on the real files
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "prefix", "sep"),
    [
        ([f"col{i}" for i in range(42)], "/data/proposal-flow/willow/PF-dataset", "/"),
        (None, "datasets/PF-WILLOW", "/"),  # no header at all
        (["a", "b", *(["x"] * 40)], r"C:\\data\\PF-dataset", "\\"),  # Windows paths
    ],
)
def test_real_pfwillow_list_parses_under_another_header_and_prefix(
    shared_data, tmp_path, header, prefix, sep
):
    willow = _data(shared_data, "pf-willow")
    reference = ds.parse_pfwillow(willow, willow / "test_pairs.csv")
    other = _rewrite(willow / "test_pairs.csv", tmp_path / "pf-willow" / "list.csv", header, prefix, sep)
    table = ds.parse_pfwillow(willow, other)
    pd.testing.assert_frame_equal(table, reference)
    assert table.loc[0, "src_image"] == "PF-dataset/car(G)/Cars_006a.png" and len(table) == 900


@pytest.mark.parametrize("split", ["test", "train", "val"])
@pytest.mark.parametrize(
    ("header", "prefix"),
    [(["src", "trg", "cls", "a", "b", "c", "d"], "/scratch/pascal/images"), (None, "JPEGImages")],
)
def test_real_pfpascal_lists_parse_under_another_header_and_prefix(
    shared_data, tmp_path, split, header, prefix
):
    pairs = _data(shared_data, "pf-pascal-pairs")
    reference = ds.read_pfpascal_csv(pairs / f"{split}_pairs.csv")
    header = None if header is None else header[: 7 if split == "test" else 4]
    other = _rewrite(pairs / f"{split}_pairs.csv", tmp_path / "pf-pascal-pairs" / "x.csv", header, prefix)
    assert ds.read_pfpascal_csv(other) == reference
    assert reference[0].source_image.startswith("PF-dataset-PASCAL/JPEGImages/")
    assert len(reference) == {"test": 299, "train": 2940, "val": 308}[split]


def test_pfwillow_path_without_a_subclass_folder_is_an_error(tmp_path):
    (tmp_path / "l.csv").write_text(
        "a,b," + ",".join(["x"] * 40) + "\nCars_006a.png,x/y.png," + ",".join(["1"] * 40) + "\n"
    )
    with pytest.raises(
        ValueError, match=r"l\.csv: row 0: image path 'Cars_006a\.png' names no sub-class folder"
    ):
        ds.parse_pfwillow(tmp_path, tmp_path / "l.csv")


# ---------------------------------------------------------------------------------------------------------
# Annotation sanity against the real image sizes
# ---------------------------------------------------------------------------------------------------------


def _spair_root(tmp_path: Path, anns: dict[str, dict]) -> Path:
    """A SPair-71k val split of the given pair annotations; images a.jpg 40 x 30 and b.jpg 50 x 20 (cat)."""
    root = tmp_path / "SPair-71k"
    (root / "Layout" / "large").mkdir(parents=True)
    (root / "Layout" / "large" / "val.txt").write_text("".join(f"{stem}\n" for stem in anns))
    (root / "PairAnnotation" / "val").mkdir(parents=True)
    for stem, ann in anns.items():
        (root / "PairAnnotation" / "val" / f"{stem}.json").write_text(json.dumps(ann))
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "cat" / "a.jpg")
    Image.new("RGB", (50, 20)).save(root / "JPEGImages" / "cat" / "b.jpg")
    return root


def _ann(**overrides) -> dict:
    ann = {
        "src_imname": "a.jpg",
        "trg_imname": "b.jpg",
        "src_imsize": [40, 30, 3],
        "trg_imsize": [50, 20, 3],
        "src_bndbox": [1, 2, 30, 25],
        "trg_bndbox": [3, 4, 45, 18],
        "category": "cat",
        "src_kps": [[1, 2], [40, 30]],  # on the border: fine
        "trg_kps": [[5, 6], [7, 8]],
        "kps_ids": ["0", "5"],
        "mirror": 0,
        "viewpoint_variation": 0,
        "scale_variation": 0,
        "truncation": 0,
        "occlusion": 0,
    }
    return ann | overrides


def test_spair_imsize_that_is_not_the_jpeg_is_an_error_naming_file_pair_and_key(tmp_path):
    root = _spair_root(tmp_path, {"000001-a-b:cat": _ann(trg_imsize=[500, 200, 3])})
    with pytest.raises(ValueError) as info:
        ds.parse_spair(root, "val")
    message = str(info.value)
    assert (
        "PairAnnotation/val/000001-a-b:cat.json: pair '000001-a-b:cat': trg_imsize says 500 x 200" in message
    )
    assert "JPEGImages/cat/b.jpg is 50 x 20" in message


def test_unscorable_pairs_are_skipped_counted_and_reported(tmp_path):
    anns = {
        "000001-a-b:cat": _ann(),
        "000002-a-b:cat": _ann(trg_kps=[[5, 6], [52.5, 8]]),  # 2.5 px right of a 50 px wide image
        "000003-a-b:cat": _ann(trg_bndbox=[45, 4, 3, 18]),  # inverted
        "000004-a-b:cat": _ann(trg_bndbox=[3, 4, 45, 4]),  # zero height
        "000005-a-b:cat": _ann(src_bndbox=[30, 25, 1, 2]),  # the source box sets no threshold: kept
        "000006-a-b:cat": _ann(src_kps=[[-0.5, 2], [41, 31]]),  # within 1 px of the border: kept
    }
    df, report = ds.build_pairs("spair", _spair_root(tmp_path, anns), "val")
    assert df["pair_id"].tolist() == ["000001-a-b:cat", "000005-a-b:cat", "000006-a-b:cat"]
    assert (report.listed, report.kept) == (6, 3)
    skipped = {s.pair_id: (s.key, s.reason) for s in report.skipped}
    assert skipped == {
        "000002-a-b:cat": ("trg_kps[1]", "keypoint outside its image: (52.5, 8) in a 50 x 20 image"),
        "000003-a-b:cat": ("trg_bbox", "inverted target bbox: [45.0, 4.0, 3.0, 18.0]"),
        "000004-a-b:cat": ("trg_bbox", "zero-area target bbox: [3.0, 4.0, 45.0, 4.0]"),
    }
    assert all(s.file.endswith(f"PairAnnotation/val/{s.pair_id}.json") for s in report.skipped)
    path = report_path(tmp_path / "results" / "pairs" / "spair_val.parquet")
    assert path.name == "spair_val.report.json"
    write_pairs_report(report, path)
    data = read_pairs_report(path)
    assert (data["pairs_listed"], data["pairs_kept"], data["pairs_skipped"]) == (6, 3, 3)
    assert data["skip_reasons"] == {
        "keypoint outside its image": 1,
        "inverted target bbox": 1,
        "zero-area target bbox": 1,
    }
    assert pairs_note([path]) == (
        "Pairs: SPair-71k val 3 of 6 (3 skipped: 1 inverted target bbox, 1 keypoint outside its image, "
        "1 zero-area target bbox)."
    )


def test_pfpascal_keypoint_outside_its_image_after_flip_is_skipped(tmp_path):
    base = tmp_path / "PF-dataset-PASCAL"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "Annotations" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(base / "JPEGImages" / "a.jpg")
    Image.new("RGB", (50, 20)).save(base / "JPEGImages" / "b.jpg")
    scipy.io.savemat(
        base / "Annotations/cat/a.mat", {"kps": np.array([[1.0, 2.0], [45.0, 8.0]]), "bbox": [[1, 1, 9, 9]]}
    )
    scipy.io.savemat(
        base / "Annotations/cat/b.mat", {"kps": np.array([[3.0, 4.0], [5.0, 6.0]]), "bbox": [[1, 1, 9, 9]]}
    )
    (tmp_path / "trn_pairs.csv").write_text(
        "s,t,c,f\nPF-dataset-PASCAL/JPEGImages/a.jpg,PF-dataset-PASCAL/JPEGImages/b.jpg,8,1\n"
        "PF-dataset-PASCAL/JPEGImages/b.jpg,PF-dataset-PASCAL/JPEGImages/b.jpg,8,0\n"
    )
    df, report = ds.build_pairs("pfpascal", tmp_path, "trn")
    assert df["pair_id"].tolist() == ["1"]
    [skip] = report.skipped
    # flipped: x -> 40 - 45 = -5, 5 px left of the image
    assert (skip.pair_id, skip.key, skip.reason) == (
        "0",
        "src_kps[1]",
        "keypoint outside its image: (-5, 8) in a 40 x 30 image",
    )
    assert skip.file.endswith("trn_pairs.csv row 0")


def test_real_data_loses_no_pair(shared_data):
    spair = _data(shared_data, "SPair-71k-mini")
    _, report = ds.build_pairs("spair", spair, "test")
    assert (report.listed, report.kept, report.disagreements) == (12, 12, [])
    willow = _data(shared_data, "pf-willow")
    _, report = ds.build_pairs("pfwillow", willow, "test")
    assert (report.listed, report.kept) == (900, 900)


# ---------------------------------------------------------------------------------------------------------
# The demo world writes .mat annotations that agree with its test CSV
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pfpascal(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    archives = make_demo_world(out / "archives", DemoWorldSpec())
    location = acquire_dataset(
        "pfpascal",
        {
            "url": str(archives["pfpascal_images_archive"]),
            "sha256": None,
            "pairs_url": str(archives["pfpascal_pairs_archive"]),
            "pairs_sha256": None,
            "local_path": None,
        },
        out / "data",
        out / "downloads",
    )
    return Path(location.root), Path(location.pair_lists["test"])


def test_demo_world_mat_files_agree_with_its_test_csv(demo_pfpascal):
    root, test_csv = demo_pfpascal
    df, report = ds.build_pairs("pfpascal", root, "test", pairs_csv=test_csv)
    assert report.disagreements == [] and report.kept == report.listed == len(df) == 4 * 3
    rows = ds.read_pfpascal_csv(test_csv)
    for rec, row in zip(ds.records(df), rows, strict=True):  # the .mat keypoints equal the inline copy
        np.testing.assert_allclose(rec.src_kps, row.src_kps, rtol=0, atol=1e-9)
        np.testing.assert_allclose(rec.trg_kps, row.trg_kps, rtol=0, atol=1e-9)


def test_a_mat_that_disagrees_with_the_csv_is_reported(demo_pfpascal, tmp_path):
    root, test_csv = demo_pfpascal
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    first = ds.read_pfpascal_csv(test_csv)[0]
    category = ds.PFPASCAL_CLASSES[first.class_id - 1]
    mat_path = ds.pfpascal_annotation_path(copy, first.source_image, category)
    mat = scipy.io.loadmat(mat_path)
    visible = np.flatnonzero(np.isfinite(mat["kps"][:, 0]))
    mat["kps"][visible[0]] += 3.0  # a 3 px shift in x and y: 4.24 px
    scipy.io.savemat(mat_path, {"kps": mat["kps"], "bbox": mat["bbox"]})
    df, report = ds.build_pairs("pfpascal", copy, "test", pairs_csv=test_csv)
    assert len(report.disagreements) >= 1 and report.disagreements[0].pair_id == "0"
    assert "differ by up to 4.24 px" in report.disagreements[0].detail
    assert report.kept == len(df) == 12  # reported, not skipped: the .mat values are used
    note_path = tmp_path / "pfpascal_test.report.json"
    write_pairs_report(report, note_path)
    assert "pairs' CSV keypoints disagree with the .mat files" in pairs_note([note_path])


def test_report_round_trip_errors(tmp_path):
    bad = tmp_path / "x.report.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"x\.report\.json is unreadable"):
        read_pairs_report(bad)
    bad.write_text("{}")
    with pytest.raises(ValueError, match=r"lacks \['dataset', 'split', 'pairs_listed', 'pairs_kept'\]"):
        read_pairs_report(bad)
    write_pairs_report(PairsReport("pfwillow", "test", "l.csv", listed=900), tmp_path / "w.report.json")
    assert pairs_note([tmp_path / "w.report.json"]) == "Pairs: PF-Willow test 900 of 900."
    assert pairs_note([]) == ""


def test_pairs_table_write_on_a_full_disk_names_the_file(shared_data, tmp_path, monkeypatch):
    willow = _data(shared_data, "pf-willow")
    table = ds.parse_pfwillow(willow, willow / "test_pairs.csv")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ds.pq, "write_table", full)
    target = tmp_path / "results" / "pairs" / "pfwillow_test.parquet"
    with pytest.raises(OSError, match=f"No space left on device while writing {target}"):
        ds.write_pairs_table(table, target)
    assert list(target.parent.iterdir()) == []
