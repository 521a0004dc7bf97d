"""Zero-shot baselines computed by the DAG: DIFT, DINO, DINOv2, SD+DINO and SD+DINO* (protocol.md)."""


rule fetch_captioner:
    input:
        local_source(CAPTIONER["url"]),
    output:
        f"{RES}/models/implicit_captioner.json",
    log:
        log_path("models/fetch_captioner.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        url=CAPTIONER["url"],
        sha256=CAPTIONER["sha256"],
        downloads=f"{RES}/downloads",
    script:
        "../workflow_scripts/fetch_captioner.py"


rule evaluate_zero_shot:
    input:
        unpack(zero_shot_inputs),
    output:
        per_pair=f"{OUT}/zero_shot/{{method}}/{{dataset}}/per_pair.csv",
        summary=zero_shot_summary("{method}", "{dataset}"),
        predictions=f"{OUT}/zero_shot/{{method}}/{{dataset}}/predictions.parquet",
    log:
        log_path("zero_shot/{method}_{dataset}.log"),
    benchmark:
        bench_path("zero_shot/{method}_{dataset}.tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["evaluate"],
        mem_mb=48000,
        runtime=360,
    params:
        method=zero_shot_method,
        captioner=zero_shot_captioner,
        image_size=config["image_size"],
        features=config["features"],
        matching=EVAL_MATCHING,
        alphas=config["evaluation"]["alphas"],
        max_pairs=config["evaluation"]["max_pairs"],
        seed=config["seed"],
    script:
        "../workflow_scripts/evaluate_zero_shot.py"
