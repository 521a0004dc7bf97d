"""Tables in the SD4Match paper's layout: our PCK beside the paper's quoted numbers and the difference.

The paper's numbers live in the package data file ``sd4match/reference/paper_tables.yaml`` (Tables 1-3
and Fig. 3a, transcribed exactly). Our numbers come from the per-dataset "summary" frames of
``metrics.summarise``.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sd4match.table_cells import (
    N_SEEDS,
    SEEDS_SOURCE,
    arranged_columns,
    bound_cells,
    delta_cells,
    n_seeds,
    read_evaluation,
    read_seed_spread,
    seed_cells,
)
from sd4match.table_protocols import (
    AS_REPORTED,
    OURS,
    RowProtocol,
    category_weighted_pck,
    method_row_protocol,
    paper_protocol,
)
from sd4match.uncertainty import BootstrapSettings

# Table 3 layout: dataset key -> the paper's name, and the alphas we report for each dataset.
DATASET_NAMES = {"pfpascal": "PF-Pascal", "pfwillow": "PF-Willow", "spair": "SPair-71k"}
TABLE3_ALPHAS = (0.05, 0.1, 0.15)
MATCHING_METHODS = ("nn", "soft_argmax", "kernel_softmax")
SUMMARY_COLUMNS = ("category", "method", "alpha", "n_pairs", "n_kps", "pck_per_image", "pck_per_keypoint")
ALL_CATEGORY = "All"
PCK_VARIANT = "per image"
PCK_VARIANTS = {"pck_per_image": "per image", "pck_per_keypoint": "per keypoint"}
# one clean label; the matching, the PCK estimator and the evaluation protocol beside it (table_protocols)
LABEL_COLUMNS = ("method", "matching", "source", "pck", "protocol")

# Full paper tables: extra columns, the source of literature rows, the Markdown rendering of marks.
GROUP_COLUMN = "group"
TRAINED_ON_COLUMN = "trained_on"
CITATION_COLUMN = "citation"
BEST_COLUMN = "best_in_group"
BEST_SEPARATOR = ";"
QUOTED_SOURCE = "quoted"
RELEASED_SOURCE = "released"  # the authors' released prompt, evaluated by this pipeline
RANKED_SOURCES = ("ours", QUOTED_SOURCE)
QUOTED_SUFFIX = " (quoted)"
QUOTED_PCK = "as reported"  # the cited papers' own PCK convention, unknown to this pipeline
MARKDOWN_HIDDEN_COLUMNS = (CITATION_COLUMN, BEST_COLUMN)
ZERO_SHOT = "-"
SPAIR_TUNED = "SPair-71k"
TABLE1_ROWS = ("DIFT", "SD+DINO*")
TABLE1_PROMPTS = ("empty", "template", "implicit")

DEMO_NOTE = "tiny random models on synthetic data; the numbers are not comparable to the paper."
DEMO_WARNING = "**DEMO RUN — tiny random models on synthetic data; numbers are NOT comparable to the paper**"
PROVENANCE_MODEL_KEYS = ("id", "revision_requested", "revision_resolved")


@dataclass
class Provenance:
    """Where a table's numbers come from: config hash, model revisions, code version, demo flag, protocol."""

    config_hash: str
    models: dict[str, dict[str, str | None]]
    code_version: str
    demo: bool
    protocol: str


# ----------------------------------------------------------------------------------------------------------
# The paper's numbers
# ----------------------------------------------------------------------------------------------------------


def _paper_tables_path() -> Any:
    """The packaged YAML file (a Traversable) holding the paper's tables."""
    return importlib.resources.files("sd4match") / "reference" / "paper_tables.yaml"


@functools.lru_cache(maxsize=1)
def _load_paper_tables_cached() -> dict:
    """Parse and validate the packaged YAML once per process."""
    resource = _paper_tables_path()
    if not resource.is_file():
        raise FileNotFoundError(f"paper tables not found: {resource} (package data missing from the install)")
    tables = yaml.safe_load(resource.read_text(encoding="utf-8"))
    validate_paper_tables(tables, str(resource))
    return tables


def load_paper_tables() -> dict:
    """Return (a copy of) the paper's Tables 1-3 and Fig. 3a as transcribed in ``paper_tables.yaml``."""
    return copy.deepcopy(_load_paper_tables_cached())


def validate_paper_tables(tables: Any, where: str) -> None:
    """Check the structure of the paper tables (18 categories + All per Table 2 row, all Table 3 cells)."""
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: expected a mapping at the top level")
    for key in ("table1", "table2", "table3", "fig3a"):
        if key not in tables or not isinstance(tables[key], dict) or "rows" not in tables[key]:
            raise ValueError(f"{where}: missing table {key!r} with 'rows'")
    _validate_table1(tables["table1"], where)
    for key in ("table2", "table3"):
        groups = tables[key].get("groups") or {}
        for row in tables[key]["rows"]:
            if row.get("group") not in groups:
                raise ValueError(
                    f"{where}: {key} row {row.get('method')!r}: group {row.get('group')!r} "
                    f"not in {list(groups)}"
                )
    categories = list(tables["table2"].get("categories") or {})
    if len(categories) != 18:
        raise ValueError(
            f"{where}: table2.categories must list the 18 SPair-71k categories, got {categories}"
        )
    for row in tables["table2"]["rows"]:
        keys = list(row.get("pck") or {})
        if keys != [*categories, ALL_CATEGORY]:
            raise ValueError(
                f"{where}: table2 row {row.get('method')!r}: pck keys {keys} != categories + All"
            )
    alphas = tables["table3"].get("alphas") or {}
    if set(alphas) != set(DATASET_NAMES):
        raise ValueError(f"{where}: table3.alphas must name {sorted(DATASET_NAMES)}, got {sorted(alphas)}")
    for row in tables["table3"]["rows"]:
        for dataset, dataset_alphas in alphas.items():
            cells = (row.get("pck") or {}).get(dataset)
            if not isinstance(cells, dict) or sorted(cells) != sorted(dataset_alphas):
                raise ValueError(
                    f"{where}: table3 row {row.get('name_in_paper')!r}: {dataset} must have alphas "
                    f"{dataset_alphas}"
                )


def _validate_table1(table1: dict, where: str) -> None:
    """Check Table 1: prompt keys empty/template/implicit, rows DIFT and SD+DINO* with one cell each."""
    prompts = list(table1.get("prompts") or {})
    if prompts != list(TABLE1_PROMPTS):
        raise ValueError(f"{where}: table1.prompts must be {list(TABLE1_PROMPTS)}, got {prompts}")
    methods = [row.get("method") for row in table1["rows"]]
    if methods != list(TABLE1_ROWS):
        raise ValueError(f"{where}: table1 rows must be {list(TABLE1_ROWS)}, got {methods}")
    for row in table1["rows"]:
        if list(row.get("pck") or {}) != prompts:
            raise ValueError(f"{where}: table1 row {row['method']!r}: pck keys must be {prompts}")


