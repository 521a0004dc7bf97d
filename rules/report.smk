"""Tables in the paper's layout, with the paper's numbers beside ours, deltas and provenance."""


rule table_zero_shot_dift:
    input:
        summaries=[zero_shot_summary("dift", d) for d in TEST_DATASETS],
        models=[model_record(ZS["dift"]["model"])],
    output:
        csv=f"{OUT}/tables/zero_shot_dift.csv",
        md=report(
            f"{OUT}/tables/zero_shot_dift.md",
            caption="../report/zero_shot_dift.rst",
            category="Tables",
        ),
    log:
        "logs/report/table_zero_shot_dift.log",
    conda:
        CONDA_ENV
    params:
        datasets=TEST_DATASETS,
        matching=config["matching"],
        reported=config["zero_shot_matching"],
        provenance=PROVENANCE,
    script:
        "../workflow_scripts/table_zero_shot_dift.py"


rule table1:
    input:
        summaries=[
            zero_shot_summary(m, "spair")
            for m in (
                "dift_empty",
                "dift",
                "sddino_star_empty",
                "sddino_star_template",
                "sddino_star",
            )
        ],
        models=[model_record(m) for m in ("sd21", "sd15", CAPTIONER["clip_model"])],
    output:
        csv=f"{OUT}/tables/table1.csv",
        md=report(
            f"{OUT}/tables/table1.md",
            caption="../report/table1.rst",
            category="Tables",
        ),
    log:
        "logs/report/table1.log",
    conda:
        CONDA_ENV
    params:
        cells={
            ("DIFT", "empty"): zero_shot_summary("dift_empty", "spair"),
            ("DIFT", "template"): zero_shot_summary("dift", "spair"),
            ("SD+DINO*", "empty"): zero_shot_summary("sddino_star_empty", "spair"),
            ("SD+DINO*", "template"): zero_shot_summary(
                "sddino_star_template", "spair"
            ),
            ("SD+DINO*", "implicit"): zero_shot_summary("sddino_star", "spair"),
        },
        matching=config["zero_shot_matching"],
        provenance=PROVENANCE,
    script:
        "../workflow_scripts/table1.py"


rule table2:
    input:
        zero_shot=[
            zero_shot_summary(m, "spair") for m in ("dino", "dinov2", "dift", "sddino")
        ],
        sd4match=[  # every seed; params name the primary seeds
            path
            for t, v in train_runs()
            if t == "spair"
            for path in sd4match_seed_summaries("spair", v, "spair").values()
        ],
        models=[
            model_record(m)
            for m in ("sd21", "sd15", "dino", "dinov2", CAPTIONER["clip_model"])
        ],
    output:
        csv=f"{OUT}/tables/table2.csv",
        md=report(
            f"{OUT}/tables/table2.md",
            caption="../report/table2.rst",
            category="Tables",
        ),
    log:
        "logs/report/table2.log",
    conda:
        CONDA_ENV
    params:
        zero_shot={
            m: zero_shot_summary(m, "spair")
            for m in ("dino", "dinov2", "dift", "sddino")
        },
        sd4match={
            v: sd4match_summary("spair", v, "spair")
            for t, v in train_runs()
            if t == "spair"
        },
        variants=SD4["variants"],
        matching=config["matching"]["reported"],
        zero_shot_matching=config["zero_shot_matching"],
        provenance=PROVENANCE,
    script:
        "../workflow_scripts/table2.py"


rule table3:
    input:
        zero_shot=list(
            zero_shot_summaries(("dino", "dinov2", "dift", "sddino")).values()
        ),
        sd4match=sd4match_summaries(),
        models=[
            model_record(m)
            for m in ("sd21", "sd15", "dino", "dinov2", CAPTIONER["clip_model"])
        ],
    output:
        csv=f"{OUT}/tables/table3.csv",
        md=report(
            f"{OUT}/tables/table3.md",
            caption="../report/table3.rst",
            category="Tables",
        ),
    log:
        "logs/report/table3.log",
    conda:
        CONDA_ENV
    params:
        zero_shot=zero_shot_summaries(("dino", "dinov2", "dift", "sddino")),
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
        variants=SD4["variants"],
        matching=config["matching"]["reported"],
        zero_shot_matching=config["zero_shot_matching"],
        provenance=PROVENANCE,
    script:
        "../workflow_scripts/table3.py"
