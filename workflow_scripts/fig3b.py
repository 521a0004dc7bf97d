"""Snakemake adapter: Fig. 3b (PCK@0.1 by timestep) plot and table, with the interval of every point and the
spread across seeds."""

import pandas as pd

from sd4match.logs import log_to
from sd4match.paper_figures import TableFigureFiles, TimestepCurves, make_fig3b
from sd4match.provenance import build_provenance
from sd4match.uncertainty import BootstrapSettings
from sd4match.uncertainty_tables import fig3b_uncertainty, table_notes

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    prov = build_provenance(record_paths=i.models, **p.provenance)
    matching = (p.matching["sd4match"], p.matching["baseline"])
    ours, baseline = p.labels
    evaluations = {(ours, int(t)): path for t, path in p.sd4match.items()}
    evaluations |= {(baseline, int(t)): path for t, path in p.baseline.items()}
    seeds = {(ours, int(t)): paths for t, paths in p.seeds.items()}
    notes = table_notes(i.pairs, settings, p.max_pairs)

    def annotate(table: pd.DataFrame) -> pd.DataFrame:
        return fig3b_uncertainty(table, evaluations, settings, seeds=seeds)

    curves = TimestepCurves(p.sd4match, p.baseline, (ours, baseline), matching)
    make_fig3b(curves, TableFigureFiles.from_rule(o), prov, annotate, notes)
