"""Resolve every model of the registry to a local folder and record the revision actually used."""


rule resolve_model:
    input:
        model_source,
    output:
        model_record("{model}"),
    log:
        "logs/models/resolve_{model}.log",
    conda:
        CONDA_ENV
    params:
        spec=lambda wc: config["models"][wc.model],
        cache_dir=config.get("hf_cache_dir"),
    script:
        "../workflow_scripts/resolve_model.py"
