"""Evaluation of learned prompts (one job per seed) on the test sets (t=50, ensemble 8, every matching method)."""


rule evaluate_prompt:
    input:
        unpack(evaluate_prompt_inputs),
    output:
        per_pair=sd4match_per_pair("{trainset}", "{variant}", "{dataset}", "{seed}"),
        summary=sd4match_summary("{trainset}", "{variant}", "{dataset}", "{seed}"),
        predictions=sd4match_predictions(
            "{trainset}", "{variant}", "{dataset}", "{seed}"
        ),
    log:
        log_path("sd4match/{trainset}_{variant}_seed{seed}_{dataset}.log"),
    benchmark:
        bench_path("sd4match/{trainset}_{variant}_seed{seed}_{dataset}.tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["evaluate"],
        mem_mb=32000,
        runtime=240,
    params:
        evaluation=SD4["evaluation"],
        features=config["features"],
        matching=EVAL_MATCHING,
        alphas=config["evaluation"]["alphas"],
        max_pairs=config["evaluation"]["max_pairs"],
        image_size=config["image_size"],
        seed=lambda wc: int(wc.seed),  # the run's seed also seeds its evaluation noise
    script:
        "../workflow_scripts/evaluate_prompt.py"


rule evaluate_prompt_timestep:
    input:
        unpack(evaluate_prompt_inputs),
    output:
        per_pair=timestep_file(
            "{trainset}", "{variant}", "{dataset}", "{t}", "{seed}", "per_pair"
        ),
        summary=timestep_file("{trainset}", "{variant}", "{dataset}", "{t}", "{seed}"),
        predictions=timestep_file(
            "{trainset}",
            "{variant}",
            "{dataset}",
            "{t}",
            "{seed}",
            "predictions",
            "parquet",
        ),
    log:
        log_path("sd4match/{trainset}_{variant}_seed{seed}_{dataset}_t{t}.log"),
    benchmark:
        bench_path("sd4match/{trainset}_{variant}_seed{seed}_{dataset}_t{t}.tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["evaluate"],
        mem_mb=32000,
        runtime=240,
    params:
        evaluation=lambda wc: SD4["evaluation"] | {"timestep": int(wc.t)},
        features=config["features"],
        matching=EVAL_MATCHING,
        alphas=config["evaluation"]["alphas"],
        max_pairs=config["evaluation"]["max_pairs"],
        image_size=config["image_size"],
        seed=lambda wc: int(wc.seed),  # the run's seed also seeds its evaluation noise
    script:
        "../workflow_scripts/evaluate_prompt.py"
