"""Caches reused by every prompt variant: VAE posteriors and DINOv2 tokens per distinct image."""


rule latent_cache:
    input:
        pairs=[pairs_table("{dataset}", "trn"), pairs_table("{dataset}", "val")],
        data=fetch_record("{dataset}"),
        model=model_record(SD4["model"]),
    output:
        cache=latent_cache("{dataset}"),
        sidecar=latent_cache("{dataset}") + ".json",
    log:
        log_path("cache/latents_{dataset}.log"),
    benchmark:
        bench_path("cache/latents_{dataset}.tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["cache"],
        mem_mb=32000,
        runtime=120,
    params:
        image_size=config["image_size"],
    script:
        "../workflow_scripts/latent_cache.py"


# The test splits' VAE posteriors, one VAE pass per distinct image for the whole DAG: every evaluation of the
# split (learned prompts, released prompts, DIFT) samples its latents from it. SD is loaded as the evaluations
# load it and each image encoded alone, so the numbers equal those of a VAE pass in the evaluation job; the
# job runs on the evaluations' kind of device (gpu.evaluate).
rule test_latent_cache:
    input:
        pairs=pairs_table("{dataset}", "test"),
        data=fetch_record("{dataset}"),
        model=model_record("{model}"),
    output:
        cache=test_latent_cache("{dataset}", "{model}"),
        sidecar=test_latent_cache("{dataset}", "{model}") + ".json",
    log:
        log_path("cache/latents_{dataset}_test_{model}.log"),
    benchmark:
        bench_path("cache/latents_{dataset}_test_{model}.tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["evaluate"],
        mem_mb=32000,
        runtime=60,
    params:
        image_size=config["image_size"],
        encoder=VAE_ENCODER,
    script:
        "../workflow_scripts/test_latent_cache.py"


rule dino_cache:
    input:
        pairs=lambda wc: (
            [pairs_table(wc.dataset, "trn"), pairs_table(wc.dataset, "val")]
            if wc.part == "trnval"
            else [pairs_table(wc.dataset, "test")]
        ),
        data=fetch_record("{dataset}"),
        model=model_record(SD4["dino_model"]),
    output:
        cache=dino_cache("{dataset}", "{part}"),
        sidecar=dino_cache("{dataset}", "{part}") + ".json",
    log:
        log_path("cache/dinov2_{dataset}_{part}.log"),
    benchmark:
        bench_path("cache/dinov2_{dataset}_{part}.tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["cache"],
        mem_mb=32000,
        runtime=120,
    script:
        "../workflow_scripts/dino_cache.py"
