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


rule table2_sd4match:
    input:
        summaries=[
            sd4match_summary("spair", v, "spair")
            for t, v in train_runs()
            if t == "spair"
        ],
        models=[model_record(SD4["model"]), model_record(SD4["dino_model"])],
    output:
        csv=f"{OUT}/tables/table2_sd4match.csv",
        md=f"{OUT}/tables/table2_sd4match.md",
    log:
        "logs/report/table2_sd4match.log",
    conda:
        CONDA_ENV
    params:
        variants=[v for t, v in train_runs() if t == "spair"],
        all_variants=SD4["variants"],
        matching=config["matching"],
        config_hash=CONFIG_HASH,
        demo=DEMO,
        image_size=config["image_size"],
    script:
        "../workflow_scripts/table2_sd4match.py"


rule table3_sd4match:
    input:
        summaries=sd4match_summaries(),
        models=[model_record(SD4["model"]), model_record(SD4["dino_model"])],
    output:
        csv=f"{OUT}/tables/table3_sd4match.csv",
        md=f"{OUT}/tables/table3_sd4match.md",
    log:
        "logs/report/table3_sd4match.log",
    conda:
        CONDA_ENV
    params:
        runs=[
            (t, v)
            for t, v in train_runs()
            if set(eval_datasets(t, v)) == set(TEST_DATASETS)
        ],
        summary_paths=lambda wc: {
            f"{t}/{v}/{d}": sd4match_summary(t, v, d)
            for t, v in train_runs()
            for d in eval_datasets(t, v)
        },
        variants=SD4["variants"],
        matching=config["matching"],
        config_hash=CONFIG_HASH,
        demo=DEMO,
        image_size=config["image_size"],
    script:
        "../workflow_scripts/table3_sd4match.py"
