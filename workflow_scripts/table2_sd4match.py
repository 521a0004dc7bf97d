"""Snakemake adapter: Table 2 SD4Match rows (SPair-71k per category, PCK@0.1) with paper numbers."""

import pandas as pd

from sd4match.logs import log_to
from sd4match.provenance import code_version, model_revisions
from sd4match.reporting import (
    Provenance,
    paper_cpm_variants,
    protocol_description,
    table2_sd4match,
    write_table,
)

with log_to(snakemake.log[0]):  # noqa: F821
    p = snakemake.params  # noqa: F821
    summaries = {
        variant: pd.read_csv(path)
        for variant, path in zip(p.variants, snakemake.input.summaries, strict=True)  # noqa: F821
    }
    kinds = {name: cfg["kind"] for name, cfg in p.all_variants.items()}
    table = table2_sd4match(summaries, kinds, p.matching["reported"], paper_cpm_variants(p.all_variants))
    prov = Provenance(
        config_hash=p.config_hash,
        models=model_revisions(snakemake.input.models),  # noqa: F821
        code_version=code_version(),
        demo=p.demo,
        protocol=protocol_description(p.image_size),
    )
    write_table(
        table,
        snakemake.output.csv,  # noqa: F821
        snakemake.output.md,  # noqa: F821
        title=f"Table 2 — SD4Match tuned on SPair-71k, SPair-71k test, PCK@0.1 ({p.matching['reported']})",
        prov=prov,
    )
