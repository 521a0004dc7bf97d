"""Load the workflow through the Snakemake API and print what its rules declare, as JSON.

Usage (from a working directory with the config files): python workflow_probe.py SNAKEFILE CONFIGFILE...
Run as a subprocess by the tests, so parsing the Snakefile (which sets environment variables) stays there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings


def _rule_path(rule, path) -> str | None:  # noqa: ANN001
    """A path of a rule directive as Snakemake resolves it: relative to the file that defines the rule."""
    if path is None:
        return None
    return os.path.normpath(Path(rule.basedir.get_path_or_uri(secret_free=True)) / str(path))


def probe(snakefile: Path, configfiles: list[Path]) -> dict:
    """Rules (threads, plain resources, conda env, script or not), local rules and the exported source dir."""
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=configfiles),
            storage_settings=StorageSettings(),
            snakefile=snakefile,
            workdir=Path.cwd(),
        )._workflow
        rules = {}
        for rule in workflow.rules:
            resources = {
                name: value.value
                for name, value in rule.resources.items()
                if not name.startswith("_") and not value.is_evaluable()
            }
            rules[rule.name] = {
                "threads": rule.resources["_cores"].value,
                "resources": resources,
                "conda_env": _rule_path(rule, rule.conda_env),
                "script": rule.script is not None,
                "has_output": bool(rule.output),
            }
        return {
            "rules": rules,
            "localrules": sorted(workflow._localrules),
            "sd4match_source": os.environ.get("SD4MATCH_SOURCE"),
        }


def probe_workflow(workdir: Path, *configfiles: str) -> dict:
    """``probe`` of this repository's Snakefile in a subprocess, in ``workdir`` (which holds the configs)."""
    snakefile = Path(__file__).resolve().parents[1] / "Snakefile"
    command = [sys.executable, __file__, str(snakefile), *configfiles]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"loading the workflow failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])))
