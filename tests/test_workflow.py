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
    "resolve_model": 2,  # SD 2-1, DINOv2
    "pairs_table": 7,  # three test splits + SPair and PF-Pascal trn/val
    "evaluate_dift": 3,
    "latent_cache": 2,  # SPair, PF-Pascal (trn + val images)
    "dino_cache": 5,  # trn+val of the two training sets, test of the three test sets (CPM)
    "train_prompt": 5,  # SPair: Single, Class, CPM; PF-Pascal: Single, CPM
    "evaluate_prompt": 13,  # 4 runs x 3 test sets + Class on SPair only
    "table_zero_shot_dift": 1,
    "table2_sd4match": 1,
    "table3_sd4match": 1,
    "all": 1,
}


def test_paper_dag_contains_every_job(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), cwd=empty_workdir)
    assert counts == PAPER_JOBS | {"total": sum(PAPER_JOBS.values())}


def test_demo_dag_adds_only_the_demo_world(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "--configfile", "config.yaml", "profiles/demo/world.yaml", cwd=empty_workdir
    )
    demo_jobs = {"demo_datasets": 1, "tiny_model": 2}
    assert counts == PAPER_JOBS | demo_jobs | {"total": sum(PAPER_JOBS.values()) + 3}


def test_one_target_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "results/zero_shot/dift/pfwillow/summary.csv", cwd=empty_workdir
    )
    assert counts == {
        "fetch_dataset": 1,
        "resolve_model": 1,
        "pairs_table": 1,
        "evaluate_dift": 1,
        "total": 4,
    }


def test_one_training_run_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "results/sd4match/spair/single/pfwillow/summary.csv", cwd=empty_workdir
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
    for table_name in ("zero_shot_dift", "table2_sd4match", "table3_sd4match"):
        assert "DEMO RUN" in (out / f"tables/{table_name}.md").read_text()
    table = pd.read_csv(out / "tables/zero_shot_dift.csv")
    assert set(table["source"]) == {"ours", "paper", "delta"}
    for dataset in ("spair", "pfpascal", "pfwillow"):
        pairs = pd.read_parquet(out / f"pairs/{dataset}_test.parquet")
        per_pair = pd.read_csv(out / f"zero_shot/dift/{dataset}/per_pair.csv")
        # every pair scored once per matching method and alpha
        assert len(per_pair) == len(pairs) * 3 * 3
        assert per_pair["pck"].between(0, 100).all()
    for log in ("demo/demo_datasets.log", "data/fetch_spair.log", "zero_shot/dift_spair.log"):
        assert (empty_workdir / "logs" / log).exists()
