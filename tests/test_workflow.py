"""The Snakemake DAG: the paper DAG dry-runs with every job it must contain; the demo DAG runs end to end."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table into {rule: count}."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def dry_run(*args: str, cwd: Path = REPO) -> dict[str, int]:
    result = snakemake("-n", "--quiet", "rules", *args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return job_counts(result.stdout + result.stderr)


@pytest.fixture
def empty_workdir(tmp_path: Path) -> Path:
    """A working directory with the configs but no results, so dry runs plan the whole DAG."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "profiles/demo").mkdir(parents=True)
    shutil.copy(REPO / "profiles/demo/world.yaml", tmp_path / "profiles/demo/world.yaml")
    return tmp_path


PAPER_JOBS = {
    "fetch_dataset": 3,
    "fetch_captioner": 1,
    "resolve_model": 5,  # SD 2-1, SD 1-5, DINOv2, DINO, CLIP ViT-L/14-336
    "pairs_table": 7,  # three test splits + SPair and PF-Pascal trn/val
    # DIFT x3, DIFT-empty, DINO x3, DINOv2 x3, SD+DINO x3, SD+DINO* x3 (Table 1), DIFT at 10 t (Fig. 3b):
    # Fig. 3b's DIFT point at t=261 is the main DIFT SPair job (same method, prompt, ensemble, seed), reused
    "evaluate_zero_shot": 26,
    "latent_cache": 2,  # SPair, PF-Pascal (trn + val images)
    "dino_cache": 5,  # trn+val of the two training sets, test of the three test sets (CPM)
    "train_prompt": 10,  # SPair: Single, Class, CPM + 5 Fig. 3a cases; PF-Pascal: Single, CPM
    "evaluate_prompt": 18,  # 4 runs x 3 test sets + Class on SPair + 5 ablations on SPair
    # Fig. 3b grid of 11 t but t=50: that point is the main SPair-71k evaluation of spair/cpm
    # (evaluate_prompt: same prompt, seed, ensemble, matching), reused rather than run twice
    "evaluate_prompt_timestep": 10,
    "table_zero_shot_dift": 1,
    "table1": 1,
    "table2": 1,
    "table3": 1,
    "fig3a": 1,
    "fig3b": 1,
    "fig4": 1,
    "fig5": 1,
    "qualitative": 1,
    "all": 1,
}


def test_paper_dag_contains_every_job(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), cwd=empty_workdir)
    assert counts == PAPER_JOBS | {"total": sum(PAPER_JOBS.values())}


def test_demo_dag_adds_only_the_demo_world(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "--configfile", "config.yaml", "profiles/demo/world.yaml", cwd=empty_workdir
    )
    # the demo world adds its archives, five tiny models and the tiny captioner; it sweeps 2 timesteps
    # (50, 261: SD4Match's t=50 and DIFT's t=261 points are the main evaluations, so one job of each sweep
    # runs); it trains spair/single with a second seed (seeds_per_run), evaluated on the three test sets
    demo = PAPER_JOBS | {"evaluate_zero_shot": 26 - 9, "evaluate_prompt_timestep": 1}
    demo |= {"train_prompt": 10 + 1, "evaluate_prompt": 18 + 3}
    demo |= {"demo_datasets": 1, "tiny_model": 5, "tiny_captioner": 1}
    assert counts == demo | {"total": sum(demo.values())}


def test_one_target_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "results/zero_shot/dift/pfwillow/summary.csv", cwd=empty_workdir
    )
    assert counts == {
        "fetch_dataset": 1,
        "resolve_model": 1,
        "pairs_table": 1,
        "evaluate_zero_shot": 1,
        "total": 4,
    }


def test_one_training_run_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run(
        "-d",
        str(empty_workdir),
        "results/sd4match/spair/single/seed0/pfwillow/summary.csv",
        cwd=empty_workdir,
    )
    assert counts == {
        "fetch_dataset": 2,
        "resolve_model": 1,
        "pairs_table": 3,
        "latent_cache": 1,
        "train_prompt": 1,
        "evaluate_prompt": 1,
        "total": 9,
    }


def test_one_ablation_target_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), "ablation_cpm_no_gn", cwd=empty_workdir)
    assert counts == {
        "fetch_dataset": 1,
        "resolve_model": 2,
        "pairs_table": 3,
        "latent_cache": 1,
        "dino_cache": 2,
        "train_prompt": 1,
        "evaluate_prompt": 1,
        "ablation_cpm_no_gn": 1,
        "total": 12,
    }


