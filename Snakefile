"""sd4match: re-create SD4Match (CVPR 2024) end to end.

Paper run:  snakemake --cores all --resources gpu=3
Demo run:   snakemake --profile profiles/demo
"""

import os

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


# The conda env's post-deploy script (envs/sd4match.post-deploy.sh), which Snakemake runs from the working
# directory, installs the package from here (set, not read: no `envvars:` assertion applies).
os.environ.update(SD4MATCH_SOURCE=workflow.basedir)


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/zero_shot.smk"
include: "rules/caches.smk"
include: "rules/training.smk"
include: "rules/sd4match.smk"
include: "rules/released.smk"
include: "rules/report.smk"
include: "rules/figures.smk"
include: "rules/targets.smk"


# Run on the submit host under a cluster executor: downloads (compute nodes often have no internet), the
# demo world's builders, the cheap table/plot rules and the named targets.
localrules:
    all,
    demo_datasets,
    tiny_model,
    tiny_captioner,
    fetch_dataset,
    fetch_captioner,
    resolve_model,
    refresh_model_lock,
    table_zero_shot_dift,
    table1,
    table2,
    table3,
    fig3a,
    fig3b,
    tables,
    figures,
    ablation_cpm_pair_local,
    ablation_cpm_pair_global,
    ablation_cpm_individual_local,
    ablation_cpm_individual_global,
    ablation_cpm_no_global,
    ablation_cpm_no_gn,
    import_released_prompts,
    demo_released_prompts,
    released_table,
    released_prompts,
    released_tables,
    demo_custom_dataset,
    table_custom,
    custom_tables,


rule all:
    default_target: True
    input:
        all_targets(),