def paper_table3_row(method: str, trained_on: str | None = None) -> dict:
    """One Table 3 row by method name (e.g. "DIFT"); ``trained_on`` ("pfpascal"/"spair") picks a duplicate."""
    rows = [row for row in load_paper_tables()["table3"]["rows"] if row["method"] == method]
    if not rows:
        known = sorted({row["method"] for row in load_paper_tables()["table3"]["rows"]})
        raise ValueError(f"paper Table 3 has no row for method {method!r}; known methods: {known}")
    if trained_on is not None:
        rows = [row for row in rows if row["trained_on"] == trained_on]
        if not rows:
            raise ValueError(f"paper Table 3 has no row for method {method!r} trained on {trained_on!r}")
    if len(rows) > 1:
        options = [row["trained_on"] for row in rows]
        raise ValueError(
            f"paper Table 3 has {len(rows)} rows for {method!r}; pass trained_on, one of {options}"
        )
    return rows[0]


def paper_table2_row(method: str) -> dict:
    """One Table 2 row (SPair-71k per-category PCK@0.1) by method name, e.g. "SD4Match-CPM"."""
    rows = load_paper_tables()["table2"]["rows"]
    for row in rows:
        if row["method"] == method:
            return row
    raise ValueError(
        f"paper Table 2 has no row for method {method!r}; known methods: {[r['method'] for r in rows]}"
    )


def paper_table3_value(row: dict, dataset: str, alpha: float) -> float:
    """The paper's PCK of a Table 3 row at (dataset, alpha); NaN where the paper reports "-" or nothing."""
    cells = row["pck"].get(dataset, {})
    for key, value in cells.items():
        if math.isclose(float(key), alpha):
            return math.nan if value is None else float(value)
    return math.nan


def spair_short_names() -> dict[str, str]:
    """SPair-71k category -> the paper's Table 2 column header (Aero, Bike, ..., TV), in the paper's order."""
    return dict(load_paper_tables()["table2"]["categories"])


# ----------------------------------------------------------------------------------------------------------
# Our numbers: the "summary" frames of metrics.summarise
# ----------------------------------------------------------------------------------------------------------


def _check_summary(summary: pd.DataFrame, where: str) -> None:
    """Raise if a summary frame misses a contract column."""
    missing = [column for column in SUMMARY_COLUMNS if column not in summary.columns]
    if missing:
        raise ValueError(f"summary {where}: missing columns {missing} (expected {list(SUMMARY_COLUMNS)})")


def summary_pck(
    summary: pd.DataFrame,
    category: str,
    matching: str,
    alpha: float,
    where: str,
    column: str = "pck_per_image",
) -> float:
    """Our PCK (per image by default, or ``pck_per_keypoint``) for one (category, matching, alpha) cell."""
    _check_summary(summary, where)
    if matching not in MATCHING_METHODS:
        raise ValueError(
            f"summary {where}: unknown matching method {matching!r}; expected one of {MATCHING_METHODS}"
        )
    if column not in ("pck_per_image", "pck_per_keypoint"):
        raise ValueError(f"summary {where}: unknown PCK column {column!r}")
    selected = summary[
        (summary["category"] == category)
        & (summary["method"] == matching)
        & np.isclose(summary["alpha"].astype(float), alpha)
    ]
    if len(selected) != 1:
        raise ValueError(
            f"summary {where}: expected exactly one row for category={category!r}, method={matching!r}, "
            f"alpha={alpha:g}; found {len(selected)}"
        )
    return float(selected[column].iloc[0])


def estimator_pck(
    summary: pd.DataFrame, category: str, matching: str, alpha: float, where: str, estimator: str
) -> float:
    """Our PCK of one cell under a row's estimator (``table_protocols.ESTIMATORS``): a summary column, or for
    ``pck_category_weighted`` the category's per-keypoint PCK and, for All, sd-dino's pair-weighted mean."""
    if estimator != "pck_category_weighted":
        return summary_pck(summary, category, matching, alpha, where, column=estimator)
    if category != ALL_CATEGORY:
        return summary_pck(summary, category, matching, alpha, where, column="pck_per_keypoint")
    summary_pck(summary, category, matching, alpha, where)  # the same checks as every other cell
    return category_weighted_pck(summary, matching, alpha, where)


def _column_name(dataset: str, alpha: float) -> str:
    """Table 3 column header, e.g. ``PF-Pascal@0.05``."""
    return f"{DATASET_NAMES[dataset]}@{alpha:g}"


def table3_columns() -> list[str]:
    """The numeric columns of the Table 3 layout, in the paper's order."""
    return [_column_name(dataset, alpha) for dataset in DATASET_NAMES for alpha in TABLE3_ALPHAS]


def _delta_row(ours: dict[str, Any], paper: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """ours - paper per numeric column (NaN where either is missing)."""
    row: dict[str, Any] = {
        "method": "ours − paper",
        "matching": ours.get("matching", ""),
        "source": "delta",
        "pck": ours.get("pck", PCK_VARIANT),
        "protocol": ours.get("protocol", ""),
    }
    for column in columns:
        row[column] = ours[column] - paper[column]
    return row | delta_cells(ours, paper, columns)


def zero_shot_table(
    summaries: dict[str, pd.DataFrame],
    method_label: str = "DIFT",
    matching: str = "kernel_softmax",
    paper_row: str | None = "DIFT",
    paper_trained_on: str | None = None,
    per_keypoint: bool = False,
    other_matchings: tuple[str, ...] = (),
    protocol: RowProtocol | None = None,
) -> pd.DataFrame:
    """Table 3 layout: rows ours / paper / delta on PF-Pascal, PF-Willow, SPair-71k @ 0.05/0.1/0.15.

    ``summaries`` maps "pfpascal", "pfwillow", "spair" to a summary frame; ``paper_row=None`` gives ours only.
    ``per_keypoint`` adds our per-keypoint row; ``other_matchings`` adds our rows for other matching methods.
    ``protocol``: how our numbers were obtained (default: the squashed frame, per image); it names our rows'
    ``protocol`` and ``pck`` cells and picks the estimator of their main row.
    """
    protocol = RowProtocol.coerce(protocol)
    unknown = sorted(set(summaries) - set(DATASET_NAMES))
    if unknown:
        raise ValueError(f"zero_shot_table: unknown dataset keys {unknown}; expected {sorted(DATASET_NAMES)}")
    for dataset in DATASET_NAMES:
        if dataset not in summaries:
            raise ValueError(f"zero_shot_table: missing summary for dataset {dataset!r}")
    columns = table3_columns()
    ours = _ours_table3_row(summaries, method_label, matching, protocol.estimator, protocol.protocol)
    rows = [ours]
    if paper_row is not None:
        quoted = paper_table3_row(paper_row, paper_trained_on)
        paper: dict[str, Any] = _paper_label_row(quoted, "table3")
        for dataset in DATASET_NAMES:
            for alpha in TABLE3_ALPHAS:
                paper[_column_name(dataset, alpha)] = paper_table3_value(quoted, dataset, alpha)
        rows += [paper, _delta_row(ours, paper, columns)]
    if per_keypoint and protocol.estimator != "pck_per_keypoint":
        rows.append(
            _ours_table3_row(summaries, method_label, matching, "pck_per_keypoint", protocol.protocol)
        )
    for other in other_matchings:
        rows.append(_ours_table3_row(summaries, method_label, other, protocol.estimator, protocol.protocol))
    return pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *arranged_columns(columns, rows)])


