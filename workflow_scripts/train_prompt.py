"""Snakemake adapter: tune one SD4Match prompt (resumable; multi-GPU through accelerate when gpu > 1)."""

from sd4match.gpu import allocate_gpus
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu):  # noqa: F821
    from sd4match.training import TrainJob, TrainSettings, launch, write_job

    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    job = TrainJob(
        settings=TrainSettings.from_dict(dict(p.settings), "rule train_prompt params.settings"),
        pairs_trn=i.pairs_trn,
        pairs_val=i.pairs_val,
        sd_model=i.sd_model,
        latent_cache=i.latent_cache,
        output=o.prompt,
        curve=o.curve,
        out_dir=p.out_dir,
        dinov2_model=getattr(i, "dinov2_model", None),
        dino_cache=getattr(i, "dino_cache", None),
        cpm=None if getattr(p, "cpm", None) is None else dict(p.cpm),
        categories=None if getattr(p, "categories", None) is None else list(p.categories),
        metadata=dict(getattr(p, "metadata", None) or {}),
    )
    job_path = write_job(job)  # <out_dir>/job.json, next to the checkpoint
    launch(job_path, snakemake.resources.gpu)  # noqa: F821
