"""Figures of the SD4Match paper's Sec. 4.4: Fig. 3a (CPM ablation), Fig. 3b (timesteps), qualitative matches
and the prompt visualisations of Fig. 4/5.

Every figure is self-explanatory: a title (with a "DEMO RUN" line for demo runs), axis labels with units, a
legend and a caption line stating the protocol. ``build_*`` functions return a matplotlib ``Figure`` (built
without pyplot, so nothing global is touched and tests can inspect it); ``save_figure`` writes PNG and PDF
atomically. Matches are drawn in the squashed ``S x S`` frame, where PCK is computed.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle
from PIL import Image

from sd4match.datasets import load_image
from sd4match.io import atomic_path
from sd4match.matching import bbox_to_squashed_frame, to_squashed_frame
from sd4match.metrics import pck_threshold
from sd4match.reporting import ALL_CATEGORY, load_paper_tables, summary_pck

DEMO_BANNER = "DEMO RUN — not comparable to the paper"
DPI = 150
FIG3_ALPHA = 0.1
TRAIN_TIMESTEP = 261
TEST_TIMESTEP = 50
OURS_COLOR = "#1f77b4"
PAPER_COLOR = "#bdbdbd"
CORRECT_COLOR = "#2ca02c"
WRONG_COLOR = "#d62728"
GT_COLOR = "#ffd700"
MATCH_GID = "match"
GT_GID = "gt"
FIG3A_COLUMNS = ("case", "setting", "ours", "paper", "delta", "matching", "pck")
FIG3B_COLUMNS = ("method", "matching", "timestep", "pck", "reported")
FIG3A_SIZE = (9.0, 5.5)
FIG3B_SIZE = (8.0, 5.0)
PANEL_INCHES = 3.0  # one image of a qualitative pair
GRID_CELL_INCHES = 2.0  # one image of a generation grid
LABEL_MARGIN_INCHES = 0.5
LEGEND_INCHES = 2.5  # legend column right of the qualitative grid
HEADER_INCHES = 1.0
PAIR_GAP_FRACTION = 1 / 32  # white gap between source and target, in units of the image width
OUTLINE = [patheffects.withStroke(linewidth=2.8, foreground="black")]  # lines stay visible on any image
MARKERS = ("o", "s", "^", "D", "v", "P")
PDF_METADATA = {"CreationDate": None}  # byte-identical PDFs on rerun
PNG_METADATA = {"Software": None}


def protocol_caption(matching: str, alpha: float = FIG3_ALPHA) -> str:
    """The PCK protocol line of the SPair-71k figures, e.g. "PCK@0.1 per image, SPair-71k test, nn"."""
    return f"Protocol: PCK@{alpha:g} per image, SPair-71k test, {matching} matching"


def new_figure(size: tuple[float, float]) -> Figure:
    """A pyplot-free figure on the Agg canvas (no global state), laid out with constrained layout."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_title(title: str, demo: bool) -> str:
    """The figure title, preceded by the demo banner line for demo runs."""
    return f"{DEMO_BANNER}\n{title}" if demo else title


def decorate(fig: Figure, title: str, caption: str, demo: bool) -> None:
    """Title on top (demo banner first for demo runs) and a caption line at the bottom."""
    fig.suptitle(figure_title(title, demo), fontsize=12, color="#b2182b" if demo else "black")
    if caption:
        fig.supxlabel(textwrap.fill(caption, 110), fontsize=8, style="italic")


