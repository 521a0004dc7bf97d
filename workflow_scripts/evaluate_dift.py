"""Snakemake adapter: zero-shot DIFT on one test set (GPU ids assigned before CUDA initialises)."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.evaluation import run_zero_shot_dift

    p = snakemake.params  # noqa: F821
    run_zero_shot_dift(
        pairs_path=snakemake.input.pairs,  # noqa: F821
        location_path=snakemake.input.data,  # noqa: F821
        model_record_path=snakemake.input.model,  # noqa: F821
        dift=p.dift,
        features=p.features,
        matching=p.matching,
        evaluation=p.evaluation,
        image_size=p.image_size,
        seed=p.seed,
        device=device_for(lease),
        per_pair_out=snakemake.output.per_pair,  # noqa: F821
        summary_out=snakemake.output.summary,  # noqa: F821
    )
