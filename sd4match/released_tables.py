"""Tables of the authors' released prompts evaluated by our pipeline, beside the paper's numbers.

Built from the existing reporting functions: the Table 3 layout over the three test sets and the Table 2
layout per SPair-71k category, each prompt's rows beside the paper's row of the same variant and training
set, with the bootstrap interval of every number when the summaries are read with one
(``read_released_summaries``).
The full Tables 2 and 3 show the same prompts as ``released`` rows (``released_for_tables``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from sd4match.reporting import (
    DATASET_NAMES,
    PAPER_ROW_OF_KIND,
    TRAIN_SET_NAMES,
    per_category_table,
    zero_shot_table,
)
from sd4match.table_cells import read_evaluation
from sd4match.uncertainty import BootstrapSettings

SummaryMap = dict[tuple[str, str], dict[str, pd.DataFrame]]
TABLE2_ALPHA = 0.1


def _paper_order(run: tuple[str, str]) -> tuple[int, int]:
    """SPair-tuned before PF-Pascal-tuned, then Single, Class, CPM (the paper's row order)."""
    return list(TRAIN_SET_NAMES).index(run[0]), list(PAPER_ROW_OF_KIND).index(run[1])


def released_label(trainset: str, variant: str) -> str:
    """Row label, e.g. "SD4Match-CPM (authors' released prompt, tuned on SPair-71k)"."""
    return f"{PAPER_ROW_OF_KIND[variant]} (authors' released prompt, tuned on {TRAIN_SET_NAMES[trainset]})"


def summary_key(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(training set, variant, test set) of ``.../<trainset>/<variant>/<dataset>/summary.csv``."""
    parts = Path(path).parts
    if len(parts) < 4 or parts[-1] != "summary.csv":
        raise ValueError(f"released summary {path}: expected .../<trainset>/<variant>/<dataset>/summary.csv")
    trainset, variant, dataset = parts[-4:-1]
    if trainset not in TRAIN_SET_NAMES or variant not in PAPER_ROW_OF_KIND or dataset not in DATASET_NAMES:
        raise ValueError(f"released summary {path}: unknown training set, variant or test set in its path")
    return trainset, variant, dataset


def read_released_summaries(
    paths: Iterable[str | os.PathLike[str]],
    intervals: BootstrapSettings | None = None,
    matching: str | None = None,
) -> SummaryMap:
    """Summary frames keyed by (training set, variant), then test set; with ``intervals``, plus the bounds
    of the ``matching`` cells from the per-pair CSV beside each summary."""
    summaries: SummaryMap = {}
    methods = None if matching is None else [matching]
    for path in paths:
        trainset, variant, dataset = summary_key(path)
        summaries.setdefault((trainset, variant), {})[dataset] = read_evaluation(path, intervals, methods)
    return summaries


def released_for_tables(paths: Iterable[str | os.PathLike[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """The released evaluations as the full tables take them: Table 2's (prompts tuned on SPair-71k,
    evaluated on it: variant -> summary) and Table 3's (``<trainset>/<variant>/<dataset>`` -> summary)."""
    table2, table3 = {}, {}
    for path in paths:
        trainset, variant, dataset = summary_key(path)
        table3[f"{trainset}/{variant}/{dataset}"] = str(path)
        if trainset == dataset == "spair":
            table2[variant] = str(path)
    return table2, table3


def released_table3(
    summaries: Mapping[tuple[str, str], Mapping[str, pd.DataFrame]], matching: str
) -> pd.DataFrame:
    """Table 3 layout (ours / paper / delta) for every released prompt evaluated on all three test sets."""
    frames = [
        zero_shot_table(
            dict(per_dataset),
            released_label(trainset, variant),
            matching,
            paper_row=PAPER_ROW_OF_KIND[variant],
            paper_trained_on=trainset,
        )
        for (trainset, variant), per_dataset in sorted(
            summaries.items(), key=lambda item: _paper_order(item[0])
        )
        if set(per_dataset) == set(DATASET_NAMES)
    ]
    if not frames:
        raise ValueError("released_table3: no released prompt was evaluated on all three test sets")
    return pd.concat(frames, ignore_index=True)


def released_table2(
    summaries: Mapping[tuple[str, str], Mapping[str, pd.DataFrame]], matching: str
) -> pd.DataFrame:
    """Table 2 layout (SPair-71k per category, PCK@0.1; ours / paper / delta) for the SPair-tuned prompts."""
    frames = [
        per_category_table(
            per_dataset["spair"],
            released_label(trainset, variant),
            TABLE2_ALPHA,
            matching,
            paper_row=PAPER_ROW_OF_KIND[variant],
        )
        for (trainset, variant), per_dataset in sorted(
            summaries.items(), key=lambda item: _paper_order(item[0])
        )
        if trainset == "spair" and "spair" in per_dataset
    ]
    if not frames:
        raise ValueError("released_table2: no SPair-tuned released prompt was evaluated on SPair-71k")
    return pd.concat(frames, ignore_index=True)