def _ours_table3_row(
    summaries: dict[str, pd.DataFrame], label: str, matching: str, estimator: str, protocol: str
) -> dict:
    """One row of our numbers in the Table 3 layout under ``estimator`` (``table_protocols.ESTIMATORS``)."""
    row: dict[str, Any] = _label_row(label, "ours", matching, RowProtocol(protocol, estimator))
    for dataset in DATASET_NAMES:
        for alpha in TABLE3_ALPHAS:
            header = _column_name(dataset, alpha)
            row[header] = estimator_pck(summaries[dataset], ALL_CATEGORY, matching, alpha, dataset, estimator)
            row |= bound_cells(header, summaries[dataset], ALL_CATEGORY, matching, alpha, dataset, estimator)
    return row


def _paper_table2_for_alpha(paper_row: str, alpha: float) -> dict:
    """The Table 2 row of ``paper_row``; raise if ``alpha`` is not the table's alpha (0.1)."""
    table2_alpha = float(load_paper_tables()["table2"]["alpha"])
    if not math.isclose(alpha, table2_alpha):
        raise ValueError(f"per_category_table: paper Table 2 is at alpha={table2_alpha:g}, not {alpha:g}")
    return paper_table2_row(paper_row)


def _ours_per_category(
    summary_spair: pd.DataFrame,
    matching: str,
    alpha: float,
    where: str = "spair",
    estimator: str = "pck_per_image",
) -> dict[str, float]:
    """Our PCK (per image, or the row's ``estimator``) keyed by the paper's short category names + All (NaN
    for absent categories), with the bounds of each cell when the summary carries them
    (``table_cells.bound_cells``)."""
    short_names = spair_short_names()
    _check_summary(summary_spair, where)
    present = set(summary_spair["category"])
    unknown = sorted(present - set(short_names) - {ALL_CATEGORY})
    if unknown:
        raise ValueError(f"summary {where}: unknown categories {unknown}; expected SPair-71k categories")
    cells = {
        short: estimator_pck(summary_spair, category, matching, alpha, where, estimator)
        if category in present
        else math.nan
        for category, short in short_names.items()
    }
    cells[ALL_CATEGORY] = estimator_pck(summary_spair, ALL_CATEGORY, matching, alpha, where, estimator)
    for category, short in [*short_names.items(), (ALL_CATEGORY, ALL_CATEGORY)]:
        if category in present:
            cells |= bound_cells(short, summary_spair, category, matching, alpha, where, estimator)
    return cells


def _seeds_per_category(spread: pd.DataFrame, matching: str, alpha: float, where: str) -> dict[str, Any]:
    """Mean and sample std across seeds per SPair-71k category + All (NaN for absent categories)."""
    present = set(spread["category"])
    cells: dict[str, Any] = {N_SEEDS: n_seeds(spread)}
    for category, short in [*spair_short_names().items(), (ALL_CATEGORY, ALL_CATEGORY)]:
        if category in present:
            cells |= seed_cells(short, spread, category, matching, alpha, where)
        else:
            cells[short] = math.nan
    return cells


def per_category_table(
    summary_spair: pd.DataFrame,
    label: str,
    alpha: float = 0.1,
    matching: str = "kernel_softmax",
    paper_row: str | None = None,
    protocol: RowProtocol | None = None,
) -> pd.DataFrame:
    """Table 2 layout: PCK per SPair-71k category (Aero ... TV) + All; ``paper_row`` adds paper, delta rows.

    Categories absent from the summary (e.g. a demo subset) are NaN; the "All" row is required. ``protocol``:
    how our numbers were obtained (default: the squashed frame, per image).
    """
    protocol = RowProtocol.coerce(protocol)
    quoted = None if paper_row is None else _paper_table2_for_alpha(paper_row, alpha)
    ours: dict[str, Any] = _label_row(label, "ours", matching, protocol)
    ours |= _ours_per_category(summary_spair, matching, alpha, estimator=protocol.estimator)
    short_names = spair_short_names()
    columns = [*short_names.values(), ALL_CATEGORY]
    rows = [ours]
    if quoted is not None:
        paper: dict[str, Any] = _paper_label_row(quoted, "table2")
        paper |= {short: float(quoted["pck"][category]) for category, short in short_names.items()}
        paper[ALL_CATEGORY] = float(quoted["pck"][ALL_CATEGORY])
        rows += [paper, _delta_row(ours, paper, columns)]
    return pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *arranged_columns(columns, rows)])


# ----------------------------------------------------------------------------------------------------------
# SD4Match rows of Tables 2 and 3
# ----------------------------------------------------------------------------------------------------------

PAPER_ROW_OF_KIND = {"single": "SD4Match-Single", "class": "SD4Match-Class", "cpm": "SD4Match-CPM"}
TRAIN_SET_NAMES = {"spair": "SPair-71k", "pfpascal": "PF-Pascal"}


def variant_label(kind: str, variant: str) -> str:
    """A prompt variant's row label: the paper's name ("SD4Match-CPM"), with the variant name when it is not
    the kind itself (an ablation, e.g. "SD4Match-CPM [cpm_no_gn]")."""
    name = PAPER_ROW_OF_KIND[kind]
    return name if variant == kind else f"{name} [{variant}]"


def _paper_row_for(kind: str, default_cpm: bool) -> str | None:
    """The paper row a configured variant reproduces (None for ablation variants the tables do not hold)."""
    if kind == "cpm" and not default_cpm:
        return None
    return PAPER_ROW_OF_KIND[kind]


def table2_sd4match(
    summaries: dict[str, pd.DataFrame], kinds: dict[str, str], matching: str, default_cpm: set[str]
) -> pd.DataFrame:
    """Table 2 SD4Match rows (SPair-tuned, SPair test, PCK@0.1 per category): ours, paper, delta."""
    frames = []
    for variant, summary in summaries.items():
        paper_row = _paper_row_for(kinds[variant], variant in default_cpm)
        label = variant_label(kinds[variant], variant)
        frames.append(per_category_table(summary, label, 0.1, matching, paper_row=paper_row))
    return pd.concat(frames, ignore_index=True)


