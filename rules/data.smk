"""Fetch the three benchmarks (or link a local copy) and parse them into normalised pairs tables."""


rule fetch_dataset:
    input:
        dataset_sources,
    output:
        fetch_record("{dataset}"),
    log:
        "logs/data/fetch_{dataset}.log",
    conda:
        CONDA_ENV
    params:
        cfg=lambda wc: config["datasets"][wc.dataset],
        data_dir=lambda wc: f"{RES}/data/{wc.dataset}",
        downloads=f"{RES}/downloads",
    script:
        "../workflow_scripts/fetch_dataset.py"


rule pairs_table:
    input:
        fetch_record("{dataset}"),
    output:
        table=pairs_table("{dataset}", "{split}"),
        report=f"{OUT}/pairs/{{dataset}}_{{split}}.report.json",
    log:
        "logs/data/pairs_{dataset}_{split}.log",
    conda:
        CONDA_ENV
    params:
        layout=config["datasets"]["spair"]["layout"],
    script:
        "../workflow_scripts/pairs_table.py"
