"""The uncertainty the tables print beyond their cells' intervals: paired comparisons (a companion table
beside Table 2, each Fig. 3a case against case 1), the Fig. 3a/3b intervals and seed spreads, and the lines
under every table (pairs evaluated, how the intervals were computed).

All from the per-pair CSVs the evaluations write beside their summaries (``table_cells.per_pair_path``); no
GPU work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sd4match.annotation_checks import pairs_note
from sd4match.reporting import (
    ALL_CATEGORY,
    LABEL_COLUMNS,
    PAPER_ROW_OF_KIND,
    PCK_VARIANT,
    ZERO_SHOT_LABELS,
    TableSources,
    load_paper_tables,
    spair_short_names,
    variant_label,
)
from sd4match.table_cells import (
    HI,
    LO,
    MARK_COLUMNS,
    N_SEEDS,
    PAPER_INSIDE,
    PAPER_OUTSIDE,
    SD,
    arranged_columns,
    cell_text,
    per_pair_path,
    read_seed_spread,
)
from sd4match.table_protocols import OURS, RowProtocol
from sd4match.uncertainty import (
    BootstrapSettings,
    cell_interval,
    intervals_from_file,
    method_note,
    paired_difference_from_files,
    paper_within,
)

PathLike = str | os.PathLike[str]
PAIRED_SOURCE = "paired"
PAIRED_NOTE = (
    "Paired differences A − B: both evaluations are resampled with the same pairs (matched by pair id), so "
    "what the two share (hard pairs) cancels; an interval that excludes 0 is a difference beyond the test "
    "pairs' sampling noise. Each side is scored by the matching its table reports."
)
VS_CASE_1 = "vs_case_1"
DEFAULT_SETTINGS = BootstrapSettings()  # 95%, 2000 resamples, seed 0
SEEDS_COLUMN = "seeds"


# ----------------------------------------------------------------------------------------------------------
# Lines under a table
# ----------------------------------------------------------------------------------------------------------


def table_notes(
    pairs_reports: Sequence[PathLike],
    settings: BootstrapSettings | None = None,
    max_pairs: int | None = None,
) -> list[str]:
    """The table's own lines: the pairs evaluated per test set (``pairs_note``; with ``max_pairs``, that only
    the first N were evaluated) and, with ``settings``, how the intervals were computed."""
    notes = []
    pairs = pairs_note(pairs_reports)
    if pairs and max_pairs is not None:
        pairs += (
            f" Only the first {max_pairs:,} pairs of each test set were evaluated (evaluation.max_pairs)."
        )
    if pairs:
        notes.append(pairs)
    if settings is not None:
        notes.append(method_note(settings))
    return notes


# ----------------------------------------------------------------------------------------------------------
# Paired comparisons in the Table 2 layout
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Method A minus method B on the same SPair-71k test pairs, each scored by the matching its table
    reports (``summary_*``: the evaluations' summaries; their per-pair CSVs sit beside them)."""

    label_a: str
    summary_a: PathLike
    matching_a: str
    label_b: str
    summary_b: PathLike
    matching_b: str


def table2_comparisons(sources: TableSources) -> list[Comparison]:
    """The comparisons a Table 2 reader asks about: every SPair-tuned variant against SD4Match-Single (CPM
    vs Single: does conditioning help?) and against DIFT (ours vs the zero-shot SD baseline) when DIFT is
    measured by our protocol (``dift``, the squashed frame; ``zero_shot_protocols`` as in
    ``reporting.table2_from_files``): a difference across protocols would mix frames."""
    zero_shot, sd4match, variants = sources.zero_shot, sources.sd4match, sources.variants
    matching, zero_shot_matching = sources.matching, sources.zero_shot_matching
    order = list(PAPER_ROW_OF_KIND)
    ranked = sorted(sd4match, key=lambda v: (order.index(variants[v]["kind"]), v != variants[v]["kind"], v))
    label = {v: variant_label(variants[v]["kind"], v) for v in ranked}
    out = []
    single = [v for v in ranked if v == "single" and variants[v]["kind"] == "single"]
    for variant in ranked:
        if single and variant != single[0]:
            out.append(
                Comparison(
                    label[variant],
                    sd4match[variant],
                    matching,
                    label[single[0]],
                    sd4match[single[0]],
                    matching,
                )
            )
    if "dift" in zero_shot and RowProtocol.coerce((sources.zero_shot_protocols or {}).get("dift")) == OURS:
        dift = ZERO_SHOT_LABELS["dift"]
        for variant in ranked:
            out.append(
                Comparison(
                    label[variant], sd4match[variant], matching, dift, zero_shot["dift"], zero_shot_matching
                )
            )
    return out


def _matching_label(a: str, b: str) -> str:
    return a if a == b else f"{a} vs {b}"


