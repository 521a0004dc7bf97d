"""A keypoint dataset of the user's own (folder + pairs.csv / pairs.json) as a benchmark: parsed as strictly
as the official ones, configured and validated, linked by the fetch rule, and its table."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sd4match.annotation_checks import PairsReport, pairs_note
from sd4match.config import ConfigError, load_config, validate_config
from sd4match.custom_dataset import CustomDatasetSpec, custom_zero_shot, parse_custom, parse_points_text
from sd4match.data_sources import acquire_dataset, read_location, write_location
from sd4match.datasets import build_pairs, read_pairs_table, validate_pairs_table, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, demo_custom_images, make_custom_dataset
from sd4match.evaluation import MatchingSettings, score_predictions
from sd4match.reporting import CustomEntry, custom_entries_from_files, custom_table, custom_title

REPO = Path(__file__).resolve().parents[1]
HEADER = "pair_id,category,source,target,source_kps,target_kps,source_bbox,target_bbox"


def write_folder(root: Path, rows: list[str], header: str = HEADER, name: str = "pairs.csv") -> Path:
    """Two images (40 x 30 PNG, 50 x 20 JPEG) in sub-folders and a pairs file."""
    (root / "imgs/a").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "imgs/a/one.png")
    Image.new("RGB", (50, 20), (10, 200, 10)).save(root / "imgs/a/two.jpg")
    (root / name).write_text("\n".join([header, *rows]) + "\n")
    return root


GOOD_ROW = (
    'p0,bird,imgs/a/one.png,imgs/a/two.jpg,"1,2;nan,nan;39.5,29","3,4;5,6;49,19","0,0,40,30","2,1,48,19"'
)


def parse(root: Path, threshold: str = "bbox", name: str = "pairs.csv") -> tuple[pd.DataFrame, PairsReport]:
    report = PairsReport("mine", "test", "")
    return parse_custom(root, CustomDatasetSpec("mine", threshold, name), report=report), report


# ------------------------------------------------------------------------------------------------- parsing


def test_csv_pairs_become_the_normalised_table(tmp_path: Path):
    root = write_folder(
        tmp_path, [GOOD_ROW, 'p1,,imgs\\a\\two.jpg,imgs/a/one.png,"10,5","20,10",,'], name="pairs.csv"
    )
    table, report = parse(root, "img")
    assert table.to_dict("records") == [
        {
            "pair_id": "p0", "dataset": "mine", "split": "test", "category": "bird",
            "src_image": "imgs/a/one.png", "trg_image": "imgs/a/two.jpg",
            "src_width": 40, "src_height": 30, "trg_width": 50, "trg_height": 20,
            "src_kps": [[1.0, 2.0], [39.5, 29.0]], "trg_kps": [[3.0, 4.0], [49.0, 19.0]],  # nan: not visible
            "src_bbox": [0.0, 0.0, 40.0, 30.0], "trg_bbox": [2.0, 1.0, 48.0, 19.0],
            "flip": False, "n_kps": 2, "threshold_kind": "img",
        },
        {
            "pair_id": "p1", "dataset": "mine", "split": "test", "category": "object",  # the default
            "src_image": "imgs/a/two.jpg", "trg_image": "imgs/a/one.png",  # either separator
            "src_width": 50, "src_height": 20, "trg_width": 40, "trg_height": 30,
            "src_kps": [[10.0, 5.0]], "trg_kps": [[20.0, 10.0]],
            "src_bbox": None, "trg_bbox": None, "flip": False, "n_kps": 1, "threshold_kind": "img",
        },
    ]  # fmt: skip
    assert (report.listed, report.kept) == (2, 2)
    write_pairs_table(table, tmp_path / "t.parquet")  # the contract holds for a custom dataset
    pd.testing.assert_frame_equal(read_pairs_table(tmp_path / "t.parquet"), table)


def test_json_pairs_give_the_same_table(tmp_path: Path):
    csv_root = write_folder(tmp_path / "csv", [GOOD_ROW])
    pair = {
        "pair_id": "p0", "category": "bird", "source": "imgs/a/one.png", "target": "imgs/a/two.jpg",
        "source_kps": [[1, 2], None, [39.5, 29]], "target_kps": [[3, 4], [5, 6], [49, 19]],
        "source_bbox": [0, 0, 40, 30], "target_bbox": [2, 1, 48, 19],
    }  # fmt: skip
    json_root = write_folder(tmp_path / "json", [], header=json.dumps({"pairs": [pair]}), name="pairs.json")
    pd.testing.assert_frame_equal(parse(json_root, name="pairs.json")[0], parse(csv_root)[0])
    row_ids = write_folder(
        tmp_path / "ids", [], header=json.dumps([{**pair, "pair_id": None}]), name="p.json"
    )
    assert parse(row_ids, name="p.json")[0].pair_id.tolist() == ["0"]  # the row number


BAD = [
    ("source,target,source_kps", [], r"pairs.csv: header: unknown keys \[\], missing keys \['target_kps'\]"),
    (HEADER + ",src_kps", [GOOD_ROW + ",x"], r"pairs.csv: header: unknown keys \['src_kps'\]"),
    (HEADER, [GOOD_ROW.replace('"3,4;', '"3,four;')], "row 0: key 'target_kps': point 0: not a number"),
    (HEADER, [GOOD_ROW.replace(';49,19"', '"')], "row 0: key 'target_kps': 2 points, but source_kps has 3"),
    (HEADER, [GOOD_ROW.replace("two.jpg", "three.jpg")], "row 0: key 'target': image not found: .*three"),
    (HEADER, [GOOD_ROW.replace("imgs/a/one.png", "/etc/one.png")], "row 0: key 'source': '/etc/one.png'"),
    (HEADER, [GOOD_ROW.replace("imgs/a/one.png", "../one.png")], "row 0: key 'source': '../one.png' must be"),
    (HEADER, [GOOD_ROW.replace('"2,1,48,19"', "")], "row 0: key 'target_bbox': missing; dataset 'mine' has"),
    (HEADER, [GOOD_ROW.replace('"2,1,48,19"', '"2,1,48"')], "row 0: key 'target_bbox': must be x1,y1,x2,y2"),
    (HEADER, [GOOD_ROW, GOOD_ROW], "row 1: key 'pair_id': 'p0' repeats .*pairs.csv row 0"),
    (HEADER, [GOOD_ROW.replace(",bird,", ",All,")], "row 0: key 'category': 'All' is reserved"),
    (HEADER, [GOOD_ROW.replace('"1,2;', '"1,inf;')], "row 0: key 'source_kps': point 0 .* is infinite"),
    (HEADER, [GOOD_ROW + ",extra"], "pairs.csv: row 0 has 9 cells, the header 8"),
]  # fmt: skip


@pytest.mark.parametrize(("header", "rows", "message"), BAD, ids=[m.split(": ")[-1][:40] for _, _, m in BAD])
def test_bad_files_name_file_row_and_key(tmp_path: Path, header: str, rows: list[str], message: str):
    root = write_folder(tmp_path, rows, header=header)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse(root)


def test_unscorable_pairs_are_skipped_and_counted(tmp_path: Path):
    rows = [
        GOOD_ROW,
        GOOD_ROW.replace("p0,", "out,").replace('"3,4;', '"51.5,4;'),  # 1.5 px right of a 50 px image
        GOOD_ROW.replace("p0,", "flat,").replace('"2,1,48,19"', '"2,1,2,19"'),  # zero-area target bbox
        GOOD_ROW.replace("p0,", "none,").replace('"1,2;nan,nan;39.5,29"', '"nan,nan;nan,nan;nan,nan"'),
    ]
    table, report = parse(write_folder(tmp_path, rows))
    assert table.pair_id.tolist() == ["p0"]
    assert (report.listed, report.kept) == (4, 1)
    assert report.to_dict()["skip_reasons"] == {
        "keypoint outside its image": 1,
        "zero-area target bbox": 1,
        "no keypoint visible in both images": 1,
    }
    assert pairs_note([_written(report, tmp_path)]) == (
        "Pairs: mine test 1 of 4 (3 skipped: 1 keypoint outside its image, 1 no keypoint visible in both "
        "images, 1 zero-area target bbox)."
    )
    one_point = [
        GOOD_ROW.replace('"1,2;nan,nan;39.5,29"', '"1,2;nan,nan;nan,nan"'),
        GOOD_ROW.replace("p0", "p1"),
    ]
    table, report = parse(write_folder(tmp_path / "kps", one_point), "kps")
    assert table.pair_id.tolist() == ["p1"] and report.skipped[0].reason.startswith(
        "zero target keypoint extent"
    )


def _written(report: PairsReport, tmp_path: Path) -> Path:
    from sd4match.annotation_checks import write_pairs_report

    write_pairs_report(report, tmp_path / "r.json")
    return tmp_path / "r.json"


def test_points_text_syntax():
    assert parse_points_text("1,2; 3.5,4 ;", "x") == [[1.0, 2.0], [3.5, 4.0]]
    assert math.isnan(parse_points_text("nan,nan", "x", allow_missing=True)[0][0])
    with pytest.raises(ValueError, match=r"x: point 0 \(nan, nan\) is not a point"):
        parse_points_text("nan,nan", "x")
    with pytest.raises(ValueError, match=r"x: point 0 \(1.0, nan\) is not a point"):
        parse_points_text("1,nan", "x", allow_missing=True)


def test_custom_rows_pass_the_table_contract_only_with_a_threshold_kind(tmp_path: Path):
    table, _ = parse(write_folder(tmp_path, [GOOD_ROW]))
    validate_pairs_table(table, "t")
    with pytest.raises(ValueError, match=r"t: pair 'p0': threshold_kind 'box' not in"):
        validate_pairs_table(table.assign(threshold_kind="box"), "t")
    with pytest.raises(ValueError, match=r"t: pair 'p0': unknown dataset/split 'My-Set'"):
        validate_pairs_table(table.assign(dataset="My-Set"), "t")


def test_pck_on_a_custom_dataset_uses_its_threshold(tmp_path: Path):
    """Threshold kps: max extent of the squashed target keypoints; one prediction 5 px off in S = 100."""
    row = 'p0,c,imgs/a/two.jpg,imgs/a/two.jpg,"0,0;25,10","0,0;25,10",,'  # 50 x 20 -> x*2, y*5
    table, _ = parse(write_folder(tmp_path, [row]), "kps")
    pair = next(table.itertuples())
    settings = MatchingSettings(image_size=100, methods=("nn",), alphas=(0.1, 0.05))
    import torch

    predictions = {"nn": torch.tensor([[0.0, 0.0], [50.0, 45.0]])}  # target (50, 50): 5 px off, theta 50
    scores = score_predictions(pair, predictions, settings)
    assert [(s.alpha, s.n_correct, s.threshold) for s in scores] == [(0.1, 2, 50.0), (0.05, 1, 50.0)]


# --------------------------------------------------------------------------------------- fetch and build


def test_fetch_links_the_folder_and_build_pairs_reads_it(tmp_path: Path):
    root = write_folder(tmp_path / "mine", [GOOD_ROW])
    cfg = {"kind": "custom", "local_path": str(root), "threshold": "bbox"}
    location = acquire_dataset("mine", cfg, tmp_path / "data", tmp_path / "downloads")
    write_location(location, tmp_path / "fetch.json")
    location = read_location(tmp_path / "fetch.json")
    assert Path(location.root).resolve() == root.resolve() and Path(location.root).is_symlink()
    assert location.pair_lists == {"test": str(tmp_path / "data/local/pairs.csv")}
    table, report = build_pairs("mine", location.root, "test", location.pair_lists["test"],
                                custom=CustomDatasetSpec("mine", "bbox"))  # fmt: skip
    assert table.pair_id.tolist() == ["p0"] and report.source.endswith("pairs.csv")
    with pytest.raises(ValueError, match="custom dataset 'mine' has only a 'test' split"):
        build_pairs("mine", location.root, "trn", custom=CustomDatasetSpec("mine", "bbox"))
    with pytest.raises(FileNotFoundError, match="lacks the expected entry 'pairs.json'"):
        acquire_dataset("mine", cfg | {"pairs": "pairs.json"}, tmp_path / "data2", tmp_path / "downloads")


def test_demo_world_writes_a_custom_dataset(tmp_path: Path):
    spec = DemoWorldSpec()
    make_custom_dataset(tmp_path, spec)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "images").rglob("*.*")) == sorted(
        demo_custom_images({"demo_world": {}})
    )
    report = PairsReport("shapes", "test", "")
    table = parse_custom(tmp_path, CustomDatasetSpec("shapes", "bbox"), report=report)
    assert set(table.category) == {"cat", "car"} and len(table) == 12 and report.kept == 12
    csv = pd.read_csv(tmp_path / "pairs.csv")
    first = csv.iloc[0]
    visible = [
        i
        for i, (a, b) in enumerate(zip(first.source_kps.split(";"), first.target_kps.split(";"), strict=True))
        if "nan" not in a + b
    ]
    assert table.n_kps.iloc[0] == len(visible)
    again = tmp_path / "again"
    make_custom_dataset(again, spec)
    assert (again / "pairs.csv").read_bytes() == (tmp_path / "pairs.csv").read_bytes()  # deterministic


# ---------------------------------------------------------------------------------------------- config


@pytest.fixture(scope="module")
def paper_config() -> dict:
    return load_config(REPO / "config.yaml")


def with_dataset(config: dict, name: str, entry: dict) -> dict:
    data = copy.deepcopy(config)
    data["datasets"][name] = entry
    return data


def test_config_accepts_a_custom_dataset_and_names_bad_keys(paper_config: dict):
    entry = {"kind": "custom", "local_path": "data/mine", "threshold": "kps", "pairs": "pairs.json"}
    checked = validate_config(with_dataset(paper_config, "my_set2", entry))
    assert custom_zero_shot(checked["datasets"]["my_set2"]) == ["dino", "dinov2", "dift", "sddino_squashed"]
    bad = [
        ("My-Set", entry, "key 'datasets': 'My-Set' does not match any of the regexes"),
        ("mine", entry | {"threshold": "box"}, "key 'datasets.mine.threshold': 'box' is not one of"),
        ("mine", entry | {"pairs": "sub/p.csv"}, "key 'datasets.mine.pairs': 'sub/p.csv' does not match"),
        ("mine", entry | {"zero_shot": ["dift", "dfit"]}, "key 'datasets.mine.zero_shot' zero-shot method"),
        ("mine", entry | {"zero_shot": ["sddino"]}, "key 'datasets.mine.zero_shot' 'sddino' is scored by its "
         "authors' 'padded' protocol, defined for the official datasets"),
        ("spair", entry, "key 'datasets.spair': Additional properties are not allowed"),
    ]  # fmt: skip
    for name, value, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_config(with_dataset(paper_config, name, value))
    assert validate_config(with_dataset(paper_config, "mine", entry | {"zero_shot": ["dift_t100"]}))


# ------------------------------------------------------------------------------------------------ table


def _summary(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(
        rows, columns=["category", "method", "alpha", "n_pairs", "n_kps", "pck_per_image", "pck_per_keypoint"]
    )


def test_custom_table_lists_every_method(tmp_path: Path):
    rows = []
    for method in ("nn", "kernel_softmax"):
        for alpha, img, kp in ((0.05, 10.0, 12.0), (0.1, 20.0, 24.0), (0.15, 30.0, 36.0)):
            bonus = 5.0 if method == "kernel_softmax" else 0.0
            rows += [("All", method, alpha, 4, 20, img + bonus, kp + bonus)]
            rows += [
                ("car", method, alpha, 2, 10, img + 1 + bonus, kp),
                ("cat", method, alpha, 2, 10, img - 1, kp),
            ]
    summary = _summary(rows)
    entries = [
        CustomEntry("DIFT", None, None, "nn", summary),
        CustomEntry("SD4Match-CPM", "spair", 0, "kernel_softmax", summary),
    ]
    table = custom_table(entries, (0.05, 0.1, 0.15), "mine")
    assert table.to_dict("records") == [
        {"method": "DIFT", "matching": "nn", "source": "ours", "pck": "per image",
         "protocol": "squashed frame", "trained_on": "-", "seed": "-",
         "PCK@0.05 per image": 10.0, "PCK@0.1 per image": 20.0, "PCK@0.15 per image": 30.0,
         "PCK@0.05 per keypoint": 12.0, "PCK@0.1 per keypoint": 24.0, "PCK@0.15 per keypoint": 36.0,
         "car@0.1": 21.0, "cat@0.1": 19.0},
        {"method": "SD4Match-CPM", "matching": "kernel_softmax", "source": "ours", "pck": "per image",
         "protocol": "squashed frame",
         "trained_on": "SPair-71k", "seed": "0", "PCK@0.05 per image": 15.0, "PCK@0.1 per image": 25.0,
         "PCK@0.15 per image": 35.0, "PCK@0.05 per keypoint": 17.0, "PCK@0.1 per keypoint": 29.0,
         "PCK@0.15 per keypoint": 41.0, "car@0.1": 26.0, "cat@0.1": 19.0},
    ]  # fmt: skip
    assert custom_title("mine", "kps", "Pairs: mine test 4 of 5 (1 skipped: 1 x).") == (
        "Custom dataset mine: PCK, θ = max extent of the target keypoints; mine test 4 of 5 (1 skipped: 1 x)"
    )
    single = _summary([r for r in rows if r[0] == "All"])
    assert "car@0.1" not in custom_table([CustomEntry("DIFT", None, None, "nn", single)], (0.1,), "m").columns
    with pytest.raises(ValueError, match="summary mine / DIFT: expected exactly one row .* alpha=0.2"):
        custom_table(entries[:1], (0.2,), "mine")
    assert np.isclose(table["PCK@0.1 per image"].iloc[1], 25.0)


def test_custom_entries_label_zero_shot_rows_by_method_and_tuned_rows_by_variant(tmp_path: Path):
    """Config names become the tables' labels: dift and sddino_squashed (the squashed-frame peers a custom
    dataset takes) read DIFT and SD+DINO; a tuned prompt its variant's label, training set and seed."""
    path = tmp_path / "summary.csv"
    _summary([("All", "nn", 0.1, 4, 20, 20.0, 24.0)]).to_csv(path, index=False)
    entries = custom_entries_from_files(
        {"dift": str(path), "sddino_squashed": str(path), "dino": str(path)},
        {"spair/cpm/1": str(path)},
        {"cpm": {"kind": "cpm"}},
        "kernel_softmax",
        "nn",
    )
    assert [(e.method, e.trained_on, e.seed, e.matching) for e in entries] == [
        ("DIFT", None, None, "nn"), ("SD+DINO", None, None, "nn"), ("DINO", None, None, "nn"),
        ("SD4Match-CPM", "spair", 1, "kernel_softmax"),
    ]  # fmt: skip


