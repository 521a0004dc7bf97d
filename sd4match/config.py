"""Workflow configuration: load, validate against the JSON schema, and hash for provenance."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
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


def _is_integer(_checker: Any, value: Any) -> bool:
    """JSON-schema ``integer`` without floats: ``seed: 1.0`` is a float, which the jobs reject."""
    return isinstance(value, int) and not isinstance(value, bool)


# Draft 2020-12 counts 1.0 as an integer; the jobs check isinstance(value, int), so the schema must too.
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def config_error(source: str, key: str, message: str) -> ConfigError:
    """The ConfigError for one key: ``invalid configuration in <source>: key '<key>' <message>``."""
    return ConfigError(f"invalid configuration in {source}: key '{key}' {message}")


def _fail(source: str, key: str, message: str) -> None:
    raise config_error(source, key, message)


def _schema_message(error: jsonschema.ValidationError) -> str:
    """The schema's message, with a hint where a float stands for an integer."""
    message = error.message
    value = error.instance
    if error.validator == "type" and isinstance(value, float) and value.is_integer():
        message += f" (write {int(value)}, without the decimal point)"
    return message


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` and every rule the jobs apply to their settings; raise ConfigError naming the key.

    Returns the normalised copy the workflow uses: scalars Snakemake's ``--config`` gave as strings converted
    where the schema wants numbers/booleans/null, and ``fig3a.cases`` keyed by the integers 1-6.
    """
    data = copy.deepcopy(dict(config))
    validator = StrictValidator(load_schema())
    coerce_cli_strings(data, validator)
    normalise_fig3a_cases(data, source)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"  - key '{_key_path(e)}': {_schema_message(e)}" for e in errors]
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines))
    _check_cross_fields(data, source)
    from sd4match.config_checks import check_job_settings  # imports the jobs' settings classes (torch)

    check_job_settings(data, source)
    return data


# --------------------------------------------------------------------------- values given on the command line

_MISSING = object()
_INTEGER_TEXT = re.compile(r"[-+]?[0-9]+")
_NULL_TEXTS = ("", "~", "null", "Null", "NULL")
_BOOL_TEXTS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}


def _scalar_from_text(text: str, wanted: str) -> Any:
    """``text`` as a value of JSON-schema type ``wanted`` (YAML spelling), or _MISSING if it is not one."""
    if wanted == "integer" and _INTEGER_TEXT.fullmatch(text.strip()):
        return int(text)
    if wanted == "number":
        try:
            value = float(text)
        except ValueError:
            return _MISSING
        if math.isfinite(value):
            return int(text) if _INTEGER_TEXT.fullmatch(text.strip()) else value
    if wanted == "boolean" and text in _BOOL_TEXTS:
        return _BOOL_TEXTS[text]
    if wanted == "null" and text in _NULL_TEXTS:
        return None
    return _MISSING


def _type_errors(error: jsonschema.ValidationError) -> Any:
    """The error and, for oneOf/anyOf, the errors of every branch (depth first)."""
    yield error
    for sub in error.context or ():
        yield from _type_errors(sub)


def _set_path(data: Any, path: Sequence[Any], value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def coerce_cli_strings(config: dict[str, Any], validator: jsonschema.protocols.Validator) -> None:
    """Convert strings where the schema wants a number, boolean or null, in place.

    Snakemake reads values nested inside ``--config key={...}`` with YAML's BaseLoader, so
    ``--config 'sd4match={training: {steps: 100}}'`` gives ``"100"``; only a string that spells a value of
    the wanted type is converted ("1.0" stays a float and is rejected where an integer is meant).
    """
    for _ in range(10_000):  # each round converts at least one string; a config holds far fewer
        fixes: dict[tuple[Any, ...], Any] = {}
        for top in validator.iter_errors(config):
            for error in _type_errors(top):
                if error.validator != "type" or not isinstance(error.instance, str):
                    continue
                wanted = error.validator_value
                for kind in [wanted] if isinstance(wanted, str) else wanted:
                    value = _scalar_from_text(error.instance, kind)
                    if value is not _MISSING:
                        fixes[tuple(error.absolute_path)] = value
                        break
        if not fixes:
            return
        for path, value in fixes.items():
            _set_path(config, path, value)


# ------------------------------------------------------------------------------------------------ fig3a.cases

FIG3A_CASES = tuple(range(1, 7))


def _case_number(key: Any, source: str) -> int:
    """A Fig. 3a case key (1-6, or its digits as a string) as an int; anything else raises naming it."""
    if isinstance(key, str) and _INTEGER_TEXT.fullmatch(key.strip()):
        number = int(key)
    elif isinstance(key, int) and not isinstance(key, bool):
        number = key
    else:
        raise config_error(source, f"fig3a.cases.{key}", f"must be a case number {FIG3A_CASES}")
    if number not in FIG3A_CASES:
        raise config_error(source, f"fig3a.cases.{key}", f"is not a Fig. 3a case (cases are {FIG3A_CASES})")
    return number


def normalise_fig3a_cases(config: dict[str, Any], source: str) -> None:
    """Key ``fig3a.cases`` by the integers 1-6, in place; every case must be given.

    YAML files give ``1:`` as an int; JSON config files and ``--config`` overrides give ``"1"``. Merged onto
    config.yaml such an override holds both keys, and the string one wins: in every Snakemake merge it is
    the override (dict order does not tell, Snakemake merges --config both before and after config files).
    """
    fig3a = config.get("fig3a")
    cases = fig3a.get("cases") if isinstance(fig3a, Mapping) else None
    if not isinstance(cases, Mapping):
        return  # the schema names what is wrong
    numbered: dict[int, Any] = {}
    for key, variant in sorted(cases.items(), key=lambda item: isinstance(item[0], str)):
        numbered[_case_number(key, source)] = variant  # string keys come last, so they win
    missing = [case for case in FIG3A_CASES if case not in numbered]
    if missing:
        raise config_error(
            source, "fig3a.cases", f"must give all six Fig. 3a cases {FIG3A_CASES}; missing {missing}"
        )
    fig3a["cases"] = {case: numbered[case] for case in FIG3A_CASES}


# ------------------------------------------------------------------------------------------ cross references


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
