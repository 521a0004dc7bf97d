"""Tables in the paper's layout, with the paper's numbers beside ours, deltas and provenance.

Each table is written as CSV (numbers), Markdown and HTML (ours / paper / delta, viewable in
`snakemake --report`), plus an RST caption with the protocol and the model revisions used. Every PCK carries
its bootstrap interval over pairs, computed in the table job from the per-pair CSVs beside the summaries
(seconds per file, no GPU); runs with several seeds add their spread; the caption lines say how many pairs
were evaluated (the pairs tables' reports). Tables 2 and 3 also show the authors' released prompts, whose
evaluations follow the import checkpoint (rules/released.smk).
"""


rule table_zero_shot_dift:
    input:
        summaries=[
            zero_shot_summary(m, d) for m in ZERO_SHOT_DIFT for d in TEST_DATASETS
        ],
        per_pair=per_pairs_of(
            [zero_shot_summary(m, d) for m in ZERO_SHOT_DIFT for d in TEST_DATASETS]
        ),
        pairs=[pairs_report(d) for d in TEST_DATASETS],
        models=sorted({model_record(ZS[m]["model"]) for m in ZERO_SHOT_DIFT}),
    output:
        csv=f"{OUT}/tables/zero_shot_dift.csv",
        md=f"{OUT}/tables/zero_shot_dift.md",
        html=report_table("zero_shot_dift"),
        caption=report_caption("zero_shot_dift"),
    log:
        log_path("report/table_zero_shot_dift.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        datasets=TEST_DATASETS,
        summaries={
            m: {d: zero_shot_summary(m, d) for d in TEST_DATASETS}
            for m in ZERO_SHOT_DIFT
        },
        protocols=zero_shot_row_protocols(ZERO_SHOT_DIFT),
        matching=EVAL_MATCHING,
        reported=config["zero_shot_matching"],
        max_pairs=config["evaluation"]["max_pairs"],
        provenance=provenance(
            "zero_shot_matching",
            models=sorted({ZS[m]["model"] for m in ZERO_SHOT_DIFT}),
            datasets=TEST_DATASETS,
            zero_shot=ZERO_SHOT_DIFT,
        ),
    script:
        "../workflow_scripts/table_zero_shot_dift.py"


rule table1:
    input:
        summaries=[zero_shot_summary(m, "spair") for m in TABLE1_ZERO_SHOT],
        per_pair=per_pairs_of([zero_shot_summary(m, "spair") for m in TABLE1_ZERO_SHOT]),
        pairs=[pairs_report("spair")],
        models=[model_record(m) for m in ("sd21", "sd15", CAPTIONER["clip_model"])],
    output:
        csv=f"{OUT}/tables/table1.csv",
        md=f"{OUT}/tables/table1.md",
        html=report_table("table1"),
        caption=report_caption("table1"),
    log:
        log_path("report/table1.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cells={key: zero_shot_summary(m, "spair") for key, m in TABLE1_CELLS.items()},
        protocols=zero_shot_row_protocols(TABLE1_CELLS),
        matching=config["zero_shot_matching"],
        max_pairs=config["evaluation"]["max_pairs"],
        provenance=provenance(
            "zero_shot_matching",
            "implicit_captioner",
            models=("sd21", "sd15", CAPTIONER["clip_model"]),
            datasets=["spair"],
            zero_shot=TABLE1_ZERO_SHOT,
        ),
    script:
        "../workflow_scripts/table1.py"


rule table2:
    input:
        zero_shot=[zero_shot_summary(m, "spair") for m in TABLE2_ZERO_SHOT],
        sd4match=[  # every seed (their spread); params name the primary seeds
            path
            for v in variants_of(["spair"])
            for path in sd4match_seed_summaries("spair", v, "spair").values()
        ],
        per_pair=per_pairs_of(
            [zero_shot_summary(m, "spair") for m in TABLE2_ZERO_SHOT]
            + [sd4match_summary("spair", v, "spair") for v in variants_of(["spair"])]
        ),
        released=released_on(["spair"], ["spair"]),
        released_per_pair=per_pairs_on(released_on(["spair"], ["spair"])),
        pairs=[pairs_report("spair")],
        models=[model_record(m) for m in ALL_MODELS],
    output:
        csv=f"{OUT}/tables/table2.csv",
        md=f"{OUT}/tables/table2.md",
        html=report_table("table2"),
        caption=report_caption("table2"),
        paired_csv=f"{OUT}/tables/paired.csv",
        paired_md=f"{OUT}/tables/paired.md",
        paired_html=report_table("paired"),
        paired_caption=report_caption("paired"),
    log:
        log_path("report/table2.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        zero_shot={m: zero_shot_summary(m, "spair") for m in TABLE2_ZERO_SHOT},
        zero_shot_protocols=zero_shot_row_protocols(TABLE2_ZERO_SHOT),
        sd4match={
            v: sd4match_summary("spair", v, "spair") for v in variants_of(["spair"])
        },
        seeds={
            v: sd4match_seed_summaries("spair", v, "spair")
            for v in variants_of(["spair"])
        },
        variants={v: SD4["variants"][v] for v in variants_of(["spair"])},
        matching=config["matching"]["reported"],
        zero_shot_matching=config["zero_shot_matching"],
        max_pairs=config["evaluation"]["max_pairs"],
        provenance=provenance(
            "zero_shot_matching",
            "matching.reported",
            "implicit_captioner",
            "sd4match.train_sets.spair",
            "released_prompts",
            models=ALL_MODELS,
            datasets=["spair"],
            variants=variants_of(["spair"]),
            zero_shot=TABLE2_ZERO_SHOT,
        ),
    script:
        "../workflow_scripts/table2.py"


rule table3:
    input:
        zero_shot=list(zero_shot_summaries(TABLE2_ZERO_SHOT).values()),
        sd4match=sd4match_summaries(),  # every seed (their spread)
        per_pair=per_pairs_of(
            list(zero_shot_summaries(TABLE2_ZERO_SHOT).values())
            + [
                sd4match_summary(t, v, d)
                for t, v in train_runs()
                for d in eval_datasets(t, v)
            ]
        ),
        released=released_on(RELEASED_SETS, TEST_DATASETS, every_test_set=True),
        released_per_pair=per_pairs_on(
            released_on(RELEASED_SETS, TEST_DATASETS, every_test_set=True)
        ),
        pairs=[pairs_report(d) for d in TEST_DATASETS],
        models=[model_record(m) for m in ALL_MODELS],
    output:
        csv=f"{OUT}/tables/table3.csv",
        md=f"{OUT}/tables/table3.md",
        html=report_table("table3"),
        caption=report_caption("table3"),
    log:
        log_path("report/table3.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        zero_shot=zero_shot_summaries(TABLE2_ZERO_SHOT),
        zero_shot_protocols=zero_shot_row_protocols(TABLE2_ZERO_SHOT),
        runs=[
            (t, v)
            for t, v in train_runs()
            if set(eval_datasets(t, v)) == set(TEST_DATASETS)
        ],
        sd4match={
            f"{t}/{v}/{d}": sd4match_summary(t, v, d)
            for t, v in train_runs()
            for d in eval_datasets(t, v)
        },
        seeds={
            f"{t}/{v}/{d}": sd4match_seed_summaries(t, v, d)
            for t, v in train_runs()
            for d in eval_datasets(t, v)
        },
        variants={v: SD4["variants"][v] for v in variants_of(TRAIN_SETS)},
        matching=config["matching"]["reported"],
        zero_shot_matching=config["zero_shot_matching"],
        max_pairs=config["evaluation"]["max_pairs"],
        provenance=provenance(
            "zero_shot_matching",
            "matching.reported",
            "implicit_captioner",
            "sd4match.train_sets",
            "released_prompts",
            models=ALL_MODELS,
            datasets=TEST_DATASETS,
            variants=variants_of(TRAIN_SETS),
            zero_shot=TABLE2_ZERO_SHOT,
        ),
    script:
        "../workflow_scripts/table3.py"


rule table_custom:
    input:
        zero_shot=lambda wc: list(custom_zero_shot_summaries(wc.custom).values()),
        sd4match=lambda wc: list(custom_sd4match_summaries(wc.custom).values()),
        per_pair=lambda wc: per_pairs_of(
            [
                *custom_zero_shot_summaries(wc.custom).values(),
                *custom_sd4match_summaries(wc.custom).values(),
            ]
        ),
        pairs_report=f"{OUT}/pairs/{{custom}}_test.report.json",
        models=[model_record(m) for m in ALL_MODELS],
    output:
        csv=custom_table_file("{custom}", "csv"),
        md=custom_table_file("{custom}", "md"),
        html=report_custom_table(),
        caption=report_caption("custom_{custom}"),
    log:
        log_path("report/table_custom_{custom}.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        name=lambda wc: wc.custom,
        threshold=lambda wc: config["datasets"][wc.custom]["threshold"],
        zero_shot=lambda wc: custom_zero_shot_summaries(wc.custom),
        sd4match=lambda wc: custom_sd4match_summaries(wc.custom),
        variants={v: SD4["variants"][v] for _, v in custom_prompt_runs()},
        matching=config["matching"]["reported"],
        zero_shot_matching=config["zero_shot_matching"],
        alphas=config["evaluation"]["alphas"],
        provenance=lambda wc: custom_provenance(wc.custom),
    script:
        "../workflow_scripts/table_custom.py"


rule custom_tables:
    input:
        [custom_table_file(name, "md") for name in CUSTOM_DATASETS],
