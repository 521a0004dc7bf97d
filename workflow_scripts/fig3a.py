"""Snakemake adapter: Fig. 3a (CPM conditioning ablation) plot and table, with intervals, each case against
case 1 (paired bootstrap) and the spread across seeds."""

import pandas as pd

from sd4match.logs import log_to
from sd4match.paper_figures import TableFigureFiles, make_fig3a
from sd4match.provenance import build_provenance
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import PAIRED_NOTE, fig3a_uncertainty, table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    prov = build_provenance(record_paths=i.models, **p.provenance)
    notes = [*table_notes(i.pairs, settings, p.max_pairs), PAIRED_NOTE]

    def annotate(table: pd.DataFrame) -> pd.DataFrame:
        return fig3a_uncertainty(table, p.summary_paths, p.matching, settings, seeds=p.seed_paths)

    make_fig3a(p.summary_paths, p.matching, TableFigureFiles.from_rule(o), prov, annotate, notes)
