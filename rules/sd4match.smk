"""Evaluation of learned prompts on the three test sets (t=50, ensemble 8, every matching method)."""


rule evaluate_prompt:
    input:
        unpack(evaluate_prompt_inputs),
    output:
        per_pair=f"{OUT}/sd4match/{{trainset}}/{{variant}}/{{dataset}}/per_pair.csv",
        summary=sd4match_summary("{trainset}", "{variant}", "{dataset}"),
    log:
        log_path("sd4match/{trainset}_{variant}_{dataset}.log"),
    benchmark:
        bench_path("sd4match/{trainset}_{variant}_{dataset}.tsv")
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
        seed=config["seed"],
    script:
        "../workflow_scripts/evaluate_prompt.py"


rule evaluate_prompt_timestep:
    input:
        unpack(evaluate_prompt_inputs),
    output:
        per_pair=f"{OUT}/timesteps/{{trainset}}/{{variant}}/{{dataset}}_t{{t}}/per_pair.csv",
        summary=f"{OUT}/timesteps/{{trainset}}/{{variant}}/{{dataset}}_t{{t}}/summary.csv",
    log:
        log_path("sd4match/{trainset}_{variant}_{dataset}_t{t}.log"),
    benchmark:
        bench_path("sd4match/{trainset}_{variant}_{dataset}_t{t}.tsv")
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
        seed=config["seed"],
    script:
        "../workflow_scripts/evaluate_prompt.py"
