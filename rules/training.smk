"""SD4Match prompt tuning: one GPU job per (training set, prompt variant), resumable from checkpoints.

`checkpoints/` (checkpoint.pt, job.json) is resume state, deliberately not an output: Snakemake deletes a
job's outputs before it runs, which would throw away an interrupted run. A finished run marks its
checkpoint finished, so a rerun (--forcerun, an edit) trains again (sd4match/training_state.py).
"""


rule train_prompt:
    input:
        unpack(train_inputs),
    output:
        prompt=prompt_file("{trainset}", "{variant}"),
        sidecar=prompt_file("{trainset}", "{variant}") + ".json",
        curve=f"{OUT}/prompts/{{trainset}}/{{variant}}/loss_curve.csv",
    log:
        "logs/train/{trainset}_{variant}.log",
    benchmark:
        "benchmarks/train/{trainset}_{variant}.tsv"
    conda:
        CONDA_ENV
    resources:
        gpu=config["gpu"]["train"],
    params:
        settings=train_settings,
        cpm=cpm_options,
        metadata=lambda wc: {
            "config_hash": CONFIG_HASH,
            "variant_name": wc.variant,
            "demo": DEMO,
        },
        out_dir=lambda wc: f"{OUT}/prompts/{wc.trainset}/{wc.variant}/checkpoints",
    script:
        "../workflow_scripts/train_prompt.py"
