"""Tables in the SD4Match paper's layout: our PCK beside the paper's quoted numbers and the difference.

The paper's numbers live in the package data file ``sd4match/reference/paper_tables.yaml`` (Tables 1-3
and Fig. 3a, transcribed exactly). Our numbers come from the per-dataset "summary" frames of
``metrics.summarise``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from sd4match.io import write_json_atomic, write_table_atomic, write_text_atomic

# Table 3 layout: dataset key -> the paper's name, and the alphas we report for each dataset.
DATASET_NAMES = {"pfpascal": "PF-Pascal", "pfwillow": "PF-Willow", "spair": "SPair-71k"}
TABLE3_ALPHAS = (0.05, 0.1, 0.15)
MATCHING_METHODS = ("nn", "soft_argmax", "kernel_softmax")
SUMMARY_COLUMNS = ("category", "method", "alpha", "n_pairs", "n_kps", "pck_per_image", "pck_per_keypoint")
ALL_CATEGORY = "All"
PCK_VARIANT = "per image"
PCK_VARIANTS = {"pck_per_image": "per image", "pck_per_keypoint": "per keypoint"}
LABEL_COLUMNS = ("method", "source", "pck")

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


def _column_name(dataset: str, alpha: float) -> str:
    """Table 3 column header, e.g. ``PF-Pascal@0.05``."""
    return f"{DATASET_NAMES[dataset]}@{alpha:g}"


def table3_columns() -> list[str]:
    """The numeric columns of the Table 3 layout, in the paper's order."""
    return [_column_name(dataset, alpha) for dataset in DATASET_NAMES for alpha in TABLE3_ALPHAS]


def _delta_row(ours: dict[str, Any], paper: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """ours - paper per numeric column (NaN where either is missing)."""
    row: dict[str, Any] = {"method": "ours − paper", "source": "delta", "pck": PCK_VARIANT}
    for column in columns:
        row[column] = ours[column] - paper[column]
    return row


def zero_shot_table(
    summaries: dict[str, pd.DataFrame],
    method_label: str = "DIFT",
    matching: str = "kernel_softmax",
    paper_row: str | None = "DIFT",
    paper_trained_on: str | None = None,
    per_keypoint: bool = False,
    other_matchings: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Table 3 layout: rows ours / paper / delta on PF-Pascal, PF-Willow, SPair-71k @ 0.05/0.1/0.15.

    ``summaries`` maps "pfpascal", "pfwillow", "spair" to a summary frame; ``paper_row=None`` gives ours only.
    ``per_keypoint`` adds our per-keypoint row; ``other_matchings`` adds our rows for other matching methods.
    """
    unknown = sorted(set(summaries) - set(DATASET_NAMES))
    if unknown:
        raise ValueError(f"zero_shot_table: unknown dataset keys {unknown}; expected {sorted(DATASET_NAMES)}")
    for dataset in DATASET_NAMES:
        if dataset not in summaries:
            raise ValueError(f"zero_shot_table: missing summary for dataset {dataset!r}")
    columns = table3_columns()
    ours = _ours_table3_row(summaries, f"{method_label} ({matching})", matching, "pck_per_image")
    rows = [ours]
    if paper_row is not None:
        quoted = paper_table3_row(paper_row, paper_trained_on)
        paper: dict[str, Any] = {"method": quoted["name_in_paper"], "source": "paper", "pck": PCK_VARIANT}
        for dataset in DATASET_NAMES:
            for alpha in TABLE3_ALPHAS:
                paper[_column_name(dataset, alpha)] = paper_table3_value(quoted, dataset, alpha)
        rows += [paper, _delta_row(ours, paper, columns)]
    if per_keypoint:
        rows.append(_ours_table3_row(summaries, f"{method_label} ({matching})", matching, "pck_per_keypoint"))
    for other in other_matchings:
        rows.append(_ours_table3_row(summaries, f"{method_label} ({other})", other, "pck_per_image"))
    return pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *columns])


def _ours_table3_row(summaries: dict[str, pd.DataFrame], label: str, matching: str, column: str) -> dict:
    """One row of our numbers in the Table 3 layout (per image or per keypoint)."""
    row: dict[str, Any] = {"method": label, "source": "ours", "pck": PCK_VARIANTS[column]}
    for dataset in DATASET_NAMES:
        for alpha in TABLE3_ALPHAS:
            row[_column_name(dataset, alpha)] = summary_pck(
                summaries[dataset], ALL_CATEGORY, matching, alpha, where=dataset, column=column
            )
    return row


def _paper_table2_for_alpha(paper_row: str, alpha: float) -> dict:
    """The Table 2 row of ``paper_row``; raise if ``alpha`` is not the table's alpha (0.1)."""
    table2_alpha = float(load_paper_tables()["table2"]["alpha"])
    if not math.isclose(alpha, table2_alpha):
        raise ValueError(f"per_category_table: paper Table 2 is at alpha={table2_alpha:g}, not {alpha:g}")
    return paper_table2_row(paper_row)


def _ours_per_category(summary_spair: pd.DataFrame, matching: str, alpha: float) -> dict[str, float]:
    """Our PCK per image keyed by the paper's short category names + All (NaN for absent categories)."""
    short_names = spair_short_names()
    _check_summary(summary_spair, "spair")
    present = set(summary_spair["category"])
    unknown = sorted(present - set(short_names) - {ALL_CATEGORY})
    if unknown:
        raise ValueError(f"summary spair: unknown categories {unknown}; expected SPair-71k categories")
    cells = {
        short: summary_pck(summary_spair, category, matching, alpha, "spair")
        if category in present
        else math.nan
        for category, short in short_names.items()
    }
    cells[ALL_CATEGORY] = summary_pck(summary_spair, ALL_CATEGORY, matching, alpha, "spair")
    return cells


def per_category_table(
    summary_spair: pd.DataFrame,
    label: str,
    alpha: float = 0.1,
    matching: str = "kernel_softmax",
    paper_row: str | None = None,
) -> pd.DataFrame:
    """Table 2 layout: PCK per SPair-71k category (Aero ... TV) + All; ``paper_row`` adds paper, delta rows.

    Categories absent from the summary (e.g. a demo subset) are NaN; the "All" row is required.
    """
    quoted = None if paper_row is None else _paper_table2_for_alpha(paper_row, alpha)
    ours: dict[str, Any] = {"method": f"{label} ({matching})", "source": "ours", "pck": PCK_VARIANT}
    ours |= _ours_per_category(summary_spair, matching, alpha)
    short_names = spair_short_names()
    columns = [*short_names.values(), ALL_CATEGORY]
    rows = [ours]
    if quoted is not None:
        paper: dict[str, Any] = {"method": quoted["name_in_paper"], "source": "paper", "pck": PCK_VARIANT}
        paper |= {short: float(quoted["pck"][category]) for category, short in short_names.items()}
        paper[ALL_CATEGORY] = float(quoted["pck"][ALL_CATEGORY])
        rows += [paper, _delta_row(ours, paper, columns)]
    return pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *columns])


