"""Where a number came from: code version, config hash and the model revisions actually used."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sd4match
from sd4match.config import config_hash
from sd4match.models import read_model_record


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted (recursively): Snakemake compares params by their text, so
    reordering keys in a YAML file must not look like a changed setting."""
    if isinstance(value, Mapping):
        return {key: canonical(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value


def config_subset(config: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """The values at dotted ``paths`` (e.g. ``"figures.generation"``) of ``config``, keyed by path.

    A table's provenance hashes only the sub-trees it depends on, so editing any other key (a figure setting)
    leaves its Snakemake params, and so the table, untouched.
    """
    subset: dict[str, Any] = {}
    for path in dict.fromkeys(paths):
        node: Any = config
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(f"config has no key {path!r} (missing {part!r})")
            node = node[part]
        subset[path] = node
    return subset


def subset_hash(config: Mapping[str, Any], paths: Iterable[str]) -> str:
    """``config_hash`` of the sub-trees at ``paths``: independent of path order and of every other key."""
    return config_hash(dict(sorted(config_subset(config, paths).items())))


def code_version() -> str:
    """Package version plus the git commit ('+dirty' if uncommitted changes) from a checkout."""
    repo = Path(sd4match.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"sd4match {sd4match.__version__}" + (f" ({commit})" if commit else "")


def model_revisions(record_paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """Summarise model records for provenance: id, requested and resolved revision, weights per model name."""
    out: dict[str, dict[str, Any]] = {}
    for path in record_paths:
        rec = read_model_record(path)
        out[rec.name] = {
            "id": rec.id,
            "revision_requested": rec.revision_requested,
            "revision_resolved": rec.revision_resolved,
            "weights": rec.weights_precision(),
        }
    return out


def build_provenance(config_hash: str, record_paths: list[str | Path], demo: bool, image_size: int):
    """The Provenance every table and figure carries (reporting.Provenance)."""
    from sd4match.reporting import Provenance
    from sd4match.table_writing import protocol_description

    return Provenance(
        config_hash=config_hash,
        models=model_revisions(record_paths),
        code_version=code_version(),
        demo=demo,
        protocol=protocol_description(image_size),
    )
