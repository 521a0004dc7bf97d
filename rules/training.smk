"""SD4Match prompt tuning: one GPU job per (training set, prompt variant), resumable from checkpoints."""


rule train_prompt:
    input:
        unpack(train_inputs),
    output:
        prompt=prompt_file("{trainset}", "{variant}"),
        curve=f"{OUT}/prompts/{{trainset}}/{{variant}}/loss_curve.csv",
    log:
        log_path("train/{trainset}_{variant}.log"),
    benchmark:
        bench_path("train/{trainset}_{variant}.tsv")
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
        out_dir=lambda wc: f"{OUT}/prompts/{wc.trainset}/{wc.variant}/checkpoints",
    script:
        "../workflow_scripts/train_prompt.py"
