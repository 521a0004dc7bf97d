"""Snakemake adapter: download (or copy) the implicit-captioner weights and record where they are."""

from pathlib import Path

from sd4match.fetch import download
from sd4match.io import write_json_atomic
from sd4match.logs import log_to

with log_to(snakemake.log[0]) as log:  # noqa: F821
    p = snakemake.params  # noqa: F821
    dest = Path(p.downloads) / p.url.rstrip("/").rsplit("/", 1)[-1]
    digest = download(p.url, dest, sha256=p.sha256)
    log.info("implicit captioner weights %s sha256=%s", dest, digest)
    write_json_atomic(snakemake.output[0], {"url": p.url, "path": str(dest), "sha256": digest})  # noqa: F821
