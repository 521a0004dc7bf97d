"""Snakemake adapter: Table 3 SD4Match rows (PF-Pascal- and SPair-tuned) on the three test sets."""

import pandas as pd

from sd4match.logs import log_to
from sd4match.provenance import code_version, model_revisions
from sd4match.reporting import (
    Provenance,
    paper_cpm_variants,
    protocol_description,
    table3_sd4match,
    write_table,
)

with log_to(snakemake.log[0]):  # noqa: F821
    p = snakemake.params  # noqa: F821
    summaries = {
        (trainset, variant): {
            dataset: pd.read_csv(p.summary_paths[f"{trainset}/{variant}/{dataset}"])
            for dataset in ("pfpascal", "pfwillow", "spair")
        }
        for trainset, variant in p.runs
    }
    kinds = {name: cfg["kind"] for name, cfg in p.variants.items()}
    table = table3_sd4match(summaries, kinds, p.matching["reported"], paper_cpm_variants(p.variants))
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
        title=f"Table 3 — SD4Match generalisation, PCK per image ({p.matching['reported']})",
        prov=prov,
    )