def paired_row(comparison: Comparison, settings: BootstrapSettings, alpha: float) -> dict[str, Any]:
    """One row in the Table 2 layout: A − B per SPair-71k category and All with its paired-bootstrap
    interval (NaN for categories the evaluations do not hold)."""
    c = comparison
    diff = paired_difference_from_files(
        per_pair_path(c.summary_a),
        per_pair_path(c.summary_b),
        settings,
        methods=(c.matching_a, c.matching_b),
        alphas=[alpha],
    ).set_index("category")
    row: dict[str, Any] = {
        "method": f"{c.label_a} − {c.label_b}",
        "matching": _matching_label(c.matching_a, c.matching_b),
        "source": PAIRED_SOURCE,
        "pck": PCK_VARIANT,
        "protocol": OURS.protocol,  # both sides by this pipeline's protocol (table2_comparisons)
    }
    for category, short in [*spair_short_names().items(), (ALL_CATEGORY, ALL_CATEGORY)]:
        if category not in diff.index:
            row[short] = math.nan
            continue
        cell = diff.loc[category]
        row |= {
            short: float(cell["diff_per_image"]),
            f"{short}{LO}": float(cell["diff_per_image_lo"]),
            f"{short}{HI}": float(cell["diff_per_image_hi"]),
        }
    return row


def paired_table(
    comparisons: Sequence[Comparison], settings: BootstrapSettings = DEFAULT_SETTINGS
) -> pd.DataFrame:
    """Paired differences in the Table 2 layout (SPair-71k PCK@0.1 per category and All, per image); no
    rows when there is nothing to compare (neither SD4Match-Single nor DIFT configured)."""
    alpha = float(load_paper_tables()["table2"]["alpha"])
    rows = [paired_row(c, settings, alpha) for c in comparisons]
    columns = [*spair_short_names().values(), ALL_CATEGORY]
    for row in rows:  # every row has every companion: categories absent from an evaluation are NaN
        row |= {f"{c}{s}": row.get(f"{c}{s}", math.nan) for c in columns for s in (LO, HI)}
    return pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *arranged_columns(columns, rows)])


# ----------------------------------------------------------------------------------------------------------
# Fig. 3a and Fig. 3b tables
# ----------------------------------------------------------------------------------------------------------


def _case_path(paths: Mapping[Any, PathLike], case: int) -> PathLike | None:
    """The file of a Fig. 3a case, keyed by its number as int or str."""
    return paths.get(case, paths.get(str(case)))


def _seed_spread_cells(spread: pd.DataFrame | None, matching: str, alpha: float) -> dict[str, float]:
    """``seeds`` (mean), ``seeds_sd`` and ``n_seeds`` of the All cell across seeds (NaN for one seed)."""
    if spread is None:
        return {SEEDS_COLUMN: math.nan, f"{SEEDS_COLUMN}{SD}": math.nan, N_SEEDS: math.nan}
    row = spread[(spread["category"] == ALL_CATEGORY) & (spread["method"] == matching)]
    row = row[(row["alpha"].astype(float) - alpha).abs() < 1e-9]
    if len(row) != 1:
        raise ValueError(f"seed spread: no All row for method={matching!r}, alpha={alpha:g}")
    cell = row.iloc[0]
    return {
        SEEDS_COLUMN: float(cell["pck_per_image_mean"]),
        f"{SEEDS_COLUMN}{SD}": float(cell["pck_per_image_std"]),
        N_SEEDS: float(cell["n_seeds"]),
    }


def fig3a_uncertainty(
    table: pd.DataFrame,
    summaries: Mapping[Any, PathLike],
    matching: str,
    settings: BootstrapSettings = DEFAULT_SETTINGS,
    seeds: Mapping[Any, Mapping[int, PathLike]] | None = None,
    alpha: float = 0.1,
) -> pd.DataFrame:
    """The Fig. 3a table (``figures.fig3a_table``) with our interval, the delta's interval and paper mark,
    each case minus case 1 by the paired bootstrap (``vs_case_1``), and the spread across seeds when a case
    has several (``summaries``/``seeds`` keyed by case number; cases not run stay NaN)."""
    base = _case_path(summaries, 1)
    spreads = {int(case): read_seed_spread(paths) for case, paths in (seeds or {}).items()}
    with_seeds = any(spread is not None for spread in spreads.values())
    rows = []
    for record in table.to_dict("records"):
        case, path = int(record["case"]), _case_path(summaries, int(record["case"]))
        row = dict(record)
        row |= {f"{c}{s}": math.nan for c in ("ours", "delta", VS_CASE_1) for s in (LO, HI)}
        row |= {VS_CASE_1: math.nan, PAPER_INSIDE: "", PAPER_OUTSIDE: ""}
        if path is not None and not math.isnan(float(record["ours"])):
            row |= _fig3a_case_cells(row, path, base if case != 1 else None, matching, settings, alpha)
        if with_seeds:
            row |= _seed_spread_cells(spreads.get(case), matching, alpha)
        rows.append(row)
    numeric = ["ours", "paper", "delta", VS_CASE_1, *([SEEDS_COLUMN] if with_seeds else [])]
    labels = [c for c in table.columns if c not in numeric]
    return pd.DataFrame(rows, columns=_columns_around(labels, 2, arranged_columns(numeric, rows)))


