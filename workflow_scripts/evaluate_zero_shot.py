"""Snakemake adapter: one zero-shot baseline on one test set (GPU ids assigned before CUDA initialises)."""

import json

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
    from sd4match.zero_shot import Captioner, run_zero_shot

    inp, p = snakemake.input, snakemake.params  # noqa: F821
    records = {role: inp.get(role) for role in ("model", "dino_model", "clip_model") if inp.get(role)}
    captioner = inp.get("captioner")
    run_zero_shot(
        method=p.method,
        records=records,
        split=SplitInputs.from_rule(inp),  # DIFT: with the test split's VAE posteriors
        settings=JobSettings.from_rule(p, device_for(lease)),
        outputs=JobOutputs.from_rule(snakemake.output),  # noqa: F821
        captioner=Captioner(json.loads(open(captioner).read())["path"], p.captioner) if captioner else None,
    )
