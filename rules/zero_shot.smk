"""Zero-shot baselines computed by the DAG (DIFT: SD 2-1, template prompt, t=261, E=8)."""

DIFT = config["zero_shot"]["dift"]


rule evaluate_dift:
    input:
        pairs=pairs_table("{dataset}", "test"),
        data=fetch_record("{dataset}"),
        model=model_record(DIFT["model"]),
    output:
        per_pair=f"{OUT}/zero_shot/dift/{{dataset}}/per_pair.csv",
        summary=f"{OUT}/zero_shot/dift/{{dataset}}/summary.csv",
    log:
        "logs/zero_shot/dift_{dataset}.log",
    benchmark:
        "benchmarks/zero_shot/dift_{dataset}.tsv"
    conda:
        CONDA_ENV
    resources:
        gpu=config["gpu"]["evaluate"],
    params:
        dift=DIFT,
        image_size=config["image_size"],
        features=config["features"],
        matching=config["matching"],
        evaluation=config["evaluation"],
        seed=config["seed"],
    script:
        "../workflow_scripts/evaluate_dift.py"
