"""Snakemake adapter: Table 1 (prompt types x DIFT / SD+DINO* on SPair-71k, PCK@0.1), with intervals."""

from sd4match.logs import log_to
from sd4match.provenance import build_provenance
from sd4match.reporting import table1
from sd4match.table_cells import read_evaluation
from sd4match.table_writing import write_table
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    cells = {key: read_evaluation(path, settings, [p.matching], [0.1]) for key, path in p.cells.items()}
    table = table1(cells, matching=p.matching, protocols=p.protocols)
    prov = build_provenance(record_paths=i.models, **p.provenance)
    write_table(
        table,
        o.csv,
        o.md,
        title=f"Table 1 — prompt types, SPair-71k PCK@0.1 ({p.matching})",
        prov=prov,
        html_path=o.html,
        caption_path=o.caption,
        notes=table_notes(i.pairs, settings, p.max_pairs),
    )
