"""Snakemake adapter: download + extract (or link) one benchmark and record where it lives."""

from sd4match.data_sources import acquire_dataset, write_location
from sd4match.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821
    location = acquire_dataset(
        snakemake.wildcards.dataset,  # noqa: F821
        snakemake.params.cfg,  # noqa: F821
        snakemake.params.data_dir,  # noqa: F821
        snakemake.params.downloads,  # noqa: F821
    )
    write_location(location, snakemake.output[0])  # noqa: F821
