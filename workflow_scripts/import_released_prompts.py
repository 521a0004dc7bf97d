"""Snakemake adapter: fetch the authors' pretrained_prompts.zip (or link a local copy), import its prompts."""

from sd4match.logs import log_to
from sd4match.released_prompts import run_released_import

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    run_released_import(
        cfg=p.cfg,
        sd_record_path=i.sd_model,
        dino_record_path=i.dinov2_model,
        downloads=p.downloads,
        data_dir=p.data_dir,
        prompts_out=o.prompts,
        report_out=o.report,
        metadata=p.metadata,
    )
