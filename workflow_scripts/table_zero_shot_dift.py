"""Snakemake adapter: the zero-shot DIFT table (paper layout, paper numbers, deltas, provenance)."""

import pandas as pd

from sd4match.logs import log_to
from sd4match.provenance import code_version, model_revisions
from sd4match.reporting import Provenance, protocol_description, write_table, zero_shot_table

with log_to(snakemake.log[0]):  # noqa: F821
    p = snakemake.params  # noqa: F821
    summaries = {
        dataset: pd.read_csv(path)
        for dataset, path in zip(p.datasets, snakemake.input.summaries, strict=True)  # noqa: F821
    }
    prov = Provenance(
        config_hash=p.config_hash,
        models=model_revisions(snakemake.input.models),  # noqa: F821
        code_version=code_version(),
        demo=p.demo,
        protocol=protocol_description(p.image_size),
    )
    reported = p.matching["reported"]
    others = tuple(m for m in p.matching["methods"] if m != reported)
    table = zero_shot_table(
        summaries, "DIFT", reported, paper_row="DIFT", per_keypoint=True, other_matchings=others
    )
    write_table(
        table,
        snakemake.output.csv,  # noqa: F821
        snakemake.output.md,  # noqa: F821
        title=f"Zero-shot DIFT ({p.matching['reported']} matching) — paper Table 3 layout",
        prov=prov,
    )