def save_figure(
    fig: Figure, out_png: str | os.PathLike[str], out_pdf: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write ``fig`` as PNG (``DPI``) and PDF, each atomically; returns the two paths."""
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)
    with atomic_path(out_pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata=PDF_METADATA)
    return Path(out_png), Path(out_pdf)


# ----------------------------------------------------------------------------------------------------------
# Fig. 3a: CPM ablation
# ----------------------------------------------------------------------------------------------------------

# The Fig. 3a designs, resolved as CPMConfig resolves them (only pair + local patch tokens has g_n).
FIG3A_CASES: dict[int, dict[str, Any]] = {
    1: {"condition": "pair", "features": "local", "global_prompt": True, "use_gn": True},
    2: {"condition": "pair", "features": "global", "global_prompt": True, "use_gn": False},
    3: {"condition": "individual", "features": "local", "global_prompt": True, "use_gn": False},
    4: {"condition": "individual", "features": "global", "global_prompt": True, "use_gn": False},
    5: {"condition": "pair", "features": "local", "global_prompt": False, "use_gn": True},
    6: {"condition": "pair", "features": "local", "global_prompt": True, "use_gn": False},
}


def fig3a_case(cpm_options: dict[str, Any]) -> int | None:
    """Fig. 3a case (1-6) of a CPM design (condition, features, global_prompt, use_gn; missing keys take
    CPMConfig's defaults, use_gn the authors' rule); None if it is none of them."""
    from sd4match.prompt_learning import CPMConfig

    config = CPMConfig(**{key: cpm_options[key] for key in FIG3A_CASES[1] if key in cpm_options})
    design = {key: getattr(config, key) for key in FIG3A_CASES[1]}
    for case, options in FIG3A_CASES.items():
        if design == options:
            return case
    return None


def paper_fig3a() -> list[dict[str, Any]]:
    """The paper's Fig. 3a rows (case, setting, pck), in the paper's order."""
    return [
        {"case": int(row["case"]), "setting": str(row["setting"]), "pck": float(row["pck"])}
        for row in load_paper_tables()["fig3a"]["rows"]
    ]


def _case_number(key: int | str, settings: dict[str, int]) -> int:
    """A Fig. 3a case from its number (1-6) or the paper's setting text; anything else raises naming it."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and int(key) in settings.values():
        return int(key)
    if isinstance(key, str) and key in settings:
        return settings[key]
    raise ValueError(
        f"fig3a: unknown case {key!r}; use a case number 1-6 or one of the paper's settings {list(settings)}"
    )


def fig3a_table(summaries: dict[int | str, pd.DataFrame], matching: str) -> pd.DataFrame:
    """Fig. 3a as a table: our PCK@0.1 ("All", per image) per CPM case beside the paper's, and the delta.

    ``summaries`` maps a case (number 1-6 or the paper's setting text) to a summary frame; cases not run
    are NaN.
    """
    paper = paper_fig3a()
    settings = {row["setting"]: row["case"] for row in paper}
    if not summaries:
        raise ValueError("fig3a: no summaries given")
    ours: dict[int, float] = {}
    for key, summary in summaries.items():
        case = _case_number(key, settings)
        if case in ours:
            raise ValueError(f"fig3a: case {case} given twice (key {key!r})")
        ours[case] = summary_pck(summary, ALL_CATEGORY, matching, FIG3_ALPHA, where=f"fig3a case {key!r}")
    rows = []
    for row in paper:
        value = ours.get(row["case"], math.nan)
        rows.append(
            {
                "case": row["case"],
                "setting": row["setting"],
                "ours": value,
                "paper": row["pck"],
                "delta": value - row["pck"],
                "matching": matching,
                "pck": "per image",
            }
        )
    return pd.DataFrame(rows, columns=list(FIG3A_COLUMNS))


def _bar_labels(values: Sequence[float]) -> list[str]:
    """Bar annotations: one decimal, "not run" for a missing value."""
    return [f"{v:.1f}" if math.isfinite(v) else "not run" for v in values]


def build_fig3a(table: pd.DataFrame, demo: bool, matching: str) -> Figure:
    """Grouped bar chart of a ``fig3a_table``: ours and the paper's PCK@0.1 for the six CPM cases."""
    fig = new_figure(FIG3A_SIZE)
    ax = fig.add_subplot()
    x = np.arange(len(table))
    width = 0.38
    ours = table["ours"].to_numpy(dtype=float)
    paper = table["paper"].to_numpy(dtype=float)
    bars_ours = ax.bar(x - width / 2, np.nan_to_num(ours), width, color=OURS_COLOR, label="ours (this run)")
    bars_paper = ax.bar(x + width / 2, paper, width, color=PAPER_COLOR, label="paper (Fig. 3a)")
    ax.bar_label(bars_ours, labels=_bar_labels(ours), fontsize=7, padding=2)
    ax.bar_label(bars_paper, labels=_bar_labels(paper), fontsize=7, padding=2)
    ax.set_xticks(
        x, [f"{c}. {s}".replace("; ", ";\n") for c, s in zip(table["case"], table["setting"], strict=True)]
    )
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("CPM conditioned on (Fig. 3a case)")
    ax.set_ylabel(f"PCK@{FIG3_ALPHA:g} per image (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    decorate(
        fig, "Fig. 3a — SD4Match-CPM ablation: conditioning and components", protocol_caption(matching), demo
    )
    return fig


def fig3a_cpm_ablation(
    summaries: dict[int | str, pd.DataFrame],
    out_png: str | os.PathLike[str],
    out_pdf: str | os.PathLike[str],
    demo: bool,
    matching: str = "kernel_softmax",
) -> pd.DataFrame:
    """Fig. 3a: write the CPM-ablation bar chart (ours vs the paper) as PNG and PDF; returns its table."""
    table = fig3a_table(summaries, matching)
    save_figure(build_fig3a(table, demo, matching), out_png, out_pdf)
    return table


# ----------------------------------------------------------------------------------------------------------
# Fig. 3b: PCK vs timestep
# ----------------------------------------------------------------------------------------------------------


def timestep_rows(
    summaries: dict[tuple[str, int], pd.DataFrame],
    matchings: dict[str, Sequence[str]],
    alpha: float = FIG3_ALPHA,
) -> pd.DataFrame:
    """Fig. 3b rows (method, matching, timestep, pck, reported) from summaries keyed by (method label, t).

    ``matchings[method]`` lists the matchings to read for that method, the one its tables report first
    (``reported`` is True on its rows): SD4Match kernel-softmax, DIFT nearest neighbour as in Tables 1-3.
    """
    missing = sorted({method for method, _ in summaries} - set(matchings))
    if missing:
        raise ValueError(f"fig3b: no matching given for {missing}")
    rows = [
        {
            "method": method,
            "matching": matching,
            "timestep": int(t),
            "pck": summary_pck(
                summary, ALL_CATEGORY, matching, alpha, where=f"fig3b {method} t={t} ({matching})"
            ),
            "reported": i == 0,
        }
        for (method, t), summary in summaries.items()
        for i, matching in enumerate(dict.fromkeys(matchings[method]))
    ]
    return fig3b_table(pd.DataFrame(rows, columns=list(FIG3B_COLUMNS)))


def fig3b_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Validated Fig. 3b table sorted by method, reported matching first, and timestep: one finite PCK per
    (method, matching, timestep), one reported matching per method."""
    missing = [column for column in FIG3B_COLUMNS if column not in rows.columns]
    if missing:
        raise ValueError(f"fig3b: rows lack columns {missing} (expected {list(FIG3B_COLUMNS)})")
    if rows.empty:
        raise ValueError("fig3b: no rows")
    table = rows[list(FIG3B_COLUMNS)].copy()
    for column in ("method", "matching"):
        table[column] = table[column].astype(str)
    table["timestep"] = pd.to_numeric(table["timestep"], errors="raise").astype("int64")
    table["pck"] = pd.to_numeric(table["pck"], errors="raise").astype(float)
    if not table["reported"].map(lambda v: isinstance(v, (bool, np.bool_))).all():
        raise ValueError("fig3b: column 'reported' must hold booleans")
    table["reported"] = table["reported"].astype(bool)
    if not np.isfinite(table["pck"]).all():
        raise ValueError("fig3b: every pck must be a finite number")
    if ((table["timestep"] < 0) | (table["timestep"] > 999)).any():
        raise ValueError("fig3b: timesteps must lie in [0, 999]")
    dup = table.duplicated(subset=["method", "matching", "timestep"])
    if dup.any():
        first = table.loc[dup, ["method", "matching", "timestep"]].iloc[0].tolist()
        raise ValueError(f"fig3b: duplicated (method, matching, timestep) rows, first {first}")
    reported = table[table["reported"]].groupby("method")["matching"].nunique()
    several = sorted(reported[reported > 1].index)
    unreported = sorted(set(table["method"]) - set(reported.index))
    if several or unreported:
        raise ValueError(
            f"fig3b: each method needs exactly one reported matching; several for {several}, "
            f"none for {unreported}"
        )
    table["order"] = ~table["reported"]
    table = table.sort_values(["method", "order", "matching", "timestep"], kind="stable")
    return table.drop(columns="order").reset_index(drop=True)


def fig3b_caption(table: pd.DataFrame, alpha: float = FIG3_ALPHA) -> str:
    """The protocol line of Fig. 3b: PCK, test set, and which matching each line uses."""
    reported = table[table["reported"]].drop_duplicates("method")
    solid = "; ".join(f"{m}: {k}" for m, k in zip(reported["method"], reported["matching"], strict=True))
    text = f"Protocol: PCK@{alpha:g} per image, SPair-71k test. Solid: the matching each method's tables "
    text += f"report ({solid})"
    if not table["reported"].all():
        text += "; dashed: the other matching, for comparison"
    return text + "."


def build_fig3b(
    table: pd.DataFrame,
    demo: bool,
    train_timestep: int = TRAIN_TIMESTEP,
    test_timestep: int = TEST_TIMESTEP,
) -> Figure:
    """Line plot of PCK@0.1 vs timestep t per method and matching (solid: the matching the method's tables
    report; dashed, same colour: the other), with the training and test timesteps marked."""
    fig = new_figure(FIG3B_SIZE)
    ax = fig.add_subplot()
    colors: dict[str, int] = {}
    for (method, matching), group in table.groupby(["method", "matching"], sort=False):
        reported = bool(group["reported"].iloc[0])
        index = colors.setdefault(method, len(colors))
        ax.plot(
            group["timestep"],
            group["pck"],
            marker=MARKERS[index % len(MARKERS)],
            color=f"C{index}",
            linestyle="-" if reported else "--",
            alpha=1.0 if reported else 0.6,
            label=f"{method}, {matching}" + ("" if reported else " (not its tables' matching)"),
        )
    ax.axvline(
        train_timestep, color="#555555", linestyle="--", linewidth=1, label=f"training t = {train_timestep}"
    )
    ax.axvline(
        test_timestep, color="#555555", linestyle=":", linewidth=1.5, label=f"test t = {test_timestep}"
    )
    ax.set_xlabel("timestep t (DDPM steps of 1000; 0 = clean image)")
    ax.set_ylabel(f"PCK@{FIG3_ALPHA:g} per image (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    decorate(fig, "Fig. 3b — SPair-71k PCK at different timesteps t", fig3b_caption(table), demo)
    return fig


def fig3b_timesteps(
    rows: pd.DataFrame,
    out_png: str | os.PathLike[str],
    out_pdf: str | os.PathLike[str],
    demo: bool,
) -> pd.DataFrame:
    """Fig. 3b: write PCK@0.1 vs t (SD4Match vs the DIFT baseline) as PNG and PDF; returns its table."""
    table = fig3b_table(rows)
    save_figure(build_fig3b(table, demo), out_png, out_pdf)
    return table


# ----------------------------------------------------------------------------------------------------------
# Qualitative matches
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MatchPanel:
    """One pair to draw, everything in the squashed S x S frame: images, source keypoints, predicted and
    ground-truth target keypoints (K, 2) and the PCK threshold theta."""

    title: str
    src_image: Image.Image
    trg_image: Image.Image
    src_kps: np.ndarray
    pred_kps: np.ndarray
    gt_kps: np.ndarray
    threshold: float

    def __post_init__(self) -> None:
        self.src_kps, self.pred_kps, self.gt_kps = (
            _points(self.src_kps, f"{self.title}: src_kps"),
            _points(self.pred_kps, f"{self.title}: pred_kps"),
            _points(self.gt_kps, f"{self.title}: gt_kps"),
        )
        if not len(self.src_kps) == len(self.pred_kps) == len(self.gt_kps):
            raise ValueError(
                f"MatchPanel {self.title!r}: src_kps, pred_kps and gt_kps must have the same number of rows, "
                f"got {len(self.src_kps)}, {len(self.pred_kps)}, {len(self.gt_kps)}"
            )
        if self.src_image.size != self.trg_image.size:
            raise ValueError(
                f"MatchPanel {self.title!r}: source {self.src_image.size} and target {self.trg_image.size} "
                "must share the squashed frame size"
            )
        if not self.threshold > 0:
            raise ValueError(f"MatchPanel {self.title!r}: threshold must be > 0, got {self.threshold}")

    def correct(self, alpha: float) -> np.ndarray:
        """Per keypoint: predicted within ``alpha * threshold`` of the ground truth (inclusive, Eq. 8)."""
        return np.linalg.norm(self.pred_kps - self.gt_kps, axis=1) <= alpha * self.threshold


def _points(values: Any, name: str) -> np.ndarray:
    """``values`` as a float64 (K, 2) array, raising naming ``name`` otherwise."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name}: expected shape (K, 2), got {arr.shape}")
    return arr


