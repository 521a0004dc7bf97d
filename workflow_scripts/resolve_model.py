"""Snakemake adapter: resolve a registry model to a local folder and record its revision."""

from sd4match.logs import log_to
from sd4match.models import ModelSpec, resolve_model, write_model_record

with log_to(snakemake.log[0]) as log:  # noqa: F821
    spec = ModelSpec(name=snakemake.wildcards.model, **snakemake.params.spec)  # noqa: F821
    record = resolve_model(spec, cache_dir=snakemake.params.cache_dir)  # noqa: F821
    log.info("%s -> %s (revision %s)", spec.id, record.local_path, record.revision_resolved)
    write_model_record(record, snakemake.output[0])  # noqa: F821
