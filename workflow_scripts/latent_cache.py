"""Snakemake adapter: cache the VAE posterior of every image of a dataset's train+val pairs."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.caches import run_latent_cache

    run_latent_cache(
        snakemake.input.pairs,  # noqa: F821
        snakemake.input.data,  # noqa: F821
        snakemake.input.model,  # noqa: F821
        snakemake.params.image_size,  # noqa: F821
        snakemake.output.cache,  # noqa: F821
        device=device_for(lease),
    )
