"""Every file the cache, training, evaluation and figure rules write is a declared output, so Snakemake cleans
it with the output; identical reruns of a rule write identical bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ("--configfile", "config.yaml", "profiles/demo/world.yaml")
# Folders of results/demo written by the rules under test (and the Fig. 3a/3b tables they write).
OWN_FOLDERS = ("cache", "prompts", "sd4match", "timesteps", "figures")
OWN_TABLES = ("fig3a.", "fig3b.")
RESUME_STATE = "checkpoints"  # train_prompt's resume state: deliberately not an output (rules/training.smk)


def snakemake(workdir: Path, targets: list[str], *options: str) -> subprocess.CompletedProcess:
    """Run Snakemake on the demo config; targets first and config files last (both options take lists)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *targets, "-d", str(workdir)]
    return subprocess.run(
        [*command, *options, *DEMO_CONFIG], cwd=workdir, capture_output=True, text=True, timeout=1800
    )


def own_files(results: Path) -> list[str]:
    """Files under the rules' folders (resume state excluded) and their tables, relative to ``results``."""
    files = [p for folder in OWN_FOLDERS for p in (results / folder).rglob("*") if p.is_file()]
    files += [p for p in (results / "tables").glob("*") if p.name.startswith(OWN_TABLES)]
    return sorted(
        str(p.relative_to(results)) for p in files if RESUME_STATE not in p.relative_to(results).parts
    )


@pytest.mark.slow
def test_every_file_the_rules_write_is_cleaned_with_their_outputs(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "profiles/demo").mkdir(parents=True)
    shutil.copy(REPO / "profiles/demo/world.yaml", tmp_path / "profiles/demo/world.yaml")
    run = snakemake(tmp_path, ["figures"], "--cores", "2", "--resources", "gpu=1")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = tmp_path / "results/demo"
    written = own_files(results)
    for expected in (
        "prompts/spair/cpm/seed0/prompt.safetensors.json",
        "cache/latents/spair_trnval.safetensors.json",
        "cache/dinov2/spair_test.safetensors.json",
        "figures/fig4.png.provenance.json",
        "tables/fig3a.csv.provenance.json",
    ):
        assert expected in written
    prompt = results / "prompts/spair/cpm/seed0/prompt.safetensors"
    cache = results / "cache/latents/spair_trnval.safetensors"
    before = {path: path.read_bytes() for path in (prompt, Path(f"{prompt}.json"), cache)}
    target = str(prompt.relative_to(tmp_path))
    again = snakemake(
        tmp_path,
        [target],
        "--cores",
        "2",
        "--resources",
        "gpu=1",
        "--forcerun",
        "train_prompt",
        "latent_cache",
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert {path: path.read_bytes() for path in before} == before  # retrained: byte-identical files
    deleted = snakemake(tmp_path, ["figures"], "--delete-all-output")
    assert deleted.returncode == 0, deleted.stderr[-4000:]
    assert own_files(results) == []
