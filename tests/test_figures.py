"""Figures of Sec. 4.4: Fig. 3a/3b tables and charts, qualitative matches, prompt-generation grids."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_hex
from matplotlib.patches import Circle
from PIL import Image

from sd4match.figures import (
    CORRECT_COLOR,
    DEMO_BANNER,
    DPI,
    GT_GID,
    MATCH_GID,
    OURS_COLOR,
    PAPER_COLOR,
    WRONG_COLOR,
    MatchPanel,
    build_fig3a,
    build_fig3b,
    build_generation_grid,
    build_qualitative_figure,
    fig3a_case,
    fig3a_cpm_ablation,
    fig3a_table,
    fig3b_table,
    fig3b_timesteps,
    match_panel,
    prompt_generation_grid,
    qualitative_matches,
    save_figure,
    timestep_rows,
)
from sd4match.metrics import PairScore, per_pair_frame, summarise

PAPER_FIG3A = [75.5, 73.3, 70.8, 68.5, 74.6, 74.0]  # the paper's Fig. 3a, cases 1-6
PROTOCOL = "PCK@0.1 per image, SPair-71k test, kernel_softmax"


def summary(correct_of_4: list[int], nn_correct: int = 0) -> pd.DataFrame:
    """Summary of pairs with 4 keypoints each; kernel_softmax gets ``correct_of_4``, nn ``nn_correct``."""
    scores = [
        PairScore(f"p{i}", "cat", "kernel_softmax", 0.1, 4, n, 50.0) for i, n in enumerate(correct_of_4)
    ]
    scores += [PairScore(f"p{i}", "cat", "nn", 0.1, 4, nn_correct, 50.0) for i in range(len(correct_of_4))]
    return summarise(per_pair_frame(scores))


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


def assert_written(png: Path, pdf: Path, size_inches: tuple[float, float]) -> None:
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    assert png_size(png) == (round(size_inches[0] * DPI), round(size_inches[1] * DPI))
    assert pdf.read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in png.parent.iterdir()) == sorted({png.name, pdf.name})  # no temp files


# ---------------------------------------------------------------------------------------------------------
# Fig. 3a
# ---------------------------------------------------------------------------------------------------------

FIG3A_INPUT = {1: [3, 4], "Ind. Image; Local Feat.": [1, 2], 6: [2, 2]}  # per-image PCK 87.5, 37.5, 50.0
OURS = [87.5, math.nan, 37.5, math.nan, math.nan, 50.0]


def fig3a_summaries() -> dict:
    return {key: summary(values, nn_correct=4) for key, values in FIG3A_INPUT.items()}


def test_fig3a_table_holds_ours_and_the_papers_numbers():
    table = fig3a_table(fig3a_summaries(), "kernel_softmax")
    assert table["case"].tolist() == [1, 2, 3, 4, 5, 6]
    assert table["setting"].tolist()[:2] == ["Image Pair; Local Feat.", "Image Pair; Global Desc."]
    np.testing.assert_array_equal(table["ours"].to_numpy(), OURS)
    assert table["paper"].tolist() == PAPER_FIG3A
    np.testing.assert_allclose(table["delta"].to_numpy(), np.subtract(OURS, PAPER_FIG3A))
    assert set(table["pck"]) == {"per image"} and set(table["matching"]) == {"kernel_softmax"}
    nn_table = fig3a_table(fig3a_summaries(), "nn")  # nn scored 4/4 everywhere
    assert nn_table["ours"].tolist()[0] == 100.0


def test_fig3a_rejects_unknown_duplicated_or_unscored_cases():
    with pytest.raises(ValueError, match="unknown case 7"):
        fig3a_table({7: summary([1])}, "kernel_softmax")
    with pytest.raises(ValueError, match="case 1 given twice"):
        fig3a_table({1: summary([1]), "Image Pair; Local Feat.": summary([2])}, "kernel_softmax")
    with pytest.raises(ValueError, match="soft_argmax"):
        fig3a_table({1: summary([1])}, "soft_argmax")
    with pytest.raises(ValueError, match="no summaries"):
        fig3a_table({}, "kernel_softmax")


def test_fig3a_case_of_cpm_designs():
    assert fig3a_case({"condition": "pair", "features": "local", "global_prompt": True, "use_gn": True}) == 1
    assert fig3a_case({"kind": "cpm", "features": "global"}) == 2  # no g_n: the authors' module
    assert fig3a_case({"features": "global", "use_gn": False}) == 2
    assert fig3a_case({"condition": "individual"}) == 3
    assert fig3a_case({"condition": "individual", "features": "global"}) == 4
    assert fig3a_case({"global_prompt": False}) == 5
    assert fig3a_case({"use_gn": False}) == 6
    assert fig3a_case({"condition": "individual", "use_gn": True}) is None  # g_n the authors never had
    assert fig3a_case({"features": "global", "use_gn": True}) is None
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    variants = config["sd4match"]["variants"]
    assert {case: fig3a_case(variants[v]) for case, v in config["fig3a"]["cases"].items()} == {
        case: case for case in range(1, 7)
    }


def test_fig3a_figure_bars_labels_and_titles():
    table = fig3a_table(fig3a_summaries(), "kernel_softmax")
    fig = build_fig3a(table, demo=True, matching="kernel_softmax")
    ax = fig.axes[0]
    ours, paper = ax.containers
    assert [bar.get_height() for bar in ours] == [87.5, 0.0, 37.5, 0.0, 0.0, 50.0]
    assert [bar.get_height() for bar in paper] == PAPER_FIG3A
    assert {to_hex(bar.get_facecolor()) for bar in ours} == {OURS_COLOR}
    assert {to_hex(bar.get_facecolor()) for bar in paper} == {PAPER_COLOR}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours (this run)", "paper (Fig. 3a)"]
    assert ax.get_ylabel() == "PCK@0.1 per image (%)"
    assert "not run" in [t.get_text() for t in ax.texts]
    assert fig.get_suptitle().startswith(DEMO_BANNER)
    assert "Fig. 3a" in fig.get_suptitle()
    assert PROTOCOL in fig.get_supxlabel()
    assert DEMO_BANNER not in build_fig3a(table, demo=False, matching="kernel_softmax").get_suptitle()


def test_fig3a_writes_png_and_pdf(tmp_path):
    out = tmp_path / "fig3a"
    table = fig3a_cpm_ablation(fig3a_summaries(), out / "f.png", out / "f.pdf", demo=True)
    np.testing.assert_array_equal(table["ours"].to_numpy(), OURS)
    assert_written(out / "f.png", out / "f.pdf", (9.0, 5.5))


# ---------------------------------------------------------------------------------------------------------
# Fig. 3b
# ---------------------------------------------------------------------------------------------------------

FIG3B_ROWS = pd.DataFrame(
    {
        "method": ["DIFT", "SD4Match", "SD4Match", "DIFT", "SD4Match", "DIFT"],
        "matching": ["nn", "kernel_softmax", "kernel_softmax", "nn", "kernel_softmax", "kernel_softmax"],
        "timestep": [261, 261, 50, 50, 0, 261],
        "pck": [52.9, 72.0, 75.5, 50.0, 70.25, 49.5],
        "reported": [True, True, True, True, True, False],
    }
)
FIG3B_CAPTION = (
    "Protocol: PCK@0.1 per image, SPair-71k test. Solid: the matching each method's tables report "
    "(DIFT: nn; SD4Match: kernel_softmax); dashed: the other matching, for comparison."
)


def test_fig3b_table_holds_exactly_the_input_rows(tmp_path):
    table = fig3b_timesteps(FIG3B_ROWS, tmp_path / "b.png", tmp_path / "b.pdf", demo=False)
    assert table.to_dict("records") == [
        {"method": "DIFT", "matching": "nn", "timestep": 50, "pck": 50.0, "reported": True},
        {"method": "DIFT", "matching": "nn", "timestep": 261, "pck": 52.9, "reported": True},
        {"method": "DIFT", "matching": "kernel_softmax", "timestep": 261, "pck": 49.5, "reported": False},
        {"method": "SD4Match", "matching": "kernel_softmax", "timestep": 0, "pck": 70.25, "reported": True},
        {"method": "SD4Match", "matching": "kernel_softmax", "timestep": 50, "pck": 75.5, "reported": True},
        {"method": "SD4Match", "matching": "kernel_softmax", "timestep": 261, "pck": 72.0, "reported": True},
    ]
    assert_written(tmp_path / "b.png", tmp_path / "b.pdf", (8.0, 5.0))


def test_fig3b_figure_lines_labelled_by_matching_and_marked_timesteps():
    fig = build_fig3b(fig3b_table(FIG3B_ROWS), demo=True)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    ours, dift = lines["SD4Match, kernel_softmax"], lines["DIFT, nn"]
    other = lines["DIFT, kernel_softmax (not its tables' matching)"]
    assert ours.get_xdata().tolist() == [0, 50, 261] and ours.get_ydata().tolist() == [70.25, 75.5, 72.0]
    assert dift.get_ydata().tolist() == [50.0, 52.9] and other.get_ydata().tolist() == [49.5]
    assert (dift.get_linestyle(), other.get_linestyle(), ours.get_linestyle()) == ("-", "--", "-")
    assert dift.get_color() == other.get_color() != ours.get_color()
    assert ours.get_marker() != "None" and dift.get_marker() != "None"
    assert list(lines["training t = 261"].get_xdata()) == [261, 261]
    assert list(lines["test t = 50"].get_xdata()) == [50, 50]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "DIFT, nn",
        "DIFT, kernel_softmax (not its tables' matching)",
        "SD4Match, kernel_softmax",
        "training t = 261",
        "test t = 50",
    ]
    assert ax.get_xlabel().startswith("timestep t")
    assert ax.get_ylabel() == "PCK@0.1 per image (%)"
    assert fig.get_suptitle().startswith(DEMO_BANNER)
    assert " ".join(fig.get_supxlabel().split()) == FIG3B_CAPTION


def test_fig3b_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="lack columns"):
        fig3b_timesteps(FIG3B_ROWS.drop(columns="pck"), tmp_path / "b.png", tmp_path / "b.pdf", demo=False)
    duplicated = pd.concat([FIG3B_ROWS, FIG3B_ROWS.head(1)])
    with pytest.raises(ValueError, match=r"duplicated \(method, matching, timestep\)"):
        fig3b_timesteps(duplicated, tmp_path / "b.png", tmp_path / "b.pdf", demo=False)
    two_reported = FIG3B_ROWS.assign(reported=True)
    with pytest.raises(ValueError, match=r"one reported matching; several for \['DIFT'\]"):
        fig3b_timesteps(two_reported, tmp_path / "b.png", tmp_path / "b.pdf", demo=False)
    assert not (tmp_path / "b.png").exists()


def test_timestep_rows_score_each_method_as_its_tables_do():
    """DIFT by nearest neighbour (Tables 1-3), SD4Match by kernel-softmax; each also in the other one."""
    summaries = {("SD4Match", 50): summary([4, 2], nn_correct=1), ("DIFT", 50): summary([1, 1], nn_correct=3)}
    matchings = {"SD4Match": ["kernel_softmax", "nn"], "DIFT": ["nn", "kernel_softmax"]}
    rows = timestep_rows(summaries, matchings)
    assert rows.to_dict("records") == [
        {"method": "DIFT", "matching": "nn", "timestep": 50, "pck": 75.0, "reported": True},
        {"method": "DIFT", "matching": "kernel_softmax", "timestep": 50, "pck": 25.0, "reported": False},
        {"method": "SD4Match", "matching": "kernel_softmax", "timestep": 50, "pck": 75.0, "reported": True},
        {"method": "SD4Match", "matching": "nn", "timestep": 50, "pck": 25.0, "reported": False},
    ]
    same = timestep_rows(summaries, {"SD4Match": ["nn", "nn"], "DIFT": ["nn"]})  # one line each
    assert same["matching"].tolist() == ["nn", "nn"] and same["reported"].all()
    with pytest.raises(ValueError, match=r"no matching given for \['DIFT'\]"):
        timestep_rows(summaries, {"SD4Match": ["nn"]})


def test_make_fig3b_scores_dift_by_nearest_neighbour(tmp_path):
    from sd4match.paper_figures import TableFigureFiles, TimestepCurves, make_fig3b
    from sd4match.reporting import Provenance

    paths = {}
    for name, (ks, nn) in {"ours": ([4, 4], 2), "dift": ([0, 2], 4)}.items():
        paths[name] = tmp_path / f"{name}.csv"
        summary(ks, nn_correct=nn).to_csv(paths[name], index=False)
    prov = Provenance("abc", {}, "sd4match test", False, "protocol")
    out = tmp_path / "out"
    curves = TimestepCurves(
        {50: str(paths["ours"])},
        {261: str(paths["dift"])},
        ("SD4Match (cpm)", "dift (zero-shot)"),
        ("kernel_softmax", "nn"),
    )
    files = TableFigureFiles(*(str(out / f"b.{ext}") for ext in ("png", "pdf", "csv", "md", "html")))
    table = make_fig3b(curves, files, prov)
    reported = table[table["reported"]].set_index("method")
    assert reported.loc["dift (zero-shot)", ["matching", "pck"]].tolist() == ["nn", 100.0]
    assert reported.loc["SD4Match (cpm)", ["matching", "pck"]].tolist() == ["kernel_softmax", 100.0]
    assert pd.read_csv(out / "b.csv")["pck"].tolist() == table["pck"].tolist()
    assert "| dift (zero-shot) | nn | 261 |" in (out / "b.md").read_text()
    assert "Fig. 3b" in (out / "b.html").read_text() and not (out / "b.caption").exists()


# ---------------------------------------------------------------------------------------------------------
# Qualitative matches
# ---------------------------------------------------------------------------------------------------------


def solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def demo_panel(title: str = "cat — p0") -> MatchPanel:
    """theta = 100, alpha = 0.1: errors 0 and 10 (on the boundary) are correct, 11 is wrong."""
    return MatchPanel(
        title=title,
        src_image=solid((200, 200, 200)),
        trg_image=solid((100, 100, 100)),
        src_kps=[[10, 10], [20, 20], [30, 30]],
        pred_kps=[[10, 10], [36, 48], [50, 31]],
        gt_kps=[[10, 10], [30, 40], [50, 20]],
        threshold=100.0,
    )


def test_qualitative_lines_green_within_threshold_red_outside():
    fig = build_qualitative_figure([demo_panel()], alpha=0.1, matching="kernel_softmax", image_size=64)
    ax = fig.axes[0]
    matches = [line for line in ax.get_lines() if line.get_gid() == MATCH_GID]
    assert [to_hex(line.get_color()) for line in matches] == [CORRECT_COLOR, CORRECT_COLOR, WRONG_COLOR]
    offset = 64 + 2  # target image drawn right of the source after a 64/32 = 2 px gap
    assert [line.get_xdata().tolist() for line in matches] == [
        [10, 10 + offset],
        [20, 36 + offset],
        [30, 50 + offset],
    ]
    assert [line.get_ydata().tolist() for line in matches] == [[10, 10], [20, 48], [30, 31]]
    circles = [p for p in ax.patches if isinstance(p, Circle) and p.get_gid() == GT_GID]
    assert [c.center for c in circles] == [(10 + offset, 10), (30 + offset, 40), (50 + offset, 20)]
    assert {c.get_radius() for c in circles} == {10.0}
    assert {c.get_fill() for c in circles} == {False}
    assert ax.get_title() == "cat — p0: 2/3 correct"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "match correct (error ≤ 0.1·θ)",
        "match wrong (error > 0.1·θ)",
        "ground-truth target (circle radius 0.1·θ)",
    ]
    assert "squashed 64×64 frame" in fig.get_supxlabel()
    assert DEMO_BANNER not in fig.get_suptitle()


def test_qualitative_alpha_changes_the_verdict():
    fig = build_qualitative_figure([demo_panel()], alpha=0.05, matching="nn", image_size=64)
    matches = [line for line in fig.axes[0].get_lines() if line.get_gid() == MATCH_GID]
    assert [to_hex(line.get_color()) for line in matches] == [CORRECT_COLOR, WRONG_COLOR, WRONG_COLOR]


def test_qualitative_writes_png_and_pdf_grid(tmp_path):
    panels = [demo_panel(f"cat — p{i}") for i in range(3)]
    png, pdf = qualitative_matches(
        panels, tmp_path / "q.png", tmp_path / "q.pdf", 0.1, image_size=64, ncols=2, demo=True
    )
    assert (png, pdf) == (tmp_path / "q.png", tmp_path / "q.pdf")
    assert_written(png, pdf, (2 * 2 * 3.0 + 2.5, 2 * 3.0 + 1.0))
    fig = build_qualitative_figure(panels, 0.1, "kernel_softmax", 64, demo=True, ncols=2)
    assert [ax.get_visible() for ax in fig.axes] == [True, True, True, False]
    assert fig.get_suptitle().startswith(DEMO_BANNER)


def test_match_panel_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="same number of rows"):
        MatchPanel("x", solid((0, 0, 0)), solid((0, 0, 0)), [[1, 1]], [[1, 1], [2, 2]], [[1, 1]], 10.0)
    with pytest.raises(ValueError, match="share the squashed frame size"):
        MatchPanel("x", solid((0, 0, 0)), solid((0, 0, 0), (32, 64)), [[1, 1]], [[1, 1]], [[1, 1]], 10.0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        MatchPanel("x", solid((0, 0, 0)), solid((0, 0, 0)), [[1, 1]], [[1, 1]], [[1, 1]], 0.0)
    with pytest.raises(ValueError, match="no pairs"):
        build_qualitative_figure([], 0.1, "nn", 64)


def test_match_panel_from_a_pairs_row_in_the_squashed_frame(tmp_path):
    left_red = np.zeros((64, 128, 3), dtype=np.uint8)
    left_red[:, :64] = (255, 0, 0)  # W=128 x H=64, red left half, blue right half
    left_red[:, 64:] = (0, 0, 255)
    Image.fromarray(left_red).save(tmp_path / "src.png")
    solid((0, 255, 0), (64, 128)).save(tmp_path / "trg.png")  # W=64 x H=128
    row = SimpleNamespace(
        pair_id="7",
        category="cat",
        src_image="src.png",
        trg_image="trg.png",
        src_width=128,
        src_height=64,
        trg_width=64,
        trg_height=128,
        src_kps=[[64.0, 32.0], [0.0, 0.0]],
        trg_kps=[[32.0, 64.0], [64.0, 128.0]],
        trg_bbox=[0.0, 0.0, 64.0, 128.0],
        flip=True,
        threshold_kind="bbox",
    )
    panel = match_panel(row, tmp_path, np.array([[32.0, 32.0], [0.0, 0.0]]), image_size=64, method="nn")
    assert panel.title == "cat — 7 (nn)"
    assert panel.src_image.size == panel.trg_image.size == (64, 64)
    assert panel.src_image.getpixel((5, 32)) == (0, 0, 255)  # flipped as fed: blue half now on the left
    np.testing.assert_array_equal(panel.src_kps, [[32.0, 32.0], [0.0, 0.0]])
    np.testing.assert_array_equal(panel.gt_kps, [[32.0, 32.0], [63.0, 63.0]])  # clamped to S - 1
    assert panel.threshold == 64.0  # squashed box 64 x 64
    assert panel.correct(0.1).tolist() == [True, False]


# ---------------------------------------------------------------------------------------------------------
# Fig. 4 / 5 grids and saving
# ---------------------------------------------------------------------------------------------------------


def grid_rows() -> list:
    return [
        ("aeroplane", [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))]),
        ("bus", [solid((0, 0, 0), (96, 64)), solid((255, 255, 255))]),
    ]


def test_generation_grid_layout_and_titles():
    fig = build_generation_grid(
        grid_rows(),
        "Fig. 4 — Class prompts",
        "DDIM, 2 steps",
        ["generated 1", "generated 2", "generated 3"],
        True,
    )
    assert len(fig.axes) == 6
    assert [ax.get_visible() for ax in fig.axes] == [True, True, True, True, True, False]
    assert fig.axes[0].get_ylabel() == "aeroplane" and fig.axes[3].get_ylabel() == "bus"
    assert [ax.get_title() for ax in fig.axes[:3]] == ["generated 1", "generated 2", "generated 3"]
    first = fig.axes[0].get_images()[0].get_array()
    assert tuple(first[0, 0]) == (255, 0, 0)
    assert fig.get_suptitle() == f"{DEMO_BANNER}\nFig. 4 — Class prompts"
    assert fig.get_supxlabel() == "DDIM, 2 steps"


def test_generation_grid_writes_png_and_pdf(tmp_path):
    png, pdf = prompt_generation_grid(grid_rows(), tmp_path / "g.png", tmp_path / "g.pdf", "Fig. 5")
    assert_written(png, pdf, (3 * 2.0 + 0.5, 2 * 2.0 + 1.0))


def test_generation_grid_rejects_bad_rows():
    with pytest.raises(ValueError, match="no rows"):
        build_generation_grid([], "t")
    with pytest.raises(ValueError, match=r"rows without images: \['bus'\]"):
        build_generation_grid([("bus", [])], "t")
    with pytest.raises(ValueError, match="2 column titles for 3 columns"):
        build_generation_grid(grid_rows(), "t", column_titles=["a", "b"])


def test_save_figure_is_reproducible(tmp_path):
    table = fig3a_table(fig3a_summaries(), "kernel_softmax")
    first = save_figure(build_fig3a(table, True, "kernel_softmax"), tmp_path / "a.png", tmp_path / "a.pdf")
    second = save_figure(build_fig3a(table, True, "kernel_softmax"), tmp_path / "b.png", tmp_path / "b.pdf")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
