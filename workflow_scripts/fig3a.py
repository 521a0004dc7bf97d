"""Snakemake adapter: Fig. 3a (CPM conditioning ablation) plot and table."""

from sd4match.io import write_text_atomic
from sd4match.logs import log_to
from sd4match.paper_figures import make_fig3a
from sd4match.provenance import build_provenance
from sd4match.reporting import html_document, write_caption

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    prov = build_provenance(record_paths=i.models, **p.provenance)
    table = make_fig3a(p.summary_paths, o.png, o.pdf, o.csv, o.md, p.matching, prov)
    write_text_atomic(
        o.html, html_document(table, "Fig. 3a — CPM conditioning ablation, SPair-71k PCK@0.1", prov)
    )
    write_caption(o.caption, prov)