def table3_sd4match(
    summaries: dict[tuple[str, str], dict[str, pd.DataFrame]],
    kinds: dict[str, str],
    matching: str,
    default_cpm: set[str],
) -> pd.DataFrame:
    """Table 3 SD4Match rows: each (training set, variant) on PF-Pascal, PF-Willow and SPair-71k."""
    frames = []
    for (trainset, variant), per_dataset in summaries.items():
        kind = kinds[variant]
        label = f"{variant_label(kind, variant)} (tuned on {TRAIN_SET_NAMES[trainset]})"
        paper_row = _paper_row_for(kind, variant in default_cpm)
        frames.append(
            zero_shot_table(per_dataset, label, matching, paper_row=paper_row, paper_trained_on=trainset)
        )
    return pd.concat(frames, ignore_index=True)


PAPER_CPM = {"condition": "pair", "features": "local", "global_prompt": True, "use_gn": True}


def paper_cpm_variants(variants: dict[str, dict[str, Any]]) -> set[str]:
    """Configured CPM variants with the paper's default design (the others are Fig. 3a ablations)."""
    return {
        name
        for name, cfg in variants.items()
        if cfg["kind"] == "cpm" and all(cfg.get(key, value) == value for key, value in PAPER_CPM.items())
    }


# ----------------------------------------------------------------------------------------------------------
# The full paper tables: Table 1, and Tables 2/3 with every row, groups Z / I / K and best-in-group marks
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Table2Entry:
    """One method we compute, as a row of the full Table 2: group (Z/I/K), SPair-71k summary, matching,
    and the paper's Table 2 row it reproduces (None: no paper row, e.g. an ablation)."""

    group: str
    summary: pd.DataFrame
    matching: str
    paper_row: str | None = None
    method: str | None = None  # the row's label when it differs from the entry's key
    source: str = "ours"  # or RELEASED_SOURCE: the authors' released prompt, evaluated by this pipeline
    seeds: pd.DataFrame | None = None  # spread across the run's seeds (uncertainty.seed_spread), > 1 seed
    protocol: RowProtocol | None = None  # how the numbers were obtained (None: the squashed frame, per image)


@dataclass
class Table3Entry:
    """One method we compute, as a row of the full Table 3: group, summaries per test set, matching, the
    paper's Table 3 row and its training set (None for zero-shot; "pfpascal" or "spair")."""

    group: str
    summaries: dict[str, pd.DataFrame]
    matching: str
    paper_row: str | None = None
    trained_on: str | None = None
    method: str | None = None  # the row's label when it differs from the entry's key (one per training set)
    source: str = "ours"  # or RELEASED_SOURCE: the authors' released prompt, evaluated by this pipeline
    seeds: dict[str, pd.DataFrame] | None = None  # per test set, the spread across the run's seeds (> 1)
    protocol: RowProtocol | None = None  # how the numbers were obtained (None: the squashed frame, per image)


def _label_row(
    method: str, source: str, matching: str = "", protocol: RowProtocol | None = None
) -> dict[str, Any]:
    """The label cells (method, matching, source, pck, protocol) of one of our rows (``protocol``, default
    the squashed frame per image) or of a quoted literature row (its paper's own convention)."""
    if source == QUOTED_SOURCE:
        return {"method": method, "matching": matching, "source": source, "pck": QUOTED_PCK,
                "protocol": AS_REPORTED}  # fmt: skip
    protocol = RowProtocol.coerce(protocol)
    return {"method": method, "matching": matching, "source": source, "pck": protocol.pck,
            "protocol": protocol.protocol}  # fmt: skip


def _paper_label_row(row: dict, table: str) -> dict[str, Any]:
    """The label cells of a row of the paper's ``table`` (table1/2/3): the SD4Match paper's number of a method
    we compute (``paper``, with what is known of how it was measured, ``table_protocols.paper_protocol``) or a
    quoted literature number (``quoted``, as reported)."""
    if not row.get("computed_by_us", True):
        return _label_row(row["name_in_paper"], QUOTED_SOURCE)
    protocol, pck = paper_protocol(row["method"], table)
    return {
        "method": row["name_in_paper"],
        "matching": "",
        "source": "paper",
        "pck": pck,
        "protocol": protocol,
    }


def _check_matching(matching: str, where: str) -> None:
    """Raise if ``matching`` is not one of the matching methods."""
    if matching not in MATCHING_METHODS:
        raise ValueError(f"{where}: unknown matching method {matching!r}; expected one of {MATCHING_METHODS}")


def table1(
    summaries: dict[tuple[str, str], pd.DataFrame],
    matching: str = "nn",
    protocols: dict[tuple[str, str], RowProtocol | dict] | None = None,
) -> pd.DataFrame:
    """Table 1: SPair-71k PCK@0.1 ("All", per image) of DIFT and SD+DINO* per prompt type: ours, paper, delta.

    ``summaries`` maps (row, prompt) -> SPair-71k summary, row in {"DIFT", "SD+DINO*"}, prompt in
    {"empty", "template", "implicit"}; cells not given (DIFT x implicit is "-" in the paper) are NaN.
    Nearest-neighbour matching by default, as the zero-shot peers use. ``protocols``: the same keys -> how
    each cell was obtained (default: the squashed frame); the cells of one row must share their protocol.
    """
    spec = load_paper_tables()["table1"]
    _check_matching(matching, "table1")
    headers = dict(spec["prompts"])
    for row, prompt in summaries:
        if row not in TABLE1_ROWS or prompt not in headers:
            raise ValueError(
                f"table1: unknown key ({row!r}, {prompt!r}); rows {list(TABLE1_ROWS)}, "
                f"prompts {list(headers)}"
            )
    columns = list(headers.values())
    rows = []
    for quoted in spec["rows"]:
        method = quoted["method"]
        ours = _label_row(method, "ours", matching, _table1_protocol(protocols or {}, method))
        for prompt, header in headers.items():
            summary = summaries.get((method, prompt))
            where = f"spair ({method}, {prompt})"
            if summary is None:
                ours[header] = math.nan
                continue
            ours[header] = summary_pck(summary, ALL_CATEGORY, matching, float(spec["alpha"]), where)
            ours |= bound_cells(header, summary, ALL_CATEGORY, matching, float(spec["alpha"]), where)
        paper = _paper_label_row(quoted, "table1")
        paper |= {headers[p]: math.nan if v is None else float(v) for p, v in quoted["pck"].items()}
        rows += [ours, paper, _delta_row(ours, paper, columns)]
    return pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *arranged_columns(columns, rows)])


def _table1_protocol(protocols: dict[tuple[str, str], RowProtocol | dict], row: str) -> RowProtocol:
    """The one protocol of a Table 1 row's cells (its per-image estimator is the table's)."""
    found = {RowProtocol.coerce(value) for (name, _), value in protocols.items() if name == row} or {OURS}
    if len(found) > 1 or next(iter(found)).estimator != "pck_per_image":
        raise ValueError(
            f"table1: the cells of row {row!r} need one per-image protocol, got {sorted(map(str, found))}"
        )
    return found.pop()


