"""Writing a results table in every form a reader opens: CSV with its provenance sidecar, Markdown (title,
provenance, table, notes, legend), a standalone HTML page and the report caption (RST).

Every form states the PCK protocol, the models and revisions, the config hash and code version, and says so
when the numbers are demo numbers (``Provenance``).
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sd4match.io import write_json_atomic, write_table_atomic, write_text_atomic
from sd4match.reporting import (
    BEST_COLUMN,
    BEST_SEPARATOR,
    CITATION_COLUMN,
    DEMO_NOTE,
    DEMO_WARNING,
    GROUP_COLUMN,
    LABEL_COLUMNS,
    MARKDOWN_HIDDEN_COLUMNS,
    PROVENANCE_MODEL_KEYS,
    QUOTED_SOURCE,
    QUOTED_SUFFIX,
    RELEASED_SOURCE,
    SPAIR_TUNED,
    TRAINED_ON_COLUMN,
    Provenance,
)
from sd4match.table_cells import INSIDE_MARK, cell_text, companion_notes, hidden_columns
from sd4match.table_protocols import PROTOCOL_LEGEND


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


def _best_columns(row: pd.Series) -> set[str]:
    """The columns a row is best-in-group for (from its ``best_in_group`` cell; empty when absent/NaN)."""
    cell = row.get(BEST_COLUMN)
    if not isinstance(cell, str) or not cell:
        return set()
    return set(cell.split(BEST_SEPARATOR))


def shown_columns(df: pd.DataFrame) -> list[str]:
    """The columns a rendering shows: not the citation / best-in-group marks, and not the companions
    (bounds, seed spread, paper marks) that ``table_cells.cell_text`` folds into their cell."""
    hidden = set(MARKDOWN_HIDDEN_COLUMNS) | hidden_columns(list(df.columns))
    return [column for column in df.columns if column not in hidden]


def markdown_table(df: pd.DataFrame) -> str:
    """Render a table as a Markdown pipe table with numbers to 1 decimal (delta rows signed, NaN as "-"),
    each with its interval ``[lo, hi]`` or seed spread ``± sd (n seeds)`` and the paper mark where it has
    them.

    Best-in-group numbers (the ``best_in_group`` column) are bolded, quoted rows are labelled "(quoted)", and
    the ``citation`` / ``best_in_group`` columns are left out (write_table lists the citations below).
    """
    shown = shown_columns(df)
    header = "| " + " | ".join(str(column) for column in shown) + " |"
    rule = "|" + "|".join("---" for _ in shown) + "|"
    body = []
    for _, row in df.iterrows():
        best = _best_columns(row)
        cells = []
        for column in shown:
            cell = cell_text(row, column)
            if column == "method" and row.get("source") == QUOTED_SOURCE:
                cell = dataclasses.replace(cell, value=cell.value + QUOTED_SUFFIX)
            if column in best:
                cell = dataclasses.replace(cell, value=f"**{cell.value}**")
            cells.append(cell.plain())
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *body])


QUOTED_LEGEND = (
    "`quoted` = numbers copied from the SD4Match paper (each row cites its source); "
    "not recomputed by this pipeline."
)
LEGEND = (
    "Legend: `ours` = this pipeline (PCK in %, per image); `paper` = the SD4Match paper's number for a "
    "method this pipeline also computes (its own evaluation convention); `delta` = ours − paper; "
    "`-` = not reported."
    "\n\n" + QUOTED_LEGEND + " Their PCK convention is that of the cited paper (`as reported`)."
)
BEST_NOTE = (
    "**Bold** = best value of the column within the row's group (Z zero-shot, I image-level annotations, "
    "K keypoint annotations), ranked over the `ours` and `quoted` rows at one decimal (ties all bold); "
    "`paper` rows of methods this pipeline computes are not ranked."
)
BEST_NOTE_SPAIR_TUNED = "Rows tuned on SPair-71k are ranked only among themselves."
RELEASED_NOTE = (
    "`released` = the authors' released prompt (pretrained_prompts.zip) imported and evaluated by this "
    "pipeline with the settings of our own rows; its `delta` row is released − paper. Not ranked."
)


def markdown_notes(df: pd.DataFrame) -> list[str]:
    """Markdown paragraphs a table needs below it: the best-in-group rule, the quoted rows' sources, the
    released-prompt rows, what the ``protocol`` column's values mean and what the intervals, marks and seed
    spreads mean."""
    notes = []
    if BEST_COLUMN in df.columns:
        spair_tuned = TRAINED_ON_COLUMN in df.columns and (df[TRAINED_ON_COLUMN] == SPAIR_TUNED).any()
        notes.append(BEST_NOTE + (" " + BEST_NOTE_SPAIR_TUNED if spair_tuned else ""))
    if CITATION_COLUMN in df.columns:
        citations = [c for c in dict.fromkeys(df[CITATION_COLUMN]) if isinstance(c, str) and c]
        if citations:
            notes.append("\n".join(["Sources:", *(f"- {citation}" for citation in citations)]))
    if "source" in df.columns and (df["source"] == RELEASED_SOURCE).any():
        notes.append(RELEASED_NOTE)
    if "protocol" in df.columns:
        notes.append(PROTOCOL_LEGEND)
    return notes + companion_notes(df)


def provenance_sidecar_path(csv_path: str | os.PathLike[str]) -> Path:
    """The JSON provenance file written beside a CSV table: ``<csv>.provenance.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name + ".provenance.json")


