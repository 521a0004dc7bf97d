"""Evaluation of learned prompts on the three test sets (t=50, ensemble 8, every matching method)."""


rule evaluate_prompt:
    input:
        unpack(evaluate_prompt_inputs),
    output:
        per_pair=f"{OUT}/sd4match/{{trainset}}/{{variant}}/{{dataset}}/per_pair.csv",
        summary=sd4match_summary("{trainset}", "{variant}", "{dataset}"),
    log:
        "logs/sd4match/{trainset}_{variant}_{dataset}.log",
    benchmark:
        "benchmarks/sd4match/{trainset}_{variant}_{dataset}.tsv"
    conda:
        CONDA_ENV
    resources:
        gpu=config["gpu"]["evaluate"],
    params:
        evaluation=SD4["evaluation"],
        features=config["features"],
        matching=config["matching"],
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
        "logs/sd4match/{trainset}_{variant}_{dataset}_t{t}.log",
    benchmark:
        "benchmarks/sd4match/{trainset}_{variant}_{dataset}_t{t}.tsv"
    conda:
        CONDA_ENV
    resources:
        gpu=config["gpu"]["evaluate"],
    params:
        evaluation=lambda wc: SD4["evaluation"] | {"timestep": int(wc.t)},
        features=config["features"],
        matching=config["matching"],
        alphas=config["evaluation"]["alphas"],
        max_pairs=config["evaluation"]["max_pairs"],
        image_size=config["image_size"],
        seed=config["seed"],
    script:
        "../workflow_scripts/evaluate_prompt.py"