def match_panel(
    row: Any, root: str | os.PathLike[str], pred_kps: Any, image_size: int, method: str = ""
) -> MatchPanel:
    """A MatchPanel of one pairs-table row: images loaded (flipped as fed) and squashed to S x S, keypoints
    and threshold mapped to that frame as in the evaluation; ``pred_kps`` are already in the S frame."""
    size = image_size
    src = load_image(root, row.src_image, bool(row.flip)).resize((size, size), Image.Resampling.BILINEAR)
    trg = load_image(root, row.trg_image, bool(row.flip)).resize((size, size), Image.Resampling.BILINEAR)
    src_kps = np.asarray(
        to_squashed_frame(np.asarray(row.src_kps, float), row.src_width, row.src_height, size)
    )
    gt = np.asarray(to_squashed_frame(np.asarray(row.trg_kps, float), row.trg_width, row.trg_height, size))
    bbox = None
    if row.trg_bbox is not None:
        bbox = bbox_to_squashed_frame(np.asarray(row.trg_bbox, float), row.trg_width, row.trg_height, size)
    threshold = pck_threshold(row.threshold_kind, trg_bbox=bbox, trg_kps=gt, image_size=size)
    pred = np.asarray(pred_kps.detach().cpu() if hasattr(pred_kps, "detach") else pred_kps, dtype=np.float64)
    label = f"{row.category} — {row.pair_id}" + (f" ({method})" if method else "")
    return MatchPanel(label, src, trg, src_kps, pred, gt, float(threshold))


