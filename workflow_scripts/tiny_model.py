"""Snakemake adapter: build one tiny randomly-initialised model of a real class (demo world)."""

from sd4match.logs import log_to
from sd4match.tiny_models import build_tiny_model

with log_to(snakemake.log[0]):  # noqa: F821
    build_tiny_model(snakemake.wildcards.model, snakemake.output[0], seed=snakemake.params.seed)  # noqa: F821
