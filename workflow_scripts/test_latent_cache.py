"""Snakemake adapter: the VAE posterior of every image of a test split, as the evaluations encode them."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.caches import run_test_latent_cache

    run_test_latent_cache(
        pairs_path=snakemake.input.pairs,  # noqa: F821
        location_path=snakemake.input.data,  # noqa: F821
        model_record_path=snakemake.input.model,  # noqa: F821
        image_size=snakemake.params.image_size,  # noqa: F821
        encoder=dict(snakemake.params.encoder),  # noqa: F821
        out_path=snakemake.output.cache,  # noqa: F821
        device=device_for(lease),
    )