def _as_entry(value: Any, cls: type, label: str, where: str) -> Any:
    """An entry given as a dataclass or as a plain tuple of its fields -> the dataclass."""
    if isinstance(value, cls):
        return value
    if isinstance(value, tuple):
        return cls(*value)
    raise ValueError(f"{where}: entry {label!r} must be a {cls.__name__} or a tuple of its fields")


def _check_entry_row(label: str, group: str, paper: dict | None, groups: dict, where: str) -> None:
    """Raise if an entry's group is unknown, or its paper row is a quoted literature row or in another
    group."""
    if group not in groups:
        raise ValueError(f"{where}: entry {label!r}: unknown group {group!r}; expected one of {list(groups)}")
    if paper is None:
        return
    if not paper["computed_by_us"]:
        raise ValueError(
            f"{where}: entry {label!r}: paper row {paper['method']!r} is a literature number quoted by the "
            "paper (computed_by_us: false); this pipeline does not compute it"
        )
    if paper["group"] != group:
        raise ValueError(
            f"{where}: entry {label!r}: group {group!r} but paper row {paper['method']!r} is in group "
            f"{paper['group']!r}"
        )


def _row_key(row: dict | None) -> tuple[str, str | None] | None:
    """A paper row's identity in Tables 2/3: (method, training set); None for no row."""
    return None if row is None else (row["method"], row.get("trained_on"))


def _assemble_full_table(
    spec_rows: list[dict],
    groups: dict,
    entries: dict[str, Any],
    linked: dict[str, dict | None],
    ours_row: Callable[[str, Any, dict | None], dict[str, Any]],
    paper_row: Callable[[dict], dict[str, Any]],
    columns: list[str],
    seeds_row: Callable[[str, Any, dict[str, Any]], dict[str, Any] | None] = lambda *_: None,
) -> list[dict[str, Any]]:
    """Rows in the paper's order, grouped Z / I / K: each paper row (quoted, or ours [+ seeds] + paper +
    delta for methods we compute, then the released prompt's row and delta), then our rows without a paper
    row at the end of their group. ``seeds_row`` gives the spread across seeds of an entry with several."""
    rows: list[dict[str, Any]] = []

    def ours_rows(label: str, spec: dict | None) -> list[dict[str, Any]]:
        ours = ours_row(label, entries[label], spec)
        spread = seeds_row(label, entries[label], ours)
        return [ours] if spread is None else [ours, spread]

    for group in groups:
        for spec in (row for row in spec_rows if row["group"] == group):
            paper = paper_row(spec)
            mine = [label for label in entries if _row_key(linked[label]) == _row_key(spec)]
            if not mine:
                rows.append(paper)
            for index, label in enumerate(mine):
                computed = ours_rows(label, spec)
                rows += [*computed, paper] if index == 0 else computed
                delta = _delta_row(computed[0], paper, columns)
                if entries[label].source == RELEASED_SOURCE:
                    delta["method"] = "released − paper"
                labels = {k: v for k, v in computed[0].items() if k not in delta and k not in columns}
                rows.append({**_without_companions(labels, columns), **delta, CITATION_COLUMN: ""})
        for label, entry in entries.items():
            if entry.group == group and linked[label] is None:
                rows += ours_rows(label, None)
    return rows


