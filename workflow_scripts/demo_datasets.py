"""Snakemake adapter: write the demo world's synthetic datasets as the official archives."""

from pathlib import Path

from sd4match.demo_world import make_demo_world, spec_from_config
from sd4match.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821
    out_dir = Path(snakemake.output.spair).parent  # noqa: F821
    made = make_demo_world(out_dir, spec_from_config(snakemake.params.demo_world))  # noqa: F821
    expected = {
        "spair_archive": snakemake.output.spair,  # noqa: F821
        "pfpascal_images_archive": snakemake.output.pfpascal_images,  # noqa: F821
        "pfpascal_pairs_archive": snakemake.output.pfpascal_pairs,  # noqa: F821
        "pfwillow_images_archive": snakemake.output.pfwillow_images,  # noqa: F821
        "pfwillow_pairs_csv": snakemake.output.pfwillow_pairs,  # noqa: F821
    }
    for key, path in expected.items():
        if Path(made[key]).resolve() != Path(path).resolve():
            raise RuntimeError(f"demo world wrote {key} to {made[key]}, the rule expects {path}")
