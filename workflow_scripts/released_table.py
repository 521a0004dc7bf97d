"""Snakemake adapter: the authors' released prompts in the Table 3 and Table 2 layouts, with intervals."""

from sd4match.logs import log_to
from sd4match.provenance import build_provenance
from sd4match.released_tables import read_released_summaries, released_table2, released_table3
from sd4match.table_writing import write_table
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    summaries = read_released_summaries(i.summaries, settings, p.matching)
    prov = build_provenance(record_paths=i.models, **p.provenance)
    notes = table_notes(i.pairs, settings, p.max_pairs)
    title = "The authors' released prompts evaluated by this pipeline"
    write_table(
        released_table3(summaries, p.matching),
        o.table3_csv,
        o.table3_md,
        f"{title} — Table 3",
        prov,
        notes=notes,
    )
    write_table(
        released_table2(summaries, p.matching),
        o.table2_csv,
        o.table2_md,
        f"{title} — Table 2, SPair-71k",
        prov,
        notes=notes,
    )
