"""The paper's figures: Fig. 3a (CPM ablation), Fig. 3b (timesteps), Fig. 4/5 (prompt images), matches."""


rule fig3a:
    input:
        summaries=[
            path
            for seeds in fig3a_seed_summaries().values()
            for path in seeds.values()
        ],
        per_pair=per_pairs_of(fig3a_summaries().values()),  # intervals, each case vs case 1
        pairs=[pairs_report(FIG3A["trainset"])],
        models=[model_record(SD4["model"]), model_record(SD4["dino_model"])],
    output:
        png=report_figure("fig3a", "png"),
        pdf=report_figure("fig3a", "pdf"),
        provenance=f"{OUT}/figures/fig3a.png.provenance.json",
        csv=f"{OUT}/tables/fig3a.csv",
        csv_provenance=f"{OUT}/tables/fig3a.csv.provenance.json",
        md=f"{OUT}/tables/fig3a.md",
        html=report_table("fig3a"),
        caption=report_caption("fig3a"),
    log:
        log_path("figures/fig3a.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        summary_paths=fig3a_summaries(),
        seed_paths=fig3a_seed_summaries(),
        matching=config["matching"]["reported"],
        max_pairs=config["evaluation"]["max_pairs"],
        provenance=provenance(
            "fig3a",
            "matching.reported",
            models=[SD4["model"], SD4["dino_model"]],
            datasets=[FIG3A["trainset"]],
            variants=sorted(set(FIG3A["cases"].values())),
        ),
    script:
        "../workflow_scripts/fig3a.py"


rule fig3b:
    input:
        sd4match=[
            path
            for t in FIG3B["timesteps"]
            for path in timestep_seed_summaries(t).values()
        ],
        baseline=[timestep_baseline_summary(t) for t in FIG3B["timesteps"]],
        per_pair=timestep_per_pairs(),  # the interval of every point
        pairs=[pairs_report("spair")],
        models=[model_record(SD4["model"]), model_record(SD4["dino_model"])],
    output:
        png=report_figure("fig3b", "png"),
        pdf=report_figure("fig3b", "pdf"),
        provenance=f"{OUT}/figures/fig3b.png.provenance.json",
        csv=f"{OUT}/tables/fig3b.csv",
        csv_provenance=f"{OUT}/tables/fig3b.csv.provenance.json",
        md=f"{OUT}/tables/fig3b.md",
        html=report_table("fig3b"),
        caption=report_caption("fig3b"),
    log:
        log_path("figures/fig3b.log"),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        sd4match={t: timestep_summary(t) for t in FIG3B["timesteps"]},
        seeds={t: timestep_seed_summaries(t) for t in FIG3B["timesteps"]},
        baseline={t: timestep_baseline_summary(t) for t in FIG3B["timesteps"]},
        max_pairs=config["evaluation"]["max_pairs"],
        labels=(f"SD4Match ({FIG3B['variant']})", f"{FIG3B['baseline']} (zero-shot)"),
        # each curve scored as its tables score it: DIFT by nearest neighbour (Tables 1-3)
        matching={
            "sd4match": config["matching"]["reported"],
            "baseline": config["zero_shot_matching"],
        },
        provenance=provenance(
            "fig3b",
            "matching.reported",
            "zero_shot_matching",
            models=[SD4["model"], SD4["dino_model"], ZS[FIG3B["baseline"]]["model"]],
            datasets=["spair"],
            variants=[FIG3B["variant"]],
            zero_shot=[FIG3B["baseline"]],
        ),
    script:
        "../workflow_scripts/fig3b.py"


rule fig4:
    input:
        prompt=prompt_file("spair", "class", primary("spair", "class")),
        sd_model=model_record(SD4["model"]),
    output:
        png=report_figure("fig4", "png"),
        pdf=report_figure("fig4", "pdf"),
        provenance=f"{OUT}/figures/fig4.png.provenance.json",
        caption=report_caption("fig4"),
    log:
        log_path("figures/fig4.log"),
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["figure"],
        mem_mb=16000,
        runtime=60,
    params:
        categories=FIGS["fig4_categories"],
        generation=FIGS["generation"],
        provenance=provenance(
            "figures.fig4_categories",
            "figures.generation",
            models=[SD4["model"]],
            datasets=["spair"],
            variants=["class"],
        ),
    script:
        "../workflow_scripts/fig4.py"


rule fig5:
    input:
        prompt=prompt_file("spair", "cpm", primary("spair", "cpm")),
        sd_model=model_record(SD4["model"]),
        dinov2_model=model_record(SD4["dino_model"]),
        dino_cache=dino_cache("spair", "test"),
        pairs=pairs_table("spair", "test"),
        data=fetch_record("spair"),
    output:
        png=report_figure("fig5", "png"),
        pdf=report_figure("fig5", "pdf"),
        provenance=f"{OUT}/figures/fig5.png.provenance.json",
        caption=report_caption("fig5"),
    log:
        log_path("figures/fig5.log"),
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["figure"],
        mem_mb=16000,
        runtime=60,
    params:
        n_pairs=FIGS["fig5_pairs"],
        generation=FIGS["generation"],
        provenance=provenance(
            "figures.fig5_pairs",
            "figures.generation",
            models=[SD4["model"], SD4["dino_model"]],
            datasets=["spair"],
            variants=["cpm"],
        ),
    script:
        "../workflow_scripts/fig5.py"


rule qualitative:
    input:
        prompt=prompt_file("spair", "cpm", primary("spair", "cpm")),
        sd_model=model_record(SD4["model"]),
        dinov2_model=model_record(SD4["dino_model"]),
        dino_cache=dino_cache("spair", "test"),
        pairs=pairs_table("spair", "test"),
        data=fetch_record("spair"),
    output:
        png=report_figure("qualitative", "png"),
        pdf=report_figure("qualitative", "pdf"),
        provenance=f"{OUT}/figures/qualitative.png.provenance.json",
        caption=report_caption("qualitative"),
    log:
        log_path("figures/qualitative.log"),
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=config["gpu"]["figure"],
        mem_mb=16000,
        runtime=60,
    params:
        n_pairs=FIGS["qualitative_pairs"],
        evaluation=SD4["evaluation"],
        matching=config["matching"],
        image_size=config["image_size"],
        seed=primary("spair", "cpm"),  # the noise of that prompt's evaluation: the figure shows its matches
        provenance=provenance(
            "figures.qualitative_pairs",
            "matching.reported",
            models=[SD4["model"], SD4["dino_model"]],
            datasets=["spair"],
            variants=["cpm"],
        ),
    script:
        "../workflow_scripts/qualitative.py"
