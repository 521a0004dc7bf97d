"""Snakemake adapter: write the demo world's keypoint dataset in the custom layout (images + pairs.csv)."""

from pathlib import Path

from sd4match.demo_world import make_custom_dataset, spec_from_config
from sd4match.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821
    pairs = make_custom_dataset(
        Path(snakemake.output.pairs).parent,  # noqa: F821
        spec_from_config(snakemake.params.demo_world),  # noqa: F821
    )
    if pairs.resolve() != Path(snakemake.output.pairs).resolve():  # noqa: F821
        raise RuntimeError(f"demo world wrote {pairs}, the rule expects {snakemake.output.pairs}")  # noqa: F821
