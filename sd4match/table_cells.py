"""How sure each number of a table is, in the table itself: companion columns beside every PCK cell.

A numeric column ``C`` of a table may have companions (only where some row fills them):
- ``C_lo`` / ``C_hi``: the 95% bootstrap interval over pairs of ``sd4match.uncertainty`` (``ours`` and
  ``released`` rows); on ``delta`` rows the interval of ours − paper (our bounds minus the paper's number);
- ``C_sd`` with the row's ``n_seeds``: on ``seeds`` rows, ``C`` is the mean across a run's training seeds
  and ``C_sd`` their sample standard deviation;
- ``paper_inside`` / ``paper_outside`` (``;``-joined column names, ``delta`` rows): where the paper's number
  lies inside / outside our interval, allowing for its rounding (``uncertainty.paper_within``).
Markdown and HTML show a cell and its companions compactly: ``75.3 [74.6, 76.0]``, ``73.0 ± 3.6 (2 seeds)``,
``-0.2 [-0.9, +0.5] ✓``. Summaries read for a table carry ``<kind>_lo`` / ``<kind>_hi`` bounds
(``read_evaluation``) that the table builders copy into the cells they print.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sd4match.uncertainty import (
    BOUND_KINDS,
    PCK_KINDS,
    BootstrapSettings,
    format_bounds,
    format_sd,
    intervals_from_file,
    paper_within,
    seed_spread_from_files,
)

LO, HI, SD = "_lo", "_hi", "_sd"
COMPANION_SUFFIXES = (LO, HI, SD)
N_SEEDS = "n_seeds"
PAPER_INSIDE, PAPER_OUTSIDE = "paper_inside", "paper_outside"
MARK_COLUMNS = (PAPER_INSIDE, PAPER_OUTSIDE)
MARK_SEPARATOR = ";"
INSIDE_MARK, OUTSIDE_MARK = "✓", "✗"
SEEDS_SOURCE = "seeds"
SIGNED_SOURCES = ("delta", "paired")  # rows of differences: numbers with their sign
SIGNED_COLUMNS = ("delta", "vs_case_1")  # columns of differences (Fig. 3a)
_KEYS = ["category", "method", "alpha"]
POINT_TOLERANCE = 1e-6  # summary.csv and its per-pair CSV must give the same PCK (a rerun makes them agree)
PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------------------------------------
# Reading one evaluation for a table
# ----------------------------------------------------------------------------------------------------------


def per_pair_path(summary_path: PathLike) -> Path:
    """The per-pair CSV of an evaluation: every evaluation writes ``per_pair.csv`` beside ``summary.csv``."""
    return Path(summary_path).with_name("per_pair.csv")


def read_summary(path: PathLike) -> pd.DataFrame:
    """One evaluation's ``summary.csv`` (categories and matching methods as strings)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"summary not found: {path}")
    return pd.read_csv(path, dtype={"category": str, "method": str})


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` indexed by (category, method, alpha rounded to 1e-9), so float alphas align."""
    return frame.assign(alpha=frame["alpha"].astype(float).round(9)).set_index(_KEYS)


def attach_bounds(summary: pd.DataFrame, intervals: pd.DataFrame, where: str) -> pd.DataFrame:
    """``summary`` (its rows and point values unchanged) plus the ``<kind>_lo`` / ``<kind>_hi`` columns of
    ``intervals`` (``uncertainty.summary_with_intervals``; every kind of ``BOUND_KINDS``, sd-dino's
    category-weighted All included) on the rows they cover (NaN elsewhere). Their point values must agree: a
    summary and a per-pair table of two different runs are refused."""
    ours, theirs = _keyed(summary), _keyed(intervals)
    missing = theirs.index.difference(ours.index)
    if len(missing):
        raise ValueError(f"{where}: the per-pair table has cells the summary lacks, e.g. {missing[0]}")
    for kind in PCK_KINDS:
        gap = np.abs(ours.loc[theirs.index, kind].to_numpy(float) - theirs[kind].to_numpy(float))
        if (gap > POINT_TOLERANCE).any():
            key = theirs.index[int(np.argmax(gap))]
            raise ValueError(
                f"{where}: summary.csv and per_pair.csv disagree on {kind} at (category, method, alpha) = "
                f"{key} by {gap.max():.3g}; they come from different runs (rerun the evaluation)"
            )
    out = summary.copy()
    for kind in BOUND_KINDS:
        for suffix in (LO, HI):
            column = theirs[f"{kind}{suffix}"].reindex(ours.index)
            out[f"{kind}{suffix}"] = column.to_numpy(float)
    return out


def read_evaluation(
    summary_path: PathLike,
    settings: BootstrapSettings | None = None,
    methods: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
) -> pd.DataFrame:
    """An evaluation's summary; with ``settings``, plus the bootstrap bounds of its cells of ``methods`` at
    ``alphas`` (None: all), computed from the per-pair CSV beside it."""
    summary = read_summary(summary_path)
    if settings is None:
        return summary
    per_pair = per_pair_path(summary_path)
    intervals = intervals_from_file(per_pair, settings, methods, alphas)
    return attach_bounds(summary, intervals, where=f"{summary_path} and {per_pair}")


def read_seed_spread(paths: Mapping[int, PathLike] | None) -> pd.DataFrame | None:
    """The spread across a run's seeds (``uncertainty.seed_spread``), or None for one seed (nothing to
    print)."""
    if paths is None or len(paths) < 2:
        return None
    return seed_spread_from_files({int(seed): path for seed, path in paths.items()})


# ----------------------------------------------------------------------------------------------------------
# Cells of the table builders
# ----------------------------------------------------------------------------------------------------------


def _row_of(frame: pd.DataFrame, category: str, matching: str, alpha: float, where: str) -> pd.Series:
    """The one row of ``frame`` at (category, matching, alpha)."""
    sel = frame[
        (frame["category"] == category)
        & (frame["method"] == matching)
        & np.isclose(frame["alpha"].astype(float), alpha)
    ]
    if len(sel) != 1:
        raise ValueError(
            f"{where}: expected one row for category={category!r}, method={matching!r}, alpha={alpha:g}; "
            f"found {len(sel)}"
        )
    return sel.iloc[0]


def bound_cells(
    header: str,
    frame: pd.DataFrame,
    category: str,
    matching: str,
    alpha: float,
    where: str,
    kind: str = "pck_per_image",
) -> dict[str, float]:
    """``{header_lo, header_hi}`` of one cell when ``frame`` carries bounds of ``kind`` (else nothing)."""
    if f"{kind}{LO}" not in frame.columns:
        return {}
    row = _row_of(frame, category, matching, alpha, where)
    lo, hi = float(row[f"{kind}{LO}"]), float(row[f"{kind}{HI}"])
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(
            f"{where}: no interval for category={category!r}, method={matching!r}, alpha={alpha:g} "
            "(its per-pair rows were not read)"
        )
    return {f"{header}{LO}": lo, f"{header}{HI}": hi}


def seed_cells(
    header: str,
    spread: pd.DataFrame,
    category: str,
    matching: str,
    alpha: float,
    where: str,
    kind: str = "pck_per_image",
) -> dict[str, float]:
    """``{header: mean, header_sd: sample std}`` across seeds of one cell (``seed_spread`` frame)."""
    row = _row_of(spread, category, matching, alpha, f"{where} (seeds)")
    return {header: float(row[f"{kind}_mean"]), f"{header}{SD}": float(row[f"{kind}_std"])}


def n_seeds(spread: pd.DataFrame) -> int:
    """The number of seeds of a ``seed_spread`` frame (the same for every cell)."""
    return int(spread["n_seeds"].max())


def delta_cells(ours: Mapping[str, Any], paper: Mapping[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    """For a delta row: the interval of ours − paper (our bounds minus the paper's number; NaN where either
    is missing) and the columns whose paper number lies inside / outside our interval; nothing when our row
    has no bounds."""
    out: dict[str, Any] = {}
    inside, outside = [], []
    for column in columns:
        if f"{column}{LO}" not in ours:
            continue
        lo, hi = float(ours[f"{column}{LO}"]), float(ours[f"{column}{HI}"])
        number = paper.get(column)
        number = math.nan if number is None else float(number)
        out[f"{column}{LO}"], out[f"{column}{HI}"] = lo - number, hi - number
        within = paper_within(number, lo, hi) if not math.isnan(lo) else None
        if within is not None:
            (inside if within else outside).append(column)
    if out:
        out[PAPER_INSIDE], out[PAPER_OUTSIDE] = MARK_SEPARATOR.join(inside), MARK_SEPARATOR.join(outside)
    return out


def arranged_columns(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """``columns`` with each one's companions present in any row right after it (``C, C_lo, C_hi, C_sd``),
    then ``n_seeds`` and the paper marks when present."""
    present = set().union(*(row.keys() for row in rows))
    out: list[str] = []
    for column in columns:
        out.append(column)
        out += [f"{column}{s}" for s in COMPANION_SUFFIXES if f"{column}{s}" in present]
    return out + [c for c in (N_SEEDS, *MARK_COLUMNS) if c in present and c not in out]


# ----------------------------------------------------------------------------------------------------------
# Display: one cell with its companions
# ----------------------------------------------------------------------------------------------------------


def hidden_columns(columns: Collection[str]) -> set[str]:
    """Companion columns a rendering folds into their cell (not shown as columns of their own)."""
    hidden = {c for c in (N_SEEDS, *MARK_COLUMNS) if c in columns}
    for column in columns:
        for suffix in COMPANION_SUFFIXES:
            if column.endswith(suffix) and column[: -len(suffix)] in columns:
                hidden.add(column)
    return hidden


@dataclass(frozen=True)
class CellText:
    """A cell as shown: the number, its interval or seed spread (``detail``) and the paper mark."""

    value: str
    detail: str = ""
    mark: str = ""

    def plain(self) -> str:
        return " ".join(part for part in (self.value, self.detail, self.mark) if part)


def _number(value: Any) -> float | None:
    """A float for numeric cells (None for text); NaN stays NaN."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (float, int, np.floating, np.integer)):
        return float(value)
    return None


def _marks(row: Mapping[str, Any], key: str) -> set[str]:
    cell = row.get(key)
    return set(cell.split(MARK_SEPARATOR)) if isinstance(cell, str) and cell else set()


def _companion(row: Mapping[str, Any], column: str, suffix: str) -> float:
    value = _number(row.get(f"{column}{suffix}", math.nan))
    return math.nan if value is None else value


def cell_text(row: Mapping[str, Any], column: str) -> CellText:
    """One cell of a table row: floats to one decimal ("-" for NaN; signed on difference rows/columns), with
    ``[lo, hi]`` or ``± sd (n seeds)`` and ✓ / ✗ where the row has them; anything else as text."""
    value = row[column]
    number = _number(value)
    if number is None or isinstance(value, (int, np.integer)):
        return CellText(str(value))
    if math.isnan(number):
        return CellText("-")
    signed = row.get("source") in SIGNED_SOURCES or column in SIGNED_COLUMNS
    text = f"{number:+.1f}" if signed else f"{number:.1f}"
    detail = ""
    lo, hi, sd = (_companion(row, column, s) for s in (LO, HI, SD))
    seeds = _number(row.get(N_SEEDS, math.nan))
    if not (math.isnan(lo) or math.isnan(hi)):
        detail = format_bounds(lo, hi, signed=signed)
    elif seeds is not None and not math.isnan(seeds):
        detail = format_sd(sd, int(seeds))
    mark = ""
    if column in _marks(row, PAPER_INSIDE):
        mark = INSIDE_MARK
    elif column in _marks(row, PAPER_OUTSIDE):
        mark = OUTSIDE_MARK
    return CellText(text, detail, mark)


PAPER_MARK_NOTE = (
    "`[lo, hi]` = the 95% bootstrap interval of our number over the test pairs. A difference to the paper "
    f"(`delta`) carries our interval minus the paper's number, and {INSIDE_MARK} / {OUTSIDE_MARK} say "
    "whether the paper's number lies inside / outside our interval (allowing for its rounding to one "
    "decimal)."
)
SEEDS_NOTE = (
    "`seeds` = mean ± sample standard deviation across a run's training seeds (each seed trains its own "
    "prompt and seeds its evaluation); the run's other numbers are those of its first (primary) seed."
)


def companion_notes(df: pd.DataFrame) -> list[str]:
    """The paragraphs explaining the companions a table shows (intervals and marks, seeds rows)."""
    notes = []
    if any(column.endswith(LO) for column in df.columns):
        notes.append(PAPER_MARK_NOTE)
    if N_SEEDS in df.columns and df[N_SEEDS].notna().any():
        notes.append(SEEDS_NOTE)
    return notes
