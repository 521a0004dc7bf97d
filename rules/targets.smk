"""Named targets: `snakemake <name>` builds one table, figure or ablation and only what it needs."""


rule tables:
    input:
        [f"{OUT}/tables/{name}.md" for name in TABLES],


rule figures:
    input:
        [f"{OUT}/figures/{name}.png" for name in FIGURES],


rule ablation_cpm_pair_local:
    input:
        sd4match_summary(FIG3A["trainset"], FIG3A["cases"][1], "spair"),


rule ablation_cpm_pair_global:
    input:
        sd4match_summary(FIG3A["trainset"], FIG3A["cases"][2], "spair"),


rule ablation_cpm_individual_local:
    input:
        sd4match_summary(FIG3A["trainset"], FIG3A["cases"][3], "spair"),


rule ablation_cpm_individual_global:
    input:
        sd4match_summary(FIG3A["trainset"], FIG3A["cases"][4], "spair"),


rule ablation_cpm_no_global:
    input:
        sd4match_summary(FIG3A["trainset"], FIG3A["cases"][5], "spair"),


rule ablation_cpm_no_gn:
    input:
        sd4match_summary(FIG3A["trainset"], FIG3A["cases"][6], "spair"),
