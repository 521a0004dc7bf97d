"""Snakemake adapter: the full Table 3 (generalisation over PF-Pascal, PF-Willow and SPair-71k) with
intervals, seed spreads and the authors' released prompts."""

from sd4match.logs import log_to
from sd4match.provenance import build_provenance
from sd4match.released_tables import released_for_tables
from sd4match.reporting import TableSources, table3_from_files
from sd4match.table_writing import write_table
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    runs = [tuple(run) for run in p.runs]
    _, released = released_for_tables(i.released)
    table = table3_from_files(TableSources.from_rule(p), runs, intervals=settings, released=released)
    prov = build_provenance(record_paths=i.models, **p.provenance)
    write_table(
        table,
        o.csv,
        o.md,
        title="Table 3 — generalisation, PCK per image",
        prov=prov,
        html_path=o.html,
        caption_path=o.caption,
        notes=table_notes(i.pairs, settings, p.max_pairs),
    )
