"""Snakemake adapter: re-resolve the configured hub revisions, rewrite the model lock and moved records."""

from sd4match.logs import log_to
from sd4match.model_lock import refresh_lock

with log_to(snakemake.log[0]) as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    changes = refresh_lock(p.specs, p.lock, p.records, cache_dir=p.cache_dir)
    for change in changes:
        log.info(
            "%s (%s): %s -> %s%s",
            change.name,
            change.id,
            change.old_commit or "not locked",
            change.new_commit,
            "; record rewritten, its results will rerun" if change.record_rewritten else "",
        )
    log.info("wrote %s (%d hub models)", p.lock, len(changes))
