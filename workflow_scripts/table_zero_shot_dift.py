"""Snakemake adapter: the zero-shot DIFT table (paper layout, paper numbers, deltas, protocol per row,
intervals)."""

from sd4match.logs import log_to
from sd4match.provenance import build_provenance
from sd4match.reporting import zero_shot_dift_table
from sd4match.table_cells import read_evaluation
from sd4match.table_writing import write_table
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    summaries = {
        method: {dataset: read_evaluation(path, settings) for dataset, path in paths.items()}
        for method, paths in p.summaries.items()
    }
    others = tuple(m for m in p.matching["methods"] if m != p.reported)
    table = zero_shot_dift_table(summaries, p.protocols, p.reported, others)
    prov = build_provenance(record_paths=i.models, **p.provenance)
    write_table(
        table,
        o.csv,
        o.md,
        title=f"Zero-shot DIFT ({p.reported} matching) — paper Table 3 layout",
        prov=prov,
        html_path=o.html,
        caption_path=o.caption,
        notes=table_notes(i.pairs, settings, p.max_pairs),
    )
