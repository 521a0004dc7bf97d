"""The model lock: hub revisions resolved once, then reused by every later run and by colleagues.

A config names hub models by branch (`revision: main`), which moves. The first resolution of a hub model
writes the commit it got to the lock file (YAML, one entry per hub id); every later resolution of the same
id and requested revision resolves that commit instead, so reruns and colleagues sharing the lock use the
same weights. ``refresh_lock`` re-resolves the configured revisions, rewrites the lock and rewrites the model
records whose commit moved (Snakemake then reruns what depends on them, and only that). Local folders are
not locked: their record holds a hash of their content.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from sd4match.io import write_text_atomic
from sd4match.models import (
    ModelRecord,
    ModelSpec,
    is_local_id,
    read_model_record,
    resolve_model,
    write_model_record,
)

LOCK_HEADER = (
    "# sd4match model lock: the hub commit each model id resolved to at the configured revision.\n"
    "# Written by the first resolution, read by every later one; commit it to share the exact weights.\n"
    "# Refresh (re-resolve the configured revisions): snakemake refresh_model_lock\n"
)


@dataclass(frozen=True)
class LockEntry:
    """One hub model in the lock: the revision the config asked for and the commit it resolved to."""

    revision: str
    commit: str


def read_lock(path: str | os.PathLike[str]) -> dict[str, LockEntry]:
    """The lock's entries by hub id ({} when the file does not exist); a malformed lock names the file."""
    source = Path(path)
    if not source.is_file():
        return {}
    try:
        data: Any = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"model lock {source}: invalid YAML ({error}); fix or delete it") from error
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"model lock {source}: expected 'models: {{<hub id>: {{revision, commit}}}}'")
    entries = {}
    for repo_id, entry in models.items():
        if not isinstance(entry, dict) or set(entry) != {"revision", "commit"}:
            raise ValueError(f"model lock {source}: entry {repo_id!r} needs exactly 'revision' and 'commit'")
        entries[str(repo_id)] = LockEntry(str(entry["revision"]), str(entry["commit"]))
    return entries


def write_lock(path: str | os.PathLike[str], entries: Mapping[str, LockEntry]) -> None:
    """Write the lock atomically, entries sorted by hub id."""
    models = {repo_id: {"revision": e.revision, "commit": e.commit} for repo_id, e in sorted(entries.items())}
    write_text_atomic(path, LOCK_HEADER + yaml.safe_dump({"models": models}, sort_keys=False))


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the lock file's companion ``.<name>.flock`` (parallel resolve jobs)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked_commit(entries: Mapping[str, LockEntry], spec: ModelSpec) -> str | None:
    """The locked commit of a hub spec (None: not locked, or locked for another requested revision)."""
    entry = entries.get(spec.id)
    return entry.commit if entry is not None and entry.revision == spec.revision else None


def _is_hub(spec: ModelSpec) -> bool:
    return not is_local_id(spec.id)


def resolve_with_lock(
    spec: ModelSpec,
    lock_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> ModelRecord:
    """Resolve ``spec`` at its locked commit when the lock has one; otherwise resolve it and lock the commit.

    The record keeps the configured revision as ``revision_requested`` and the commit as resolved.
    """
    if not _is_hub(spec):
        return resolve_model(spec, cache_dir, local_files_only)
    commit = locked_commit(read_lock(lock_path), spec)
    if commit is not None:
        record = resolve_model(replace(spec, revision=commit), cache_dir, local_files_only)
        return replace(record, revision_requested=spec.revision)
    record = resolve_model(spec, cache_dir, local_files_only)
    with locked(lock_path):
        entries = read_lock(lock_path)
        if locked_commit(entries, spec) is None:  # a parallel job may have locked it meanwhile
            entries[spec.id] = LockEntry(spec.revision, record.revision_resolved)
            write_lock(lock_path, entries)
    return record


@dataclass(frozen=True)
class LockChange:
    """What a refresh did for one model: its old and new commit and whether its record was rewritten."""

    name: str
    id: str
    old_commit: str | None
    new_commit: str
    record_rewritten: bool


def refresh_lock(
    specs: Mapping[str, Mapping[str, Any]],
    lock_path: str | os.PathLike[str],
    records: Mapping[str, str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> list[LockChange]:
    """Re-resolve every hub model at its configured revision, rewrite the lock, and rewrite the existing
    records (``records``: name -> record path) whose commit moved; unchanged records are left untouched."""
    changes = []
    with locked(lock_path):
        entries = read_lock(lock_path)
        for name, cfg in specs.items():
            spec = ModelSpec(name=name, **cfg)
            if not _is_hub(spec):
                continue
            old = locked_commit(entries, spec)
            record = resolve_model(spec, cache_dir, local_files_only)
            entries[spec.id] = LockEntry(spec.revision, record.revision_resolved)
            record_path = Path(records[name])
            rewrite = record_path.is_file() and (
                read_model_record(record_path).revision_resolved != record.revision_resolved
            )
            if rewrite:
                write_model_record(record, record_path)
            changes.append(LockChange(name, spec.id, old, record.revision_resolved, rewrite))
        write_lock(lock_path, entries)
    return changes
