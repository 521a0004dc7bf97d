"""Snakemake adapter: the full Table 2 (SPair-71k per category, PCK@0.1, groups Z / I / K) with intervals,
seed spreads and the authors' released prompts, and its companion table of paired differences."""

from sd4match.logs import log_to
from sd4match.provenance import build_provenance
from sd4match.released_tables import released_for_tables
from sd4match.reporting import TableSources, table2_from_files
from sd4match.table_writing import write_table
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import PAIRED_NOTE, paired_table, table2_comparisons, table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    released, _ = released_for_tables(i.released)
    sources = TableSources.from_rule(p)
    table = table2_from_files(sources, intervals=settings, released=released)
    prov = build_provenance(record_paths=i.models, **p.provenance)
    notes = table_notes(i.pairs, settings, p.max_pairs)
    title = "Table 2 — SPair-71k PCK@0.1 per category"
    write_table(table, o.csv, o.md, title, prov, html_path=o.html, caption_path=o.caption, notes=notes)
    write_table(
        paired_table(table2_comparisons(sources), settings),
        o.paired_csv,
        o.paired_md,
        "Table 2 — paired differences on SPair-71k, PCK@0.1 per category",
        prov,
        html_path=o.paired_html,
        caption_path=o.paired_caption,
        notes=[PAIRED_NOTE, *notes],
    )