def _without_companions(row: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """A row's label cells only: the numeric columns' companions (bounds, spread) left out."""
    companions = {f"{c}{suffix}" for c in columns for suffix in ("_lo", "_hi", "_sd")}
    return {k: v for k, v in row.items() if k not in companions and k != N_SEEDS}


def mark_best(df: pd.DataFrame, columns: list[str], ranking_sets: pd.Series) -> pd.Series:
    """Per row, the columns (";"-joined, "" for none) where it holds the best value of its ranking set.

    Only ``ours`` and ``quoted`` rows are ranked; values are compared at one decimal (as displayed), so ties
    are all marked; NaN cells never win.
    """
    ranked = df["source"].isin(RANKED_SOURCES)
    marks: dict[Any, list[str]] = {index: [] for index in df.index}
    for key in pd.unique(ranking_sets[ranked]):
        members = df.index[ranked & (ranking_sets == key)]
        for column in columns:
            values = df.loc[members, column].astype(float).round(1)
            if values.notna().any():
                for index in values.index[values == values.max()]:
                    marks[index].append(column)
    return pd.Series([BEST_SEPARATOR.join(marks[index]) for index in df.index], index=df.index, dtype=object)


def table2_full(
    ours: dict[str, Table2Entry | tuple[str, pd.DataFrame, str, str | None]],
) -> pd.DataFrame:
    """The paper's Table 2 (SPair-71k, PCK@0.1 per category + All) with every row, grouped Z / I / K.

    ``ours`` maps a method label to (group, SPair-71k summary, matching, paper row or None). Methods we
    compute get ours + paper + delta rows; literature rows are ``quoted`` with their citation;
    ``best_in_group`` lists the columns where a row is best in its group.
    """
    spec = load_paper_tables()["table2"]
    groups = dict(spec["groups"])
    entries = {label: _as_entry(value, Table2Entry, label, "table2_full") for label, value in ours.items()}
    linked = {
        label: None if entry.paper_row is None else paper_table2_row(entry.paper_row)
        for label, entry in entries.items()
    }
    for label, entry in entries.items():
        _check_entry_row(label, entry.group, linked[label], groups, "table2_full")
    short_names = dict(spec["categories"])
    columns = [*short_names.values(), ALL_CATEGORY]
    alpha = float(spec["alpha"])

    def paper_row(row: dict) -> dict[str, Any]:
        cells = {short: float(row["pck"][category]) for category, short in short_names.items()}
        cells[ALL_CATEGORY] = float(row["pck"][ALL_CATEGORY])
        return {GROUP_COLUMN: row["group"], **_paper_label_row(row, "table2"), **cells,
                CITATION_COLUMN: row["citation"]}  # fmt: skip

    def ours_row(label: str, entry: Table2Entry, row: dict | None) -> dict[str, Any]:
        protocol = RowProtocol.coerce(entry.protocol)
        where = f"spair ({label})"
        cells = _ours_per_category(entry.summary, entry.matching, alpha, where, protocol.estimator)
        labels = _label_row(entry.method or label, entry.source, entry.matching, protocol)
        return {GROUP_COLUMN: entry.group, **labels, **cells,
                CITATION_COLUMN: "" if row is None else row["citation"]}  # fmt: skip

    def seeds_row(label: str, entry: Table2Entry, ours: dict[str, Any]) -> dict[str, Any] | None:
        if entry.seeds is None:
            return None
        cells = _seeds_per_category(entry.seeds, entry.matching, alpha, where=f"spair ({label})")
        return {**_seeds_labels(ours), **cells}

    rows = _assemble_full_table(
        spec["rows"], groups, entries, linked, ours_row, paper_row, columns, seeds_row
    )
    numeric = arranged_columns(columns, rows)
    table = pd.DataFrame(rows, columns=[GROUP_COLUMN, *LABEL_COLUMNS, *numeric, CITATION_COLUMN])
    table[BEST_COLUMN] = mark_best(table, columns, table[GROUP_COLUMN])
    return table


def _seeds_labels(ours: dict[str, Any]) -> dict[str, Any]:
    """The label cells of the seeds row under an ``ours`` row: the same, with source ``seeds``."""
    keep = (GROUP_COLUMN, *LABEL_COLUMNS, TRAINED_ON_COLUMN, CITATION_COLUMN)
    return {k: ours[k] for k in keep if k in ours} | {"source": SEEDS_SOURCE, CITATION_COLUMN: ""}


def _table3_paper_columns() -> list[tuple[str, float, str]]:
    """(dataset, alpha, header) of the paper's Table 3 columns, e.g. ("spair", 0.1, "SPair-71k@0.1")."""
    alphas = load_paper_tables()["table3"]["alphas"]
    return [(d, float(a), _column_name(d, float(a))) for d in DATASET_NAMES for a in alphas[d]]


def _check_table3_entry(label: str, entry: Table3Entry) -> None:
    """Raise if an entry lacks a test-set summary or its training set does not fit its group."""
    missing = [dataset for dataset in DATASET_NAMES if dataset not in entry.summaries]
    if missing:
        raise ValueError(f"table3_full: entry {label!r}: missing summaries for datasets {missing}")
    if entry.trained_on not in (None, *TRAIN_SET_NAMES):
        raise ValueError(
            f"table3_full: entry {label!r}: trained_on {entry.trained_on!r} must be None or one of "
            f"{list(TRAIN_SET_NAMES)}"
        )
    if (entry.group == "Z") != (entry.trained_on is None):
        raise ValueError(
            f"table3_full: entry {label!r}: group {entry.group!r} with trained_on {entry.trained_on!r} "
            "(zero-shot rows have no training set, trained rows need one)"
        )


def _trained_on_name(trained_on: str | None) -> str:
    """The training set as shown in Table 3: "PF-Pascal", "SPair-71k", or "-" for zero-shot."""
    return ZERO_SHOT if trained_on is None else TRAIN_SET_NAMES[trained_on]


def table3_full(
    ours: dict[str, Table3Entry | tuple[str, dict[str, pd.DataFrame], str, str | None, str | None]],
) -> pd.DataFrame:
    """The paper's Table 3 (PF-Pascal / PF-Willow @0.05-0.15, SPair-71k @0.05/0.1) with every row.

    ``ours`` maps a method label to (group, summaries per test set, matching, paper row or None, trained_on).
    Methods we compute get ours + paper + delta rows, literature rows are ``quoted``; ``best_in_group`` marks
    the best per group, where the rows tuned on SPair-71k are ranked only among themselves.
    """
    spec = load_paper_tables()["table3"]
    groups = dict(spec["groups"])
    entries = {label: _as_entry(value, Table3Entry, label, "table3_full") for label, value in ours.items()}
    for label, entry in entries.items():
        _check_table3_entry(label, entry)
    linked = {
        label: None if entry.paper_row is None else paper_table3_row(entry.paper_row, entry.trained_on)
        for label, entry in entries.items()
    }
    for label, entry in entries.items():
        _check_entry_row(label, entry.group, linked[label], groups, "table3_full")
    cells_spec = _table3_paper_columns()
    columns = [header for _, _, header in cells_spec]

    def paper_row(row: dict) -> dict[str, Any]:
        cells = {header: paper_table3_value(row, d, a) for d, a, header in cells_spec}
        return {GROUP_COLUMN: row["group"], **_paper_label_row(row, "table3"),
                TRAINED_ON_COLUMN: _trained_on_name(row["trained_on"]), **cells,
                CITATION_COLUMN: row["citation"]}  # fmt: skip

    def ours_row(label: str, entry: Table3Entry, row: dict | None) -> dict[str, Any]:
        protocol = RowProtocol.coerce(entry.protocol)
        cells: dict[str, Any] = {}
        for d, a, header in cells_spec:
            summary, where = entry.summaries[d], f"{d} ({label})"
            cells[header] = estimator_pck(summary, ALL_CATEGORY, entry.matching, a, where, protocol.estimator)
            cells |= bound_cells(header, summary, ALL_CATEGORY, entry.matching, a, where, protocol.estimator)
        labels = _label_row(entry.method or label, entry.source, entry.matching, protocol)
        return {GROUP_COLUMN: entry.group, **labels,
                TRAINED_ON_COLUMN: _trained_on_name(entry.trained_on), **cells,
                CITATION_COLUMN: "" if row is None else row["citation"]}  # fmt: skip

    def seeds_row(label: str, entry: Table3Entry, ours: dict[str, Any]) -> dict[str, Any] | None:
        if not entry.seeds:
            return None
        cells: dict[str, Any] = {N_SEEDS: min(n_seeds(spread) for spread in entry.seeds.values())}
        for d, a, header in cells_spec:
            spread = entry.seeds.get(d)
            cells |= (
                {header: math.nan}
                if spread is None
                else seed_cells(header, spread, ALL_CATEGORY, entry.matching, a, f"{d} ({label})")
            )
        return {**_seeds_labels(ours), **cells}

    rows = _assemble_full_table(
        spec["rows"], groups, entries, linked, ours_row, paper_row, columns, seeds_row
    )
    label_columns = [GROUP_COLUMN, *LABEL_COLUMNS, TRAINED_ON_COLUMN]
    numeric = arranged_columns(columns, rows)
    table = pd.DataFrame(rows, columns=[*label_columns, *numeric, CITATION_COLUMN])
    ranking_sets = table[GROUP_COLUMN].where(
        table[TRAINED_ON_COLUMN] != SPAIR_TUNED, table[GROUP_COLUMN] + f" (tuned on {SPAIR_TUNED})"
    )
    table[BEST_COLUMN] = mark_best(table, columns, ranking_sets)
    return table


# ----------------------------------------------------------------------------------------------------------
# Building the full tables from the pipeline's summary files (called by the Snakemake table rules)
# ----------------------------------------------------------------------------------------------------------

# The zero-shot methods of Tables 2/3 (config names): the row label, and the paper row a method sits beside
# with a delta. A method is linked only when its protocol is the quoted number's (DIFT's own evaluation,
# sd-dino's own) or that is unknown (DINO, DINOv2: their rows say "unstated"); the 768-frame rows of DIFT and
# SD+DINO, for comparison with SD4Match, are listed without a paper number.
ZERO_SHOT_LABELS = {
    "dino": "DINO",
    "dinov2": "DINOv2",
    "dift_orig": "DIFT",
    "sddino": "SD+DINO",
    "dift": "DIFT",
    "sddino_squashed": "SD+DINO",
}
ZERO_SHOT_PAPER_ROWS = {"dino": "DINO", "dinov2": "DINOv2", "dift_orig": "DIFT", "sddino": "SD+DINO"}


def _read(path: str | os.PathLike[str]) -> pd.DataFrame:
    return pd.read_csv(path)


def released_row_label(variant: str) -> str:
    """The row of the authors' released prompt of a variant kind, e.g. "SD4Match-CPM (authors' released
    prompt)" (its training set is Table 3's ``trained_on`` column)."""
    return f"{PAPER_ROW_OF_KIND[variant]} (authors' released prompt)"


def _evaluation_reader(
    intervals: BootstrapSettings | None, alphas: Sequence[float] | None
) -> Callable[[str | os.PathLike[str], str], pd.DataFrame]:
    """Reads a summary for a table: with ``intervals``, plus the bounds of the cells the table prints (one
    matching method at ``alphas``) from the per-pair CSV beside it."""

    def read(path: str | os.PathLike[str], matching: str) -> pd.DataFrame:
        return read_evaluation(path, intervals, [matching], alphas)

    return read


def _zero_shot_entry(method: str, protocols: dict[str, Any], zero_shot_matching: str) -> dict[str, Any]:
    """Table2Entry / Table3Entry fields of a zero-shot method: label, paper row, protocol and matching (the
    one its protocol fixes, else the tables' zero-shot matching)."""
    if method not in ZERO_SHOT_LABELS:
        raise ValueError(f"zero-shot method {method!r} has no table row; known: {sorted(ZERO_SHOT_LABELS)}")
    protocol = RowProtocol.coerce(protocols.get(method))
    return {
        "matching": protocol.matching or zero_shot_matching,
        "paper_row": ZERO_SHOT_PAPER_ROWS.get(method),
        "method": ZERO_SHOT_LABELS[method],
        "protocol": protocol,
    }


def zero_shot_protocols(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{method: RowProtocol.to_dict()}`` of configured zero-shot methods, for the table rules' params."""
    return {name: method_row_protocol(method).to_dict() for name, method in methods.items()}


def zero_shot_dift_table(
    summaries: dict[str, dict[str, pd.DataFrame]],
    protocols: dict[str, Any],
    matching: str,
    other_matchings: tuple[str, ...] = (),
) -> pd.DataFrame:
    """The zero-shot DIFT table (Table 3 layout): for each DIFT method in order (``dift_orig``, ``dift``),
    ours (+ per keypoint), with the paper's row and the delta only where the protocol is the quoted number's
    (``ZERO_SHOT_PAPER_ROWS``); the other matchings where the protocol leaves the matching open."""
    frames = []
    for method, per_dataset in summaries.items():
        fields = _zero_shot_entry(method, protocols, matching)
        protocol = fields["protocol"]
        others = () if protocol.matching else tuple(m for m in other_matchings if m != fields["matching"])
        frames.append(
            zero_shot_table(
                per_dataset,
                fields["method"],
                fields["matching"],
                fields["paper_row"],
                per_keypoint=True,
                other_matchings=others,
                protocol=protocol,
            )  # fmt: skip
        )
    if not frames:
        raise ValueError("zero_shot_dift_table: no DIFT summaries")
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class TableSources:
    """The evaluations a results table (Table 2, Table 3) is built from and how each is scored: zero-shot
    summaries by method (Table 3: ``<method>/<dataset>``) with their ``zero_shot_protocols`` (default: the
    squashed frame), SD4Match summaries by variant (Table 3: ``<trainset>/<variant>/<dataset>``) with the
    variants' config, the reported matching of ours and of the zero-shot rows, and ``seeds``: same keys as
    ``sd4match`` -> {seed: summary} of the runs behind it (a seeds row when there are several)."""

    zero_shot: Mapping[str, str]
    sd4match: Mapping[str, str]
    variants: Mapping[str, Mapping[str, Any]]
    matching: str
    zero_shot_matching: str
    zero_shot_protocols: Mapping[str, Any] | None = None
    seeds: Mapping[str, Mapping[int, str]] | None = None

    @classmethod
    def from_rule(cls, params: Any) -> TableSources:
        """From a table rule's params of the same names."""
        return cls(
            params.zero_shot,
            params.sd4match,
            params.variants,
            params.matching,
            params.zero_shot_matching,
            params.zero_shot_protocols,
            params.seeds,
        )

    def zero_shot_fields(self, method: str) -> dict[str, Any]:
        """A zero-shot method's row fields: label, matching and protocol (``_zero_shot_entry``)."""
        return _zero_shot_entry(method, dict(self.zero_shot_protocols or {}), self.zero_shot_matching)

    def seed_paths(self, key: str) -> Mapping[int, str] | None:
        """The seed runs behind SD4Match summary ``key`` (None: one run)."""
        return (self.seeds or {}).get(key)


def table2_from_files(
    sources: TableSources,
    intervals: BootstrapSettings | None = None,
    released: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Full Table 2 from summary files: zero-shot methods (keys of ZERO_SHOT_LABELS) and SPair-tuned SD4Match
    variants (the paper's CPM design maps to its CPM row; ablations get no paper row).

    ``intervals``: bootstrap every printed cell from the per-pair CSV beside its summary; ``released``:
    variant kind -> the SPair-71k summary of the authors' released prompt tuned on SPair-71k (a row beside
    ours and the paper's).
    """
    read = _evaluation_reader(intervals, [float(load_paper_tables()["table2"]["alpha"])])
    matching, variants = sources.matching, sources.variants
    paper_cpm = paper_cpm_variants(dict(variants))
    entries: dict[str, Table2Entry] = {}
    for method, path in sources.zero_shot.items():
        fields = sources.zero_shot_fields(method)
        entries[method] = Table2Entry("Z", read(path, fields["matching"]), **fields)
    for variant, path in sources.sd4match.items():
        kind = variants[variant]["kind"]
        paper_row = _paper_row_for(kind, variant in paper_cpm)
        spread = read_seed_spread(sources.seed_paths(variant))
        entries[variant_label(kind, variant)] = Table2Entry(
            "K", read(path, matching), matching, paper_row, seeds=spread
        )
    for variant, path in sorted(
        (released or {}).items(), key=lambda item: list(PAPER_ROW_OF_KIND).index(item[0])
    ):
        entries[released_row_label(variant)] = Table2Entry(
            "K", read(path, matching), matching, PAPER_ROW_OF_KIND[variant], source=RELEASED_SOURCE
        )
    return table2_full(entries)


def table3_from_files(
    sources: TableSources,
    runs: list[tuple[str, str]],
    intervals: BootstrapSettings | None = None,
    released: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Full Table 3 from summary files keyed ``<method>/<dataset>`` (zero-shot, in the given order) and
    ``<trainset>/<variant>/<dataset>`` (the SD4Match ``runs``, evaluated on all three test sets).

    ``intervals`` as in ``table2_from_files``; ``released`` (keys ``<trainset>/<variant kind>/<dataset>``):
    the authors' released prompts; those evaluated on the three test sets get a row beside ours and the
    paper's."""
    read = _evaluation_reader(intervals, None)
    matching, variants, zero_shot = sources.matching, sources.variants, sources.zero_shot
    paper_cpm = paper_cpm_variants(dict(variants))
    entries: dict[str, Table3Entry] = {}
    for method in dict.fromkeys(key.split("/")[0] for key in zero_shot):
        fields = sources.zero_shot_fields(method)
        summaries = {d: read(zero_shot[f"{method}/{d}"], fields["matching"]) for d in DATASET_NAMES}
        entries[method] = Table3Entry("Z", summaries, **fields)
    for trainset, variant in runs:
        kind = variants[variant]["kind"]
        keys = {d: f"{trainset}/{variant}/{d}" for d in DATASET_NAMES}
        summaries = {d: read(sources.sd4match[key], matching) for d, key in keys.items()}
        spread = {d: read_seed_spread(sources.seed_paths(key)) for d, key in keys.items()}
        label = variant_label(kind, variant)
        paper_row = _paper_row_for(kind, variant in paper_cpm)
        entries[f"{label} ({trainset})"] = Table3Entry(
            "K", summaries, matching, paper_row, trained_on=trainset, method=label,
            seeds={d: frame for d, frame in spread.items() if frame is not None} or None,
        )  # fmt: skip
    for (trainset, variant), paths in _released_runs(released or {}).items():
        label = released_row_label(variant)
        entries[f"{label} ({trainset})"] = Table3Entry(
            "K", {d: read(path, matching) for d, path in paths.items()}, matching, PAPER_ROW_OF_KIND[variant],
            trained_on=trainset, method=label, source=RELEASED_SOURCE,
        )  # fmt: skip
    return table3_full(entries)


# ----------------------------------------------------------------------------------------------------------
# Custom datasets (issue 11): every method the DAG evaluates on a dataset of the user's own
# ----------------------------------------------------------------------------------------------------------

THRESHOLD_DESCRIPTIONS = {
    "bbox": "max side of the target bounding box",
    "img": "the image size S",
    "kps": "max extent of the target keypoints",
}
CUSTOM_ALPHA = 0.1  # the per-category columns


@dataclass
class CustomEntry:
    """One method evaluated on a custom dataset: its row label, training set (None: zero-shot), the seed of
    a tuned prompt (None: zero-shot), the matching method reported and the summary file's frame."""

    method: str
    trained_on: str | None
    seed: int | None
    matching: str
    summary: pd.DataFrame


def _custom_column(alpha: float, column: str) -> str:
    """e.g. ``PCK@0.1 per image``."""
    return f"PCK@{alpha:g} {PCK_VARIANTS[column]}"


def custom_table(entries: list[CustomEntry], alphas: tuple[float, ...], name: str) -> pd.DataFrame:
    """One row per method on the custom dataset ``name``: PCK per image and per keypoint at each alpha, then
    PCK@0.1 per image of each category when there are several (in %, from the summaries' ``All`` rows); each
    cell with its bootstrap interval when the summaries carry bounds (``custom_entries_from_files``)."""
    if not entries:
        raise ValueError(f"custom_table {name}: no methods to list")
    categories = sorted(set(entries[0].summary["category"]) - {ALL_CATEGORY})
    columns = [_custom_column(alpha, column) for column in PCK_VARIANTS for alpha in alphas]
    if len(categories) > 1:
        columns += [f"{category}@{CUSTOM_ALPHA:g}" for category in categories]
    rows = []
    for entry in entries:
        where = f"{name} / {entry.method}"
        _check_matching(entry.matching, where)
        trained = "-" if entry.trained_on is None else TRAIN_SET_NAMES.get(entry.trained_on, entry.trained_on)
        row: dict[str, Any] = {
            **_label_row(entry.method, "ours", entry.matching),
            TRAINED_ON_COLUMN: trained,
            "seed": "-" if entry.seed is None else str(entry.seed),
        }
        cells = [(_custom_column(a, kind), ALL_CATEGORY, a, kind) for kind in PCK_VARIANTS for a in alphas]
        if len(categories) > 1:
            cells += [(f"{c}@{CUSTOM_ALPHA:g}", c, CUSTOM_ALPHA, "pck_per_image") for c in categories]
        for header, category, alpha, kind in cells:
            row[header] = summary_pck(entry.summary, category, entry.matching, alpha, where, kind)
            row |= bound_cells(header, entry.summary, category, entry.matching, alpha, where, kind)
        rows.append(row)
    labels = [*LABEL_COLUMNS, TRAINED_ON_COLUMN, "seed"]
    return pd.DataFrame(rows, columns=[*labels, *arranged_columns(columns, rows)])


def custom_entries_from_files(
    zero_shot: dict[str, str],
    sd4match: dict[str, str],
    variants: dict[str, dict[str, Any]],
    matching: str,
    zero_shot_matching: str,
    intervals: BootstrapSettings | None = None,
    alphas: Sequence[float] | None = None,
) -> list[CustomEntry]:
    """Entries of the custom table from summary files keyed ``<method>`` (zero-shot) and
    ``<trainset>/<variant>/<seed>`` (tuned prompts, every seed); with ``intervals``, each summary carries
    the bootstrap bounds of the cells the table prints (its matching at ``alphas`` and the per-category
    alpha), from the per-pair CSV beside it."""
    cell_alphas = None if alphas is None else sorted({*map(float, alphas), CUSTOM_ALPHA})

    def read(path: str, method: str) -> pd.DataFrame:
        return read_evaluation(path, intervals, [method], cell_alphas)

    entries = [
        CustomEntry(ZERO_SHOT_LABELS.get(m, m), None, None, zero_shot_matching, read(p, zero_shot_matching))
        for m, p in zero_shot.items()
    ]
    for key, path in sd4match.items():
        trainset, variant, seed = key.split("/")
        label = variant_label(variants[variant]["kind"], variant)
        entries.append(CustomEntry(label, trainset, int(seed), matching, read(path, matching)))
    return entries


def custom_title(name: str, threshold: str, pairs_note: str) -> str:
    """Title of a custom dataset's table: its name, PCK threshold and the pairs it holds."""
    note = f"; {pairs_note.removeprefix('Pairs: ').rstrip('.')}" if pairs_note else ""
    return f"Custom dataset {name}: PCK, θ = {THRESHOLD_DESCRIPTIONS[threshold]}{note}"


def _released_runs(released: Mapping[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    """Released prompts evaluated on all three test sets: (trainset, variant kind) -> {dataset: summary},
    in the paper's order (PF-Pascal-tuned first, then Single, Class, CPM)."""
    runs: dict[tuple[str, str], dict[str, str]] = {}
    for key, path in released.items():
        trainset, variant, dataset = key.split("/")
        runs.setdefault((trainset, variant), {})[dataset] = path
    complete = {run: paths for run, paths in runs.items() if set(paths) == set(DATASET_NAMES)}
    order = [*TRAIN_SET_NAMES], [*PAPER_ROW_OF_KIND]
    return dict(
        sorted(complete.items(), key=lambda item: (order[0].index(item[0][0]), order[1].index(item[0][1])))
    )
