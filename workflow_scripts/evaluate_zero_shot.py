"""Snakemake adapter: one zero-shot baseline on one test set (GPU ids assigned before CUDA initialises)."""

import json

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.zero_shot import run_zero_shot

    inp, p = snakemake.input, snakemake.params  # noqa: F821
    records = {role: inp.get(role) for role in ("model", "dino_model", "clip_model") if inp.get(role)}
    captioner = inp.get("captioner")
    run_zero_shot(
        method=p.method,
        records=records,
        pairs_path=inp.pairs,
        location_path=inp.data,
        matching=p.matching,
        alphas=p.alphas,
        max_pairs=p.max_pairs,
        image_size=p.image_size,
        features=p.features,
        seed=p.seed,
        device=device_for(lease),
        per_pair_out=snakemake.output.per_pair,  # noqa: F821
        summary_out=snakemake.output.summary,  # noqa: F821
        captioner_path=json.loads(open(captioner).read())["path"] if captioner else None,
        captioner_cfg=p.captioner,
        latent_cache_path=inp.get("latent_cache"),  # DIFT: the test split's VAE posteriors
    )
