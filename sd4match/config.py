"""Workflow configuration: load, validate against the JSON schema, and hash for provenance."""

from __future__ import annotations

import copy
import hashlib
import json
import re
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


def _fail(source: str, key: str, message: str) -> None:
    raise ConfigError(f"invalid configuration in {source}: key '{key}' {message}")


def _check_model(config: Mapping[str, Any], source: str, key: str, name: Any, kinds: tuple[str, ...]) -> None:
    """A reference to the model registry must name a model of one of ``kinds``."""
    if name not in config["models"]:
        _fail(source, key, f"names model {name!r}, which is not in 'models' ({sorted(config['models'])})")
    if config["models"][name]["kind"] not in kinds:
        _fail(source, key, f"must name a model of kind {' or '.join(kinds)}, not {name!r}")


def _check_cross_fields(config: Mapping[str, Any], source: str) -> None:
    """Rules the schema cannot express: references between sections resolve to the right kinds."""
    for name, method in config["zero_shot"].items():
        key = f"zero_shot.{name}"
        if method["kind"] == "vit":
            _check_model(config, source, f"{key}.model", method["model"], ("dino", "dinov2"))
        else:
            _check_model(config, source, f"{key}.model", method["model"], ("stable_diffusion",))
        if method.get("dino_model"):
            _check_model(config, source, f"{key}.dino_model", method["dino_model"], ("dinov2",))
    captioner = config["implicit_captioner"]
    _check_model(config, source, "implicit_captioner.clip_model", captioner["clip_model"], ("clip_vision",))
    _check_model(
        config, source, "implicit_captioner.text_model", captioner["text_model"], ("stable_diffusion",)
    )
    sd4 = config["sd4match"]
    _check_model(config, source, "sd4match.model", sd4["model"], ("stable_diffusion",))
    _check_model(config, source, "sd4match.dino_model", sd4["dino_model"], ("dinov2",))
    for trainset, variants in sd4["train_sets"].items():
        for variant in variants:
            if variant not in sd4["variants"]:
                _fail(
                    source,
                    f"sd4match.train_sets.{trainset}",
                    f"names variant {variant!r}, not in 'sd4match.variants'",
                )
    for case, variant in config["fig3a"]["cases"].items():
        if variant not in sd4["variants"] or sd4["variants"][variant]["kind"] != "cpm":
            _fail(
                source,
                f"fig3a.cases.{case}",
                f"must name a CPM variant of 'sd4match.variants', not {variant!r}",
            )
    if config["fig3b"]["variant"] not in sd4["variants"]:
        _fail(
            source,
            "fig3b.variant",
            f"names variant {config['fig3b']['variant']!r}, not in 'sd4match.variants'",
        )
    if config["fig3b"]["baseline"] not in config["zero_shot"]:
        _fail(source, "fig3b.baseline", f"names {config['fig3b']['baseline']!r}, not in 'zero_shot'")
    if config["matching"]["reported"] not in config["matching"]["methods"]:
        _fail(
            source,
            "matching.reported",
            f"({config['matching']['reported']!r}) must be one of 'matching.methods'",
        )
    if config["zero_shot_matching"] not in config["matching"]["methods"]:
        _fail(source, "zero_shot_matching", "must be one of 'matching.methods'")


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


TIMESTEP_SUFFIX = re.compile(r"^(?P<base>[a-z0-9_]+?)_t(?P<t>\d+)$")


def method_config(methods: Mapping[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """Config of a zero-shot method; ``<base>_t<T>`` is ``<base>`` at timestep T (the Fig. 3b sweep)."""
    if name in methods:
        return dict(methods[name])
    match = TIMESTEP_SUFFIX.match(name)
    if match and match["base"] in methods and "timestep" in methods[match["base"]]:
        return dict(methods[match["base"]]) | {"timestep": int(match["t"])}
    raise ValueError(f"zero-shot method {name!r} is not configured under 'zero_shot' ({sorted(methods)})")
