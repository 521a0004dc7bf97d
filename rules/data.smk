"""Fetch the three benchmarks (or link a local copy) and parse them into normalised pairs tables; a custom
dataset (sd4match.custom_dataset) is always a linked local folder with one test split.
"""


rule fetch_dataset:
    input:
        dataset_sources,
    output:
        fetch_record("{dataset}"),
    log:
        log_path("data/fetch_{dataset}.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,  # SPair-71k: 2 GB download + extraction
    params:
        cfg=lambda wc: fetch_settings(wc.dataset),
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
        log_path("data/pairs_{dataset}_{split}.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        layout=config["datasets"]["spair"]["layout"],
        custom=lambda wc: custom_spec(wc.dataset),  # None for the three benchmarks
    script:
        "../workflow_scripts/pairs_table.py"