def test_seeds_multiply_training_runs_and_their_evaluations(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), "--config", "seeds=[0, 1, 2]", cwd=empty_workdir)
    # every training run, its evaluations and the Fig. 3b sweep (10 t, t=50 reused) three times; zero-shot and
    # figures once
    tripled = {"train_prompt": 30, "evaluate_prompt": 54, "evaluate_prompt_timestep": 30}
    assert counts == PAPER_JOBS | tripled | {"total": sum((PAPER_JOBS | tripled).values())}


def test_one_seed_of_one_run_is_its_own_target(empty_workdir: Path):
    target = "results/sd4match/spair/single/seed7/pfwillow/summary.csv"  # any seed, configured or not
    counts = dry_run("-d", str(empty_workdir), target, cwd=empty_workdir)
    assert counts["train_prompt"] == 1 and counts["evaluate_prompt"] == 1
    ablation = dry_run(
        "-d",
        str(empty_workdir),
        "ablation_cpm_no_gn",
        "--config",
        "seeds_per_run={spair/cpm_no_gn: [3, 4]}",
        cwd=empty_workdir,
    )
    assert (ablation["train_prompt"], ablation["evaluate_prompt"]) == (2, 2)
    result = snakemake(
        "-n", "-d", str(empty_workdir), "--config", "seeds_per_run={spair/cpm_typo: [1]}", cwd=empty_workdir
    )
    assert result.returncode != 0
    assert "key 'seeds_per_run.spair/cpm_typo' names variant 'cpm_typo'" in result.stdout + result.stderr
    for bad in ("seeds=[]", "seeds=[0, 0]", "seeds=[-1]"):
        result = snakemake("-n", "-d", str(empty_workdir), "--config", bad, cwd=empty_workdir)
        assert result.returncode != 0 and "key 'seeds" in result.stdout + result.stderr, bad


def test_fig3b_reuses_the_main_evaluations(empty_workdir: Path):
    """Fig. 3b's SD4Match t=50 point is the main spair/cpm SPair evaluation and its DIFT t=261 point the main
    DIFT SPair evaluation: the figure reads those files, and no sweep job recomputes them."""
    result = snakemake("-n", "-d", str(empty_workdir), "fig3b", cwd=empty_workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    planned = result.stdout + result.stderr
    assert "results/sd4match/spair/cpm/seed0/spair/summary.csv" in planned
    assert "results/zero_shot/dift/spair/summary.csv" in planned
    assert "results/timesteps/spair/cpm/seed0/spair_t100/summary.csv" in planned
    assert "results/zero_shot/dift_t100/spair/summary.csv" in planned
    for duplicate in ("spair_t50/", "dift_t261/"):
        assert duplicate not in planned, duplicate
    counts = job_counts(planned)
    assert counts["evaluate_prompt_timestep"] == 10 and counts["evaluate_zero_shot"] == 11
    assert counts["evaluate_prompt"] == 1  # the main spair/cpm SPair evaluation


def params_block(rule: str, text: str) -> list[str]:
    """The lines of a rule's params: block in a .smk file."""
    body = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
    params = body.split("    params:\n", 1)[1].split("    script:", 1)[0]
    return [line.strip() for line in params.splitlines() if line.strip()]


def test_timestep_evaluation_differs_from_the_main_one_only_in_its_timestep():
    """What makes reusing the main evaluation for Fig. 3b's t=50 point exact: the two rules run the same
    script on the same inputs with the same params but the evaluation timestep."""
    text = (REPO / "rules/sd4match.smk").read_text()
    main, sweep = params_block("evaluate_prompt", text), params_block("evaluate_prompt_timestep", text)
    assert 'evaluation=lambda wc: SD4["evaluation"] | {"timestep": int(wc.t)},' in sweep
    assert [line for line in sweep if not line.startswith("evaluation=")] == [
        line for line in main if not line.startswith("evaluation=")
    ]
    assert 'evaluation=SD4["evaluation"],' in main
    for rule in ("evaluate_prompt", "evaluate_prompt_timestep"):
        body = text.split(f"rule {rule}:", 1)[1]
        assert body.split("input:", 1)[1].split("output:", 1)[0].strip() == "unpack(evaluate_prompt_inputs),"
        assert '"../workflow_scripts/evaluate_prompt.py"' in body.split("\nrule ", 1)[0]


def test_named_table_target_plans_no_training(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), "table1", cwd=empty_workdir)
    assert counts["table1"] == 1 and counts["evaluate_zero_shot"] == 5 and "train_prompt" not in counts


