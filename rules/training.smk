"""SD4Match prompt tuning: one GPU job per (training set, prompt variant, seed), resumable from checkpoints.

`checkpoints/` (checkpoint.pt, job.json) is resume state, deliberately not an output: Snakemake deletes a
job's outputs before it runs, which would throw away an interrupted run. A finished run marks its
checkpoint finished, so a rerun (--forcerun, an edit) trains again (sd4match/training_state.py).
"""


rule train_prompt:
    input:
        unpack(train_inputs),
    output:
        prompt=prompt_file("{trainset}", "{variant}", "{seed}"),
        sidecar=prompt_file("{trainset}", "{variant}", "{seed}") + ".json",
        curve=loss_curve_file("{trainset}", "{variant}", "{seed}"),
    log:
        log_path("train/{trainset}_{variant}_seed{seed}.log"),
    benchmark:
        bench_path("train/{trainset}_{variant}_seed{seed}.tsv")
    conda:
        CONDA_ENV
    threads: 8
    resources:
        gpu=config["gpu"]["train"],
        mem_mb=64000,
        runtime=2880,  # 30k steps; ~22 GB GPU memory at 3 pairs per GPU (authors' setup)
    params:
        settings=train_settings,
        cpm=cpm_options,
        metadata=lambda wc: {"variant_name": wc.variant, "demo": DEMO},
        out_dir=lambda wc: f"{prompt_dir(wc.trainset, wc.variant, wc.seed)}/checkpoints",
    script:
        "../workflow_scripts/train_prompt.py"
