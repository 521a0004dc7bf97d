"""SD4Match prompt tuning: one GPU job per (training set, prompt variant, seed), resumable from checkpoints."""


rule train_prompt:
    input:
        unpack(train_inputs),
    output:
        prompt=prompt_file("{trainset}", "{variant}", "{seed}"),
        curve=loss_curve_file("{trainset}", "{variant}", "{seed}"),
    log:
        "logs/train/{trainset}_{variant}_seed{seed}.log",
    benchmark:
        "benchmarks/train/{trainset}_{variant}_seed{seed}.tsv"
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
        out_dir=lambda wc: f"{prompt_dir(wc.trainset, wc.variant, wc.seed)}/checkpoints",
    script:
        "../workflow_scripts/train_prompt.py"
