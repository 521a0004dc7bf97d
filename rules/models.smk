"""Resolve every model of the registry to a local folder and record the revision actually used.

Hub revisions are pinned by the lock file MODEL_LOCK: the first resolution of a hub model writes its commit
there, later runs (and colleagues with the same lock) resolve that commit; `snakemake refresh_model_lock`
re-resolves the configured revisions and rewrites the lock and the records whose commit moved.
"""


rule resolve_model:
    input:
        model_source,
    output:
        model_record("{model}"),
    log:
        log_path("models/resolve_{model}.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,  # SD 2-1: ~2.6 GB of fp16 weights
    params:
        spec=lambda wc: config["models"][wc.model],
        cache_dir=config.get("hf_cache_dir"),
        lock=MODEL_LOCK,
    script:
        "../workflow_scripts/resolve_model.py"


rule refresh_model_lock:
    log:
        log_path("models/refresh_model_lock.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        specs=config["models"],
        cache_dir=config.get("hf_cache_dir"),
        lock=MODEL_LOCK,
        records={name: model_record(name) for name in config["models"]},
    script:
        "../workflow_scripts/refresh_model_lock.py"