def _side_by_side(panel: MatchPanel) -> tuple[np.ndarray, float]:
    """Source | white gap | target as one RGB array, and the x offset of the target image."""
    src = np.asarray(panel.src_image.convert("RGB"))
    trg = np.asarray(panel.trg_image.convert("RGB"))
    gap = max(1, round(src.shape[1] * PAIR_GAP_FRACTION))
    spacer = np.full((src.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([src, spacer, trg], axis=1), float(src.shape[1] + gap)


def _draw_panel(ax: Any, panel: MatchPanel, alpha: float) -> None:
    """Source keypoints -> predicted targets (green if correct, red if not) and ground-truth circles."""
    canvas, offset = _side_by_side(panel)
    ax.imshow(canvas)
    correct = panel.correct(alpha)
    radius = alpha * panel.threshold
    for (sx, sy), (px, py), (gx, gy), ok in zip(
        panel.src_kps, panel.pred_kps, panel.gt_kps, correct, strict=True
    ):
        color = CORRECT_COLOR if ok else WRONG_COLOR
        ax.plot(
            [sx, px + offset],
            [sy, py],
            color=color,
            linewidth=1.5,
            marker="o",
            markersize=3,
            gid=MATCH_GID,
            path_effects=OUTLINE,
        )
        circle = Circle((gx + offset, gy), radius, fill=False, edgecolor=GT_COLOR, linewidth=1.2, gid=GT_GID)
        circle.set_path_effects(OUTLINE)
        ax.add_patch(circle)
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)  # the image frame, whatever circles stick out of it
    ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    n_ok = int(correct.sum())
    ax.set_title(textwrap.fill(f"{panel.title}: {n_ok}/{len(correct)} correct", 70), fontsize=8)
    ax.set_xlabel("source  |  target", fontsize=8)


def _match_legend_handles(alpha: float) -> list[Line2D]:
    """Legend proxies of the qualitative figure."""
    return [
        Line2D(
            [],
            [],
            color=CORRECT_COLOR,
            marker="o",
            markersize=3,
            label=f"match correct (error ≤ {alpha:g}·θ)",
        ),
        Line2D(
            [], [], color=WRONG_COLOR, marker="o", markersize=3, label=f"match wrong (error > {alpha:g}·θ)"
        ),
        Line2D(
            [],
            [],
            color="none",
            marker="o",
            markersize=9,
            markerfacecolor="none",
            markeredgecolor=GT_COLOR,
            label=f"ground-truth target (circle radius {alpha:g}·θ)",
        ),
    ]


def build_qualitative_figure(
    panels: Sequence[MatchPanel],
    alpha: float,
    matching: str,
    image_size: int,
    demo: bool = False,
    ncols: int = 1,
) -> Figure:
    """Grid of pairs, source and target side by side in the squashed S x S frame, with match lines."""
    if not panels:
        raise ValueError("qualitative_matches: no pairs to draw")
    if ncols < 1:
        raise ValueError(f"qualitative_matches: ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    size = (ncols * 2 * PANEL_INCHES + LEGEND_INCHES, nrows * PANEL_INCHES + HEADER_INCHES)
    fig = new_figure(size)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(ax, panel, alpha)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    last = list(axes.flat)[len(panels) - 1]  # legend under the last panel, above the caption
    last.legend(
        handles=_match_legend_handles(alpha),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncols=3,
        fontsize=8,
    )
    caption = (
        f"Predicted targets ({matching} matching) in the squashed {image_size}×{image_size} frame "
        f"where PCK is computed; θ = the dataset's PCK threshold (SPair-71k: max side of the target box), "
        f"α = {alpha:g}"
    )
    decorate(fig, "Qualitative matches: source keypoints → predicted target keypoints", caption, demo)
    return fig


def qualitative_matches(
    panels: Sequence[MatchPanel],
    out_png: str | os.PathLike[str],
    out_pdf: str | os.PathLike[str],
    alpha_threshold: float = FIG3_ALPHA,
    matching: str = "kernel_softmax",
    image_size: int = 768,
    demo: bool = False,
    ncols: int = 1,
) -> tuple[Path, Path]:
    """Write the qualitative-matches grid (green: within alpha * theta of the ground truth; red: not)."""
    fig = build_qualitative_figure(panels, alpha_threshold, matching, image_size, demo, ncols)
    return save_figure(fig, out_png, out_pdf)


# ----------------------------------------------------------------------------------------------------------
# Fig. 4 / Fig. 5: images generated from learned prompts
# ----------------------------------------------------------------------------------------------------------


def build_generation_grid(
    rows: Sequence[tuple[str, Sequence[Image.Image]]],
    title: str,
    caption: str = "",
    column_titles: Sequence[str] | None = None,
    demo: bool = False,
) -> Figure:
    """One row per prompt: its title on the left, then its images (Fig. 4: generated; Fig. 5: source,
    target, generated); ``column_titles`` label the columns."""
    if not rows:
        raise ValueError("prompt_generation_grid: no rows")
    empty = [row_title for row_title, images in rows if not images]
    if empty:
        raise ValueError(f"prompt_generation_grid: rows without images: {empty}")
    ncols = max(len(images) for _, images in rows)
    if column_titles is not None and len(column_titles) != ncols:
        raise ValueError(f"prompt_generation_grid: {len(column_titles)} column titles for {ncols} columns")
    size = (ncols * GRID_CELL_INCHES + LABEL_MARGIN_INCHES, len(rows) * GRID_CELL_INCHES + HEADER_INCHES)
    fig = new_figure(size)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (row_title, images) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            if c >= len(images):
                ax.set_visible(False)
                continue
            ax.imshow(np.asarray(images[c].convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and column_titles is not None:
                ax.set_title(column_titles[c], fontsize=9)
        axes[r][0].set_ylabel(textwrap.fill(row_title, 22), fontsize=7)
    decorate(fig, title, caption, demo)
    return fig


def prompt_generation_grid(
    rows: Sequence[tuple[str, Sequence[Image.Image]]],
    out_png: str | os.PathLike[str],
    out_pdf: str | os.PathLike[str],
    title: str,
    caption: str = "",
    column_titles: Sequence[str] | None = None,
    demo: bool = False,
) -> tuple[Path, Path]:
    """Write a Fig. 4/5 grid of images generated by SD from learned prompts as PNG and PDF."""
    return save_figure(build_generation_grid(rows, title, caption, column_titles, demo), out_png, out_pdf)
