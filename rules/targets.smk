"""Named targets: `snakemake <name>` builds one table, figure or ablation (every seed) and only what it needs."""


rule tables:
    input:
        [f"{OUT}/tables/{name}.md" for name in TABLES],


rule figures:
    input:
        [f"{OUT}/figures/{name}.png" for name in FIGURES],


rule ablation_cpm_pair_local:
    input:
        list(
            sd4match_seed_summaries(
                FIG3A["trainset"], FIG3A["cases"][1], "spair"
            ).values()
        ),


rule ablation_cpm_pair_global:
    input:
        list(
            sd4match_seed_summaries(
                FIG3A["trainset"], FIG3A["cases"][2], "spair"
            ).values()
        ),


rule ablation_cpm_individual_local:
    input:
        list(
            sd4match_seed_summaries(
                FIG3A["trainset"], FIG3A["cases"][3], "spair"
            ).values()
        ),


rule ablation_cpm_individual_global:
    input:
        list(
            sd4match_seed_summaries(
                FIG3A["trainset"], FIG3A["cases"][4], "spair"
            ).values()
        ),


rule ablation_cpm_no_global:
    input:
        list(
            sd4match_seed_summaries(
                FIG3A["trainset"], FIG3A["cases"][5], "spair"
            ).values()
        ),


rule ablation_cpm_no_gn:
    input:
        list(
            sd4match_seed_summaries(
                FIG3A["trainset"], FIG3A["cases"][6], "spair"
            ).values()
        ),