def test_bad_config_value_stops_before_any_job(empty_workdir: Path):
    result = snakemake("-n", "-d", str(empty_workdir), "--config", "image_size=770", cwd=empty_workdir)
    assert result.returncode != 0
    assert "key 'image_size'" in result.stdout + result.stderr


@pytest.mark.slow
def test_demo_dag_runs_end_to_end(empty_workdir: Path):
    """The whole demo DAG through the rules a GPU user runs: archives, fetch, parse, models, DIFT, table."""
    result = snakemake(
        "-d",
        str(empty_workdir),
        "--configfile",
        "config.yaml",
        "profiles/demo/world.yaml",
        "--cores",
        "2",
        "--resources",
        "gpu=1",
        cwd=empty_workdir,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    out = empty_workdir / "results/demo"
    for table_name in ("zero_shot_dift", "table1", "table2", "table3", "fig3a", "fig3b"):
        assert "DEMO RUN" in (out / f"tables/{table_name}.md").read_text()
    for figure in ("fig3a", "fig3b", "fig4", "fig5", "qualitative"):
        assert (out / f"figures/{figure}.png").stat().st_size > 0
        assert (out / f"figures/{figure}.pdf").stat().st_size > 0
    table2 = pd.read_csv(out / "tables/table2.csv")
    assert {"ours", "paper", "delta", "quoted"} <= set(table2["source"])
    report = snakemake(
        "-d",
        str(empty_workdir),
        "--configfile",
        "config.yaml",
        "profiles/demo/world.yaml",
        "--report",
        "report.html",
        cwd=empty_workdir,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    html = (empty_workdir / "report.html").read_text(errors="replace")
    assert "Fig. 3a" in html and "Table 2" in html
    table = pd.read_csv(out / "tables/zero_shot_dift.csv")
    assert set(table["source"]) == {"ours", "paper", "delta"}
    for dataset in ("spair", "pfpascal", "pfwillow"):
        pairs = pd.read_parquet(out / f"pairs/{dataset}_test.parquet")
        per_pair = pd.read_csv(out / f"zero_shot/dift/{dataset}/per_pair.csv")  # DIFT, 3 methods x 3 alphas
        # every pair scored once per matching method and alpha
        assert len(per_pair) == len(pairs) * 3 * 3
        assert per_pair["pck"].between(0, 100).all()
    # two seeds of spair/single (seeds_per_run): two prompts, a spread, and intervals around summary.csv
    from sd4match.uncertainty import intervals_from_file, seed_spread_from_files

    run = out / "sd4match/spair/single"
    prompts = [(out / f"prompts/spair/single/seed{k}/prompt.safetensors").read_bytes() for k in (0, 1)]
    assert prompts[0] != prompts[1]
    spread = seed_spread_from_files({k: run / f"seed{k}/spair/summary.csv" for k in (0, 1)})
    assert (spread["n_seeds"] == 2).all() and spread["pck_per_image_std"].notna().all()
    intervals = intervals_from_file(run / "seed0/spair/per_pair.csv")
    summary = pd.read_csv(run / "seed0/spair/summary.csv")
    assert intervals["category"].tolist() == summary["category"].tolist()
    for kind in ("pck_per_image", "pck_per_keypoint"):
        assert intervals[kind].to_numpy() == pytest.approx(summary[kind].to_numpy(), abs=1e-9)
        assert (intervals[f"{kind}_lo"] <= intervals[kind] + 1e-9).all()
        assert (intervals[kind] <= intervals[f"{kind}_hi"] + 1e-9).all()
    for log in (
        "demo/demo_datasets.log",
        "data/fetch_spair.log",
        "zero_shot/dift_spair.log",
        "train/spair_cpm_seed0.log",
        "train/spair_single_seed1.log",
    ):
        assert (empty_workdir / "logs" / log).exists()


def test_slurm_profile_names_only_existing_rules():
    import yaml

    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    listed = snakemake("--list-rules", cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    rules = set(listed.stdout.split())
    assert profile["executor"] == "slurm"
    assert set(profile["set-resources"]) <= rules
    assert set(profile["set-threads"]) <= rules
