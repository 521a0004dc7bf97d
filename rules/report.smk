"""Tables in the paper's layout, with the paper's numbers beside ours and provenance."""


rule table_zero_shot_dift:
    input:
        summaries=expand(
            f"{OUT}/zero_shot/dift/{{dataset}}/summary.csv", dataset=TEST_DATASETS
        ),
        models=[model_record(DIFT["model"])],
    output:
        csv=f"{OUT}/tables/zero_shot_dift.csv",
        md=f"{OUT}/tables/zero_shot_dift.md",
    log:
        "logs/report/table_zero_shot_dift.log",
    conda:
        CONDA_ENV
    params:
        datasets=TEST_DATASETS,
        matching=config["matching"],
        config_hash=CONFIG_HASH,
        demo=DEMO,
        image_size=config["image_size"],
    script:
        "../workflow_scripts/table_zero_shot_dift.py"