# ----------------------------------------------------------------------------------------------------------
# Writing: CSV + provenance sidecar + Markdown
# ----------------------------------------------------------------------------------------------------------


def _check_provenance(prov: Provenance) -> None:
    """Raise if a model record lacks id / revision_requested / revision_resolved."""
    for name, record in prov.models.items():
        missing = [key for key in PROVENANCE_MODEL_KEYS if key not in record]
        if missing:
            raise ValueError(
                f"provenance: model {name!r} misses keys {missing} (expected {PROVENANCE_MODEL_KEYS})"
            )


def protocol_description(image_size: int) -> str:
    """One line naming the frame of the PCK protocol (the paper uses S = 768)."""
    note = "as in the paper" if image_size == 768 else "the paper uses 768"
    return (
        f"keypoints and boxes rescaled anisotropically to the squashed {image_size}×{image_size} frame "
        f"({note}), "
        "then clamped inside the image"
    )


def provenance_header(prov: Provenance) -> str:
    """Markdown lines stating the PCK protocol, models/revisions, config hash, code version, demo warning."""
    _check_provenance(prov)
    lines = []
    if prov.demo:
        lines += [DEMO_WARNING, ""]
    lines += [
        f"- Protocol: {prov.protocol}; a keypoint is correct if its error ≤ α·θ.",
        "- Thresholds θ: SPair-71k = max(w, h) of the target bounding box; PF-Pascal = image size (S); "
        "PF-Willow = max extent (x or y range) of the target keypoints.",
        "- PCK per image: PCK of each pair, then the mean over all pairs (per-keypoint averages differ).",
        "- Models:",
    ]
    for name, record in sorted(prov.models.items()):
        lines.append(
            f"  - {name}: `{record['id']}` revision requested `{record['revision_requested']}`, "
            f"resolved `{record['revision_resolved']}`"
        )
    lines += [f"- Config hash: `{prov.config_hash}`", f"- Code version: `{prov.code_version}`"]
    return "\n".join(lines)


def _format_cell(value: Any, signed: bool) -> str:
    """A Markdown cell: floats to 1 decimal ("-" for NaN, a sign for deltas), anything else as text."""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """Render a table as a Markdown pipe table with numbers to 1 decimal (delta rows signed, NaN as "-")."""
    header = "| " + " | ".join(str(column) for column in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = []
    for _, row in df.iterrows():
        signed = row.get("source") == "delta"
        body.append("| " + " | ".join(_format_cell(row[column], signed) for column in df.columns) + " |")
    return "\n".join([header, rule, *body])


LEGEND = (
    "Legend: `ours` = this pipeline (PCK in %, per image); `paper` = the number quoted by the SD4Match paper "
    "(its own evaluation convention); `delta` = ours − paper; `-` = not reported."
)


def provenance_sidecar_path(csv_path: str | os.PathLike[str]) -> Path:
    """The JSON provenance file written beside a CSV table: ``<csv>.provenance.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name + ".provenance.json")


def write_table(
    df: pd.DataFrame,
    csv_path: str | os.PathLike[str],
    md_path: str | os.PathLike[str],
    title: str,
    prov: Provenance,
) -> None:
    """Write a table as CSV (+ ``<csv>.provenance.json``) and Markdown (title, provenance, table, legend)."""
    _check_provenance(prov)
    write_table_atomic(df, csv_path)
    sidecar = {
        "title": title,
        "csv": Path(csv_path).name,
        "markdown": Path(md_path).name,
        **dataclasses.asdict(prov),
    }
    write_json_atomic(provenance_sidecar_path(csv_path), sidecar)
    text = "\n\n".join([f"# {title}", provenance_header(prov), markdown_table(df), LEGEND]) + "\n"
    write_text_atomic(md_path, text)


# ----------------------------------------------------------------------------------------------------------
# SD4Match rows of Tables 2 and 3
# ----------------------------------------------------------------------------------------------------------

PAPER_ROW_OF_KIND = {"single": "SD4Match-Single", "class": "SD4Match-Class", "cpm": "SD4Match-CPM"}
TRAIN_SET_NAMES = {"spair": "SPair-71k", "pfpascal": "PF-Pascal"}


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
        label = f"{PAPER_ROW_OF_KIND[kinds[variant]]} [{variant}]"
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
        label = f"{PAPER_ROW_OF_KIND[kind]} [{variant}] (tuned on {TRAIN_SET_NAMES[trainset]})"
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
