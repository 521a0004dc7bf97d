"""The matching benchmark row (issue 9): before/after measured in one run on identical inputs; speed is
recorded in BENCHMARKS.md, never asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sd4match import bench_matching


def test_synthetic_pairs_follow_the_pairs_table_contract():
    pairs = bench_matching.synthetic_pairs(n_images=6, n_pairs=9, image_size=64, kps_range=(2, 5), seed=1)
    assert len(pairs) == 9 and pairs["n_kps"].between(2, 5).all()
    assert (pairs["n_kps"] == pairs["src_kps"].map(len)).all()
    assert (pairs["src_image"] != pairs["trg_image"]).all()
    # same-category pairs: image j belongs to category c{j % 2}
    for row in pairs.itertuples():
        for image in (row.src_image, row.trg_image):
            category, number = image.split("/")
            assert category == row.category and int(number.split(".")[0]) % 2 == int(category[1])
    kps = np.concatenate([np.asarray(k) for k in pairs["trg_kps"]])
    assert kps.min() >= 0 and kps.max() <= 63


def test_bench_matching_row_has_both_paths_and_equal_tables(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    assert (
        bench_matching.main(
            [
                "--grid",
                "6",
                "--channels",
                "16",
                "--images",
                "6",
                "--pairs",
                "12",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())
    assert row["name"] == "matching" and row["device"] == "cpu"
    assert row["settings"]["image_size"] == 96 and row["settings"]["pairs"] == 12
    assert row["metrics"]["tables_equal"] == 1.0
    metrics = row["metrics"]
    assert metrics["speedup"] == pytest.approx(metrics["after_pairs_per_s"] / metrics["before_pairs_per_s"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
