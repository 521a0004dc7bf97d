"""The authors' released prompts: fetch + import (a checkpoint), evaluated by the rule of our tuned prompts.

`snakemake released_prompts` evaluates every released prompt on its test sets without any training;
`snakemake released_tables` adds a small table of them beside the paper's numbers.
"""


checkpoint import_released_prompts:
    input:
        unpack(released_import_inputs),
    output:
        prompts=directory(released_prompts_dir()),
        report=released_import_report(),
    log:
        log_path("released/import.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        cfg=RELEASED,
        downloads=f"{RES}/downloads",
        data_dir=f"{RES}/released_prompts",
        metadata={"demo": DEMO},
    script:
        "../workflow_scripts/import_released_prompts.py"


use rule evaluate_prompt as evaluate_released_prompt with:
    input:
        unpack(released_eval_inputs),
    output:
        per_pair=f"{OUT}/released/{{released_set}}/{{released_variant}}/{{dataset}}/per_pair.csv",
        summary=released_summary("{released_set}", "{released_variant}", "{dataset}"),
        predictions=f"{OUT}/released/{{released_set}}/{{released_variant}}/{{dataset}}/predictions.parquet",
    log:
        log_path("released/{released_set}_{released_variant}_{dataset}.log"),
    benchmark:
        bench_path("released/{released_set}_{released_variant}_{dataset}.tsv")
    params:
        seed=config["seed"],  # a released prompt has no seed of ours: the zero-shot noise seed


rule released_prompts:
    input:
        released_summaries,


rule released_table:
    input:
        summaries=released_summaries,
        per_pair=per_pairs_on(released_summaries),
        report=released_import_report(),
        pairs=[pairs_report(d) for d in TEST_DATASETS],
        models=[model_record(SD4["model"]), model_record(SD4["dino_model"])],
    output:
        table3_csv=f"{OUT}/tables/released_table3.csv",
        table3_md=f"{OUT}/tables/released_table3.md",
        table2_csv=f"{OUT}/tables/released_table2.csv",
        table2_md=f"{OUT}/tables/released_table2.md",
    log:
        log_path("report/released_table.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        matching=config["matching"]["reported"],
        max_pairs=config["evaluation"]["max_pairs"],
        provenance=provenance(
            "matching.reported",
            "released_prompts",
            "sd4match.evaluation",
            models=[SD4["model"], SD4["dino_model"]],
            datasets=TEST_DATASETS,
        ),
    script:
        "../workflow_scripts/released_table.py"


rule released_tables:
    input:
        rules.released_table.output,


rule demo_released_prompts:
    input:
        sd=tiny_model_dir(SD4["model"]),
        dinov2=tiny_model_dir(SD4["dino_model"]),
    output:
        f"{RES}/demo_archives/pretrained_prompts.zip",
    log:
        log_path("demo/demo_released_prompts.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        seed=config.get("demo_world", {}).get("seed", 0),
    script:
        "../workflow_scripts/demo_released_prompts.py"
