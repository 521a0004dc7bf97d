"""Workflow configuration: load, validate against the JSON schema, and hash for provenance."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def load_schema() -> dict[str, Any]:
    """Return the packaged JSON schema for ``config.yaml``."""
    text = resources.files("sd4match").joinpath("schemas/config.schema.json").read_text()
    return json.loads(text)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` and cross-field rules; raise ConfigError naming the offending key and source."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  - key '{_key_path(e)}': {e.message}" for e in errors]
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines))
    _check_cross_fields(config, source)
    return copy.deepcopy(dict(config))


def _check_cross_fields(config: Mapping[str, Any], source: str) -> None:
    model = config["zero_shot"]["dift"]["model"]
    if model not in config["models"]:
        raise ConfigError(
            f"invalid configuration in {source}: key 'zero_shot.dift.model' names model {model!r}, "
            f"which is not in 'models' ({sorted(config['models'])})"
        )
    if config["models"][model]["kind"] != "stable_diffusion":
        raise ConfigError(
            f"invalid configuration in {source}: "
            "key 'zero_shot.dift.model' must name a stable_diffusion model"
        )
    if config["matching"]["reported"] not in config["matching"]["methods"]:
        raise ConfigError(
            f"invalid configuration in {source}: key 'matching.reported' "
            f"({config['matching']['reported']!r}) must be one of 'matching.methods'"
        )


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Load and deep-merge YAML files (later files override earlier ones), then validate."""
    merged: dict[str, Any] = {}
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        merged = deep_merge(merged, data)
    return validate_config(merged, source=" + ".join(str(p) for p in paths))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge mappings the way Snakemake merges several --configfile files."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """Short, stable hash of the configuration, carried by every result's provenance."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def is_demo(config: Mapping[str, Any]) -> bool:
    """True when the run uses the offline demo world (tiny random models, synthetic data)."""
    return bool(config.get("demo_world", {}).get("enabled", False))
