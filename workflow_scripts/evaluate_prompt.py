"""Snakemake adapter: evaluate one learned prompt on one test set."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.evaluation import PromptModels, run_prompt_evaluation
    from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs

    inp, p = snakemake.input, snakemake.params  # noqa: F821
    run_prompt_evaluation(
        prompt_path=inp.prompt,
        models=PromptModels(inp.sd_model, inp.get("dinov2_model"), inp.get("dino_cache")),
        split=SplitInputs.from_rule(inp),  # with the test split's VAE posteriors
        evaluation=p.evaluation,
        settings=JobSettings.from_rule(p, device_for(lease)),
        outputs=JobOutputs.from_rule(snakemake.output),  # noqa: F821
    )