def _inline_html(text: str) -> str:
    """Escape ``text`` and turn the Markdown used in notes (**bold**, `code`) into HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


HTML_STYLE = """
.sd4match-table { font-family: system-ui, sans-serif; color: #222; }
.sd4match-table table { border-collapse: collapse; font-size: 0.9em; }
.sd4match-table th, .sd4match-table td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: right; }
.sd4match-table th { background: #eee; }
.sd4match-table td.label { text-align: left; white-space: nowrap; }
.sd4match-table tr.ours { background: #eef6ff; }
.sd4match-table tr.delta { color: #555; font-style: italic; }
.sd4match-table tr.quoted { color: #666; }
.sd4match-table tr.released { background: #f4f0ff; }
.sd4match-table tr.seeds { background: #f5f9ff; font-style: italic; }
.sd4match-table .ci { color: #666; font-size: 0.85em; white-space: nowrap; }
.sd4match-table .paper-in { color: #2a7a2a; }
.sd4match-table .paper-out { color: #b00; }
.sd4match-table .demo { color: #b00; font-weight: bold; }
""".strip()  # scoped: the report's front page embeds these pages


def _html_cell(row: pd.Series, column: str, best: set[str]) -> str:
    """One cell's HTML: the number (bold when best), its interval or seed spread and the paper mark, each in
    its own element so a reader's browser shows the number as a text of its own."""
    cell = cell_text(row, column)
    value = cell.value + (QUOTED_SUFFIX if column == "method" and row.get("source") == QUOTED_SOURCE else "")
    text = html.escape(value)
    if column in best:
        text = f"<strong>{text}</strong>"
    if cell.detail:
        text += f' <span class="ci">{html.escape(cell.detail)}</span>'
    if cell.mark:
        css = "paper-in" if cell.mark == INSIDE_MARK else "paper-out"
        text += f' <span class="{css}">{html.escape(cell.mark)}</span>'
    return text


def html_table_body(df: pd.DataFrame) -> str:
    """The ``<table>`` of a table: same cells as the Markdown (1 decimal, signed deltas, intervals, best in
    bold)."""
    shown = shown_columns(df)
    numeric = {column for column in shown if column not in (*LABEL_COLUMNS, GROUP_COLUMN, TRAINED_ON_COLUMN)}
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in shown)
    body = []
    for _, row in df.iterrows():
        source = str(row.get("source", ""))
        best = _best_columns(row)
        cells = []
        for column in shown:
            text = _html_cell(row, column, best)
            css = "" if column in numeric else ' class="label"'
            cells.append(f"<td{css}>{text}</td>")
        body.append(f'<tr class="{html.escape(source)}">' + "".join(cells) + "</tr>")
    head = f"<thead><tr>{header}</tr></thead>"
    return "\n".join(["<table>", head, "<tbody>", *body, "</tbody>", "</table>"])


def provenance_html(prov: Provenance) -> str:
    """The provenance header (protocol, thresholds, models and revisions, hashes) as HTML."""
    _check_provenance(prov)
    items = []
    for line in provenance_header(prov).splitlines():
        if line.startswith("  - "):
            items.append(f'<li class="model">{_inline_html(line[4:])}</li>')
        elif line.startswith("- "):
            items.append(f"<li>{_inline_html(line[2:])}</li>")
    demo = f'<p class="demo">{_inline_html(DEMO_WARNING)}</p>' if prov.demo else ""
    return demo + '<ul class="provenance">' + "".join(items) + "</ul>"


def html_document(df: pd.DataFrame, title: str, prov: Provenance, notes: Sequence[str] = ()) -> str:
    """A table as a standalone HTML page (title, provenance, the table, notes and legend) for the report;
    ``notes``: the table's own lines (pairs evaluated, how the intervals were computed)."""
    paragraphs = [*markdown_notes(df), *notes]
    notes_html = "".join(f"<p>{_inline_html(note).replace(chr(10), '<br>')}</p>" for note in paragraphs)
    legend = "".join(f"<p>{_inline_html(part)}</p>" for part in LEGEND.split("\n\n"))
    # html/head/body are optional in HTML5: without them the page is also a fragment the report embeds
    return (
        f'<!DOCTYPE html>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{HTML_STYLE}</style>\n"
        f'<div class="sd4match-table"><h2>{html.escape(title)}</h2>\n{provenance_html(prov)}\n'
        f"{html_table_body(df)}\n{notes_html}{legend}</div>\n"
    )


def _rst_literal(text: Any) -> str:
    """``text`` as an RST inline literal (backquotes cannot occur in ids or revisions)."""
    return "``" + str(text).replace("`", "'") + "``"


def _rst_text(text: str) -> str:
    """Plain text in RST: markup characters escaped."""
    return re.sub(r"([\\*`|_])", r"\\\1", text)


def caption_rst(prov: Provenance, notes: Sequence[str] = ()) -> str:
    """The report caption's generated part: demo warning, protocol, ``notes`` (pairs evaluated, interval
    method), models with revisions, hashes."""
    _check_provenance(prov)
    lines = []
    if prov.demo:
        lines += [f"**DEMO RUN**: {DEMO_NOTE}", ""]
    lines += [f"Protocol: {prov.protocol}; a keypoint is correct if its error is at most alpha x theta.", ""]
    for note in notes:
        lines += [_rst_text(note), ""]
    models = [
        f"{name} {_rst_literal(rec['id'])} at {_rst_literal(rec['revision_resolved'])} "
        f"(requested {_rst_literal(rec['revision_requested'])}"
        + (f", {rec['weights']} weights)" if rec.get("weights") else ")")
        for name, rec in sorted(prov.models.items())
    ]
    lines += ["Models: " + "; ".join(models) + "." if models else "Models: none.", ""]
    lines += [f"Config hash {_rst_literal(prov.config_hash)}; code {_rst_literal(prov.code_version)}."]
    return "\n".join(lines) + "\n"


def write_caption(path: str | os.PathLike[str], prov: Provenance, notes: Sequence[str] = ()) -> None:
    """Write the generated caption (RST) that the report's static caption includes."""
    write_text_atomic(path, caption_rst(prov, notes))


def write_table(
    df: pd.DataFrame,
    csv_path: str | os.PathLike[str],
    md_path: str | os.PathLike[str],
    title: str,
    prov: Provenance,
    html_path: str | os.PathLike[str] | None = None,
    caption_path: str | os.PathLike[str] | None = None,
    notes: Sequence[str] = (),
) -> None:
    """Write a table as CSV (+ ``<csv>.provenance.json``) and Markdown (title, provenance, table, notes,
    legend); optionally as a standalone HTML page and the report caption (RST). ``notes``: the table's own
    lines under it (pairs evaluated, how the intervals were computed), in every form."""
    _check_provenance(prov)
    write_table_atomic(df, csv_path)
    sidecar = {
        "title": title,
        "csv": Path(csv_path).name,
        "markdown": Path(md_path).name,
        **dataclasses.asdict(prov),
    }
    write_json_atomic(provenance_sidecar_path(csv_path), sidecar)
    parts = [f"# {title}", provenance_header(prov), markdown_table(df), *markdown_notes(df), *notes, LEGEND]
    text = "\n\n".join(parts) + "\n"
    write_text_atomic(md_path, text)
    if html_path is not None:
        write_text_atomic(html_path, html_document(df, title, prov, notes))
    if caption_path is not None:
        write_caption(caption_path, prov, notes)