def _evaluation(folder: Path, method: str, correct: dict[str, list[int]], alphas=(0.05, 0.1)) -> str:
    """A per-pair CSV (one keypoint per pair, ``correct[category]`` per pair, every alpha) and its summary."""
    from sd4match.metrics import PER_PAIR_COLUMNS, summarise

    rows = [
        {"pair_id": f"{cat}{i}", "category": cat, "method": method, "alpha": a, "n_kps": 1,
         "n_correct": c, "threshold": 10.0, "pck": 100.0 * c}
        for cat, values in correct.items() for i, c in enumerate(values) for a in alphas
    ]  # fmt: skip
    per_pair = pd.DataFrame(rows, columns=list(PER_PAIR_COLUMNS))
    folder.mkdir(parents=True)
    per_pair.to_csv(folder / "per_pair.csv", index=False)
    summarise(per_pair).to_csv(folder / "summary.csv", index=False)
    return str(folder / "summary.csv")


def test_custom_table_prints_each_pck_with_its_bootstrap_interval(tmp_path: Path):
    """Issue 12 on custom datasets: intervals from the per-pair CSVs. Closed form: all-correct pairs give
    [100, 100]; with pairs resampled within each category, two always-right car pairs and two always-wrong cat
    pairs give All = 50 in every resample, so [50, 50] per image and per keypoint."""
    from sd4match.table_writing import markdown_table
    from sd4match.uncertainty import BootstrapSettings

    dino = _evaluation(tmp_path / "dino", "nn", {"car": [1, 1], "cat": [1, 1]})
    cpm = _evaluation(tmp_path / "cpm", "kernel_softmax", {"car": [1, 1], "cat": [0, 0]})
    entries = custom_entries_from_files(
        {"dino": dino}, {"spair/cpm/0": cpm}, {"cpm": {"kind": "cpm"}}, "kernel_softmax", "nn",
        intervals=BootstrapSettings(), alphas=[0.05],
    )  # fmt: skip
    table = custom_table(entries, (0.05,), "mine")
    cells = ["PCK@0.05 per image", "PCK@0.05 per keypoint", "car@0.1", "cat@0.1"]
    assert list(table.columns[7:]) == [f"{c}{s}" for c in cells for s in ("", "_lo", "_hi")]
    assert table.iloc[0, 7:].tolist() == [100.0] * 12
    assert table.iloc[1, 7:].tolist() == [50.0] * 6 + [100.0] * 3 + [0.0] * 3
    assert (
        "| 50.0 [50.0, 50.0] | 50.0 [50.0, 50.0] | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] |"
        in markdown_table(table)
    )
    plain = custom_entries_from_files({"dino": dino}, {}, {}, "kernel_softmax", "nn")
    assert not any(c.endswith("_lo") for c in custom_table(plain, (0.05,), "mine").columns)
