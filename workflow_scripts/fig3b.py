"""Snakemake adapter: Fig. 3b (PCK@0.1 by timestep) plot and table."""

from sd4match.io import write_text_atomic
from sd4match.logs import log_to
from sd4match.paper_figures import make_fig3b
from sd4match.provenance import build_provenance
from sd4match.reporting import html_document, write_caption

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    prov = build_provenance(record_paths=i.models, **p.provenance)
    matching = (p.matching["sd4match"], p.matching["baseline"])
    table = make_fig3b(p.sd4match, p.baseline, tuple(p.labels), matching, o.png, o.pdf, o.csv, o.md, prov)
    write_text_atomic(o.html, html_document(table, "Fig. 3b — PCK@0.1 on SPair-71k by timestep", prov))
    write_caption(o.caption, prov)
