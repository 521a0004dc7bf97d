"""Snakemake adapter: evaluate one learned prompt on one test set."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.evaluation import run_prompt_evaluation

    inp, p = snakemake.input, snakemake.params  # noqa: F821
    run_prompt_evaluation(
        prompt_path=inp.prompt,
        pairs_path=inp.pairs,
        location_path=inp.data,
        model_record_path=inp.sd_model,
        dino_cache_path=inp.get("dino_cache"),
        dino_record_path=inp.get("dinov2_model"),
        evaluation=p.evaluation,
        features=p.features,
        matching=p.matching,
        alphas=p.alphas,
        max_pairs=p.max_pairs,
        image_size=p.image_size,
        seed=p.seed,
        device=device_for(lease),
        per_pair_out=snakemake.output.per_pair,  # noqa: F821
        summary_out=snakemake.output.summary,  # noqa: F821
        latent_cache_path=inp.get("latent_cache"),  # the test split's VAE posteriors
    )
