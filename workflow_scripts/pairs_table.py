"""Snakemake adapter: parse one dataset split into the normalised pairs table."""

from sd4match.data_sources import read_location
from sd4match.datasets import build_pairs_table, write_pairs_table
from sd4match.logs import log_to

with log_to(snakemake.log[0]) as log:  # noqa: F821
    location = read_location(snakemake.input[0])  # noqa: F821
    split = snakemake.wildcards.split  # noqa: F821
    table = build_pairs_table(
        snakemake.wildcards.dataset,  # noqa: F821
        location.root,
        split,
        pairs_csv=location.pair_lists.get(split),
        layout=snakemake.params.layout,  # noqa: F821
    )
    log.info("%s/%s: %d pairs", snakemake.wildcards.dataset, split, len(table))  # noqa: F821
    write_pairs_table(table, snakemake.output[0])  # noqa: F821
