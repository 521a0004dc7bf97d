"""Snakemake adapter: resolve a registry model (at its locked commit, if locked) and record its revision."""

from sd4match.logs import log_to
from sd4match.model_lock import resolve_with_lock
from sd4match.models import ModelSpec, write_model_record

with log_to(snakemake.log[0]) as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    spec = ModelSpec(name=snakemake.wildcards.model, **p.spec)  # noqa: F821
    record = resolve_with_lock(spec, p.lock, cache_dir=p.cache_dir)
    log.info(
        "%s@%s -> %s (revision %s, weights %s; lock %s)",
        spec.id,
        spec.revision,
        record.local_path,
        record.revision_resolved,
        ", ".join(record.weight_files),
        p.lock,
    )
    write_model_record(record, snakemake.output[0])  # noqa: F821
