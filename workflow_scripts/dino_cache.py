"""Snakemake adapter: cache DINOv2 patch tokens and global descriptors of every image of some pairs tables."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.caches import run_dino_cache

    run_dino_cache(
        snakemake.input.pairs,  # noqa: F821
        snakemake.input.data,  # noqa: F821
        snakemake.input.model,  # noqa: F821
        snakemake.output.cache,  # noqa: F821
        device=device_for(lease),
    )
