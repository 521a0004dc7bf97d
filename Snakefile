"""sd4match: re-create SD4Match (CVPR 2024) end to end.

Paper run:  snakemake --cores all --resources gpu=3
Demo run:   snakemake --profile profiles/demo
"""


configfile: "config.yaml"


report: "report/workflow.rst"


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


rule all:
    default_target: True
    input:
        all_targets(),
