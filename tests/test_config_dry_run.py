"""Issue 7 §4 through Snakemake itself: a setting a job would reject stops `snakemake -n`, naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_workflow import REPO, job_counts, snakemake


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    return tmp_path


def overlay(workdir: Path, text: str) -> list[str]:
    """A YAML config file on top of config.yaml (YAML spells floats and int keys as a user writes them)."""
    (workdir / "overlay.yaml").write_text(text)
    return ["--configfile", "config.yaml", "overlay.yaml"]


BAD = [
    # (extra snakemake arguments, key named, words of the message)
    (["--config", "sd4match={training: {window: 8}}"], "sd4match.training.window", "positive odd integer"),
    (["--config", "gpu={train: 2}"], "sd4match.training.batch_size", "'gpu.train'"),
    (
        ["--config", "sd4match={training: {batch_size: 10, per_device_batch: 3}}"],
        "sd4match.training.batch_size",
        "per_device_batch",
    ),
    (
        ["--config", "sd4match={training: {per_device_batch: big}}"],
        "sd4match.training.per_device_batch",
        "'big'",
    ),
    (["--config", "seed=1.0"], "seed", "1.0 is not of type 'integer'"),
    (["--config", "image_size=128.0"], "image_size", "128.0 is not of type 'integer'"),
    ("image_size: 128.0\n", "image_size", "128.0 is not of type 'integer'"),
    (["--config", "image_size=32"], "image_size", "below the 64 px the SD UNet needs"),
    ("fig3a:\n  cases:\n    7: cpm\n", "fig3a.cases.7", "is not a Fig. 3a case"),
    (["--config", "fig3a={cases: {7: cpm}}"], "fig3a.cases.7", "is not a Fig. 3a case"),
    (["--config", "figures={fig4_categories: [aeroplane, sofa]}"], "figures.fig4_categories", "['sofa']"),
]


@pytest.mark.parametrize(("args", "key", "words"), BAD)
def test_bad_setting_stops_the_dry_run_naming_the_key(workdir: Path, args, key: str, words: str):
    extra = overlay(workdir, args) if isinstance(args, str) else args
    result = snakemake("-n", "-d", str(workdir), *extra, cwd=workdir)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"key '{key}'" in output and words in output, output[-3000:]


def test_fig3a_case_overrides_from_the_command_line_merge_with_config_yaml(workdir: Path):
    """`--config` gives case keys as strings beside config.yaml's ints: the override replaces case 2."""
    args = ("-n", "-d", str(workdir), "ablation_cpm_pair_global", "--config", "fig3a={cases: {2: cpm_no_gn}}")
    result = snakemake(*args, cwd=workdir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "results/sd4match/spair/cpm_no_gn/seed0/spair/summary.csv" in output
    assert "cpm_pair_global" not in output.replace("ablation_cpm_pair_global", "")
    assert job_counts(output)["train_prompt"] == 1
