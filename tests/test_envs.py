"""The conda environment of `--sdm conda`: buildable by inspection, pins agree with pyproject.toml, and the
post-deploy step installs this checkout from where Snakemake runs it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from workflow_probe import probe_workflow

REPO = Path(__file__).resolve().parents[1]
ENV_FILE = REPO / "envs" / "sd4match.yaml"
POST_DEPLOY = REPO / "envs" / "sd4match.post-deploy.sh"
# pyproject name -> conda-forge name, where they differ
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}
# runs outside the environment: Snakemake itself (scripts unpickle its object from Snakemake's search path)
NOT_IN_ENV = {"snakemake"}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<version>[0-9][0-9A-Za-z.]*)$")


def _env() -> dict:
    return yaml.safe_load(ENV_FILE.read_text())


def _pins() -> dict[str, Version]:
    pins = {}
    for dependency in _env()["dependencies"]:
        assert isinstance(dependency, str), (
            f"{ENV_FILE.name}: {dependency!r} (no pip section: the env is conda-only)"
        )
        match = PIN.match(dependency)
        assert match, f"{ENV_FILE.name}: {dependency!r} is not pinned as name=version"
        pins[match["name"]] = Version(match["version"])
    return pins


def test_env_is_conda_forge_only_and_fully_pinned() -> None:
    env = _env()
    assert env["channels"] == ["conda-forge", "nodefaults"]
    pins = _pins()
    assert "pytorch-cuda" not in pins and "cpuonly" not in pins  # conda-forge picks the build by driver
    assert {"python", "pip", "setuptools", "pytorch"} <= set(pins)


def test_env_pins_satisfy_every_floor_of_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    assert pins["python"] in Requirement(f"python{project['requires-python']}").specifier
    checked = set()
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.name in NOT_IN_ENV:
            continue
        conda_name = CONDA_NAMES.get(requirement.name, requirement.name)
        assert conda_name in pins, f"{ENV_FILE.name} lacks {conda_name} (pyproject: {line})"
        assert pins[conda_name] in requirement.specifier, f"{conda_name}={pins[conda_name]} violates {line}"
        checked.add(conda_name)
    # nothing pinned that the package does not need (besides the interpreter and the install tools)
    assert set(pins) - checked == {"python", "pip", "setuptools"}


def _snakemake_aux_file(env_file: Path, suffix: str) -> Path:
    """The file Snakemake looks for beside a conda env file (deployment/conda.py: replace .yaml by suffix)."""
    return env_file.with_name(env_file.name[: -len(".yaml")] + suffix)


def _run_post_deploy(workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the post-deploy script as Snakemake does: a copy at .snakemake/conda/<hash>.post-deploy.sh, run
    with the interpreter of its shebang, from the working directory."""
    copy = workdir / ".snakemake" / "conda" / "0123abcd.post-deploy.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy(_snakemake_aux_file(ENV_FILE, ".post-deploy.sh"), copy)
    first = copy.read_text().splitlines()[0]
    interpreter = shlex.split(first[2:]) if first.startswith("#!") else ["sh"]
    return subprocess.run([*interpreter, str(copy)], cwd=workdir, env=env, capture_output=True, text=True)


def test_post_deploy_installs_this_checkout_from_the_working_directory(tmp_path: Path) -> None:
    assert _snakemake_aux_file(ENV_FILE, ".post-deploy.sh") == POST_DEPLOY and POST_DEPLOY.is_file()
    shims = tmp_path / "bin"
    shims.mkdir()
    record = tmp_path / "python-args.txt"
    (shims / "python").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (shims / "python").chmod(0o755)
    workdir = tmp_path / "workdir"  # e.g. `snakemake -d elsewhere`: not the checkout
    workdir.mkdir()
    env = {"PATH": f"{shims}:{os.environ['PATH']}", "SD4MATCH_SOURCE": str(REPO)}
    result = _run_post_deploy(workdir, env)
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    assert args == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--editable", str(REPO)]
    assert (Path(args[-1]) / "pyproject.toml").is_file() and (Path(args[-1]) / "sd4match").is_dir()
    unset = _run_post_deploy(tmp_path / "w2", {"PATH": env["PATH"]})
    assert unset.returncode != 0 and "SD4MATCH_SOURCE is unset" in unset.stderr
    wrong = _run_post_deploy(tmp_path / "w3", {"PATH": env["PATH"], "SD4MATCH_SOURCE": str(tmp_path)})
    assert wrong.returncode != 0 and "no pyproject.toml" in wrong.stderr


def test_snakefile_points_post_deploy_at_itself_and_every_rule_at_the_env(tmp_path: Path) -> None:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    data = probe_workflow(tmp_path, "config.yaml")
    assert data["sd4match_source"] == str(REPO)
    envs = {name: rule["conda_env"] for name, rule in data["rules"].items() if rule["script"]}
    assert envs and set(envs.values()) == {str(ENV_FILE)}, envs


@pytest.mark.skipif(shutil.which("conda") is None, reason="conda is not installed")
def test_env_solves_with_conda(tmp_path: Path) -> None:
    result = subprocess.run(
        ["conda", "env", "create", "--dry-run", "--file", str(ENV_FILE), "--prefix", str(tmp_path / "env")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