def _columns_around(labels: list[str], position: int, numeric: list[str]) -> list[str]:
    """Label columns with the numeric block (and its companions) at ``position``; ``n_seeds`` and the paper
    marks last."""
    tail = [c for c in (N_SEEDS, *MARK_COLUMNS) if c in numeric]
    block = [c for c in numeric if c not in tail]
    return [*labels[:position], *block, *labels[position:], *tail]


def _fig3a_case_cells(
    row: dict[str, Any],
    path: PathLike,
    base: PathLike | None,
    matching: str,
    settings: BootstrapSettings,
    alpha: float,
) -> dict[str, Any]:
    """Our interval, the delta's and the paper mark of one case, and its paired difference to case 1."""
    intervals = intervals_from_file(per_pair_path(path), settings, [matching], [alpha])
    _, lo, hi = cell_interval(intervals, ALL_CATEGORY, matching, alpha)
    paper = float(row["paper"])
    within = paper_within(paper, lo, hi)
    cells: dict[str, Any] = {"ours_lo": lo, "ours_hi": hi, "delta_lo": lo - paper, "delta_hi": hi - paper}
    cells |= {PAPER_INSIDE: "delta" if within else "", PAPER_OUTSIDE: "delta" if within is False else ""}
    if base is not None:
        diff = paired_difference_from_files(
            per_pair_path(path), per_pair_path(base), settings, (matching, matching), [alpha]
        )
        total = diff[diff["category"] == ALL_CATEGORY].iloc[0]
        cells |= {
            VS_CASE_1: float(total["diff_per_image"]),
            f"{VS_CASE_1}{LO}": float(total["diff_per_image_lo"]),
            f"{VS_CASE_1}{HI}": float(total["diff_per_image_hi"]),
        }
    return cells


def fig3b_uncertainty(
    table: pd.DataFrame,
    evaluations: Mapping[tuple[str, int], PathLike],
    settings: BootstrapSettings = DEFAULT_SETTINGS,
    seeds: Mapping[tuple[str, int], Mapping[int, PathLike]] | None = None,
    alpha: float = 0.1,
) -> pd.DataFrame:
    """The Fig. 3b table (``figures.fig3b_table``) with the interval of every point (``pck_lo``/``pck_hi``)
    and, for a method with several seeds, the spread across them (``seeds``, ``seeds_sd``, ``n_seeds``).
    ``evaluations``/``seeds`` are keyed by (method label, timestep)."""
    needed: dict[tuple[str, int], list[str]] = {}
    for record in table.to_dict("records"):
        needed.setdefault((record["method"], int(record["timestep"])), []).append(record["matching"])
    bounds = {}
    for key, matchings in needed.items():
        if key not in evaluations:
            raise ValueError(f"fig3b: no evaluation given for {key[0]!r} at t={key[1]}")
        bounds[key] = intervals_from_file(per_pair_path(evaluations[key]), settings, matchings, [alpha])
    spreads = {key: read_seed_spread(paths) for key, paths in (seeds or {}).items()}
    with_seeds = any(spread is not None for spread in spreads.values())
    rows = []
    for record in table.to_dict("records"):
        key = (record["method"], int(record["timestep"]))
        point, lo, hi = cell_interval(bounds[key], ALL_CATEGORY, record["matching"], alpha)
        if abs(point - float(record["pck"])) > 1e-6:
            raise ValueError(
                f"fig3b: {evaluations[key]} and its per-pair CSV disagree at {key} ({record['matching']}): "
                f"{record['pck']} vs {point}; they come from different runs"
            )
        row = dict(record) | {f"pck{LO}": lo, f"pck{HI}": hi}
        if with_seeds:
            row |= _seed_spread_cells(spreads.get(key), record["matching"], alpha)
        rows.append(row)
    numeric = ["pck", *([SEEDS_COLUMN] if with_seeds else [])]
    labels = [c for c in table.columns if c != "pck"]
    position = list(table.columns).index("pck")
    return pd.DataFrame(rows, columns=_columns_around(labels, position, arranged_columns(numeric, rows)))


def plain_cells(table: pd.DataFrame, column: str) -> list[str]:
    """How a column's cells read in Markdown (number, interval or spread, mark): for logs and tests."""
    return [cell_text(row, column).plain() for row in table.to_dict("records")]
