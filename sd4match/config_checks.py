"""Parse-time checks that every job will accept its settings: the jobs' own validators, run on the config.

``sd4match.config.validate_config`` calls :func:`check_job_settings` after the schema, so a setting a job
would reject (an even loss window, a batch the GPUs cannot split, an image the UNet cannot take, an unknown
Fig. 4 category, ...) stops ``snakemake -n`` with the key named, before any job runs. Where a job has a
settings class (``TrainSettings``, ``CPMConfig``, ``TextPrompt``, ``DemoWorldSpec``)
this module builds it from the config exactly as the rule does, so each rule lives in one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from sd4match.config import ConfigError, config_error
from sd4match.datasets import SPAIR_CATEGORIES
from sd4match.unet_geometry import feature_image_size_problem, unet_image_size_problem

# Variants the figure rules train by name (rules/figures.smk): Fig. 4 needs a category prompt, Fig. 5 and the
# qualitative matches a CPM.
FIGURE_VARIANTS = {"class": ("class", "single"), "cpm": ("cpm",)}
IMPLICIT_PROMPT = "implicit"


def check_job_settings(config: Mapping[str, Any], source: str) -> None:
    """Run every job-side rule on a schema-valid config; raise ConfigError naming the first bad key."""
    for check in (
        _check_image_sizes,
        _check_training,
        _check_variants,
        _check_zero_shot,
        _check_alphas,
        _check_figures,
        _check_demo_world,
    ):
        check(config, source)


# ------------------------------------------------------------------------------------------------- helpers


def _settings_error(
    error: Exception, keys: Mapping[str, str], default_key: str, source: str, checked_by: str
) -> ConfigError:
    """A settings class's ValueError as a ConfigError naming the config keys of the fields it blames.

    A field is blamed where the message says ``<field> must`` or ``<field> (<value>)``, the phrasing of the
    settings classes; the first one blamed is the key, ``default_key`` when none is.
    """
    text = re.sub(r"^(?:[\w.]+: )+", "", str(error))  # drop the "where: Class: " prefixes
    blamed = []
    for name, key in keys.items():
        match = re.search(rf"\b{re.escape(name)}(?= must| \()", text)
        if match and key not in (k for _, k in blamed):
            blamed.append((match.start(), key))
    blamed.sort()
    key = blamed[0][1] if blamed else default_key
    also = f" (together with {', '.join(repr(k) for _, k in blamed[1:])})" if len(blamed) > 1 else ""
    return config_error(source, key, f"is rejected by {checked_by}{also}: {text}")


def _build(
    factory: Callable[[], Any], keys: Mapping[str, str], default_key: str, source: str, checked_by: str
) -> Any:
    """Call ``factory`` (a job's settings constructor); its ValueError/TypeError becomes a ConfigError."""
    try:
        return factory()
    except (ValueError, TypeError) as error:
        raise _settings_error(error, keys, default_key, source, checked_by) from error


# ------------------------------------------------------------------------------------------------ features


def _check_image_sizes(config: Mapping[str, Any], source: str) -> None:
    """``image_size`` suits the UNet and the feature block; SD+DINO's SD size and the generation size too."""
    block = config["features"]["up_block_index"]
    problem = feature_image_size_problem(config["image_size"], block)
    if problem:
        raise config_error(source, "image_size", problem)
    for name, method in config["zero_shot"].items():
        if method["kind"] == "sd_dino":
            problem = unet_image_size_problem(method["image_size"], multiple_of=16)
            if problem:
                raise config_error(source, f"zero_shot.{name}.image_size", problem)
    problem = unet_image_size_problem(config["figures"]["generation"]["size"])
    if problem:
        raise config_error(source, "figures.generation.size", problem)


# ------------------------------------------------------------------------------------------------ training


def train_settings_data(config: Mapping[str, Any], variant: str, seed: int | None = None) -> dict[str, Any]:
    """The TrainSettings fields of one run (rules/common.smk ``train_settings`` passes exactly these): the
    training block plus the variant's kind, the image size and the run's seed (default: ``seed``)."""
    return {
        **config["sd4match"]["training"],
        "variant": config["sd4match"]["variants"][variant]["kind"],
        "image_size": config["image_size"],
        "seed": config["seed"] if seed is None else int(seed),
    }


def _train_keys(variant: str, field_names: list[str]) -> dict[str, str]:
    """Config key of each TrainSettings field."""
    special = {
        "variant": f"sd4match.variants.{variant}.kind",
        "image_size": "image_size",
        "seed": "seed",
    }
    return {name: special.get(name, f"sd4match.training.{name}") for name in field_names}


def _check_training(config: Mapping[str, Any], source: str) -> None:
    """Build TrainSettings as train_prompt does and split the batch over the ``gpu.train`` processes."""
    from sd4match.training_job import AUTO, TrainSettings

    names = [f.name for f in fields(TrainSettings)]
    processes = max(1, config["gpu"]["train"])  # gpu: 0 runs in-process on the CPU
    for variant in config["sd4match"]["variants"]:
        keys = _train_keys(variant, names)
        checked_by = "the train_prompt job (sd4match.training_job.TrainSettings)"
        settings = _build(
            lambda v=variant: TrainSettings.from_dict(train_settings_data(config, v), "TrainSettings"),
            keys,
            "sd4match.training",
            source,
            checked_by,
        )
        keys_with_gpus = {**keys, "num_processes": "gpu.train"}
        _build(  # auto: the device chooses a divisor of the pairs per process (training_memory)
            lambda s=settings: (
                s.pairs_per_process(processes)
                if s.per_device_batch == AUTO
                else s.accumulation_steps(processes)
            ),
            keys_with_gpus,
            "sd4match.training.batch_size",
            source,
            checked_by,
        )


def _check_variants(config: Mapping[str, Any], source: str) -> None:
    """CPM options only on CPM variants, and each CPM variant a valid CPMConfig."""
    from sd4match.prompt_learning import cpm_config_from_dict

    for name, variant in config["sd4match"]["variants"].items():
        options = {k: v for k, v in variant.items() if k != "kind"}
        key = f"sd4match.variants.{name}"
        if variant["kind"] != "cpm":
            if options:
                raise config_error(
                    source,
                    key,
                    f"is a {variant['kind']!r} prompt; CPM options {sorted(options)} do not apply",
                )
            continue
        option_keys = {option: f"{key}.{option}" for option in options}
        _build(lambda o=options: cpm_config_from_dict(o, "CPMConfig"), option_keys, key, source, "CPMConfig")


# ----------------------------------------------------------------------------------------------- zero-shot


def _check_zero_shot(config: Mapping[str, Any], source: str) -> None:
    """Text prompts are templates TextPrompt accepts; the implicit captioner only drives SD+DINO."""
    from sd4match.prompts import TextPrompt

    for name, method in config["zero_shot"].items():
        prompt = method.get("prompt")
        if prompt is None:
            continue
        key = f"zero_shot.{name}.prompt"
        if prompt == IMPLICIT_PROMPT:
            if method["kind"] != "sd_dino":
                raise config_error(
                    source, key, f"'{IMPLICIT_PROMPT}' (the ODISE captioner) is for kind sd_dino only"
                )
            continue
        _build(lambda p=prompt: TextPrompt(p, None, None), {}, key, source, "TextPrompt")


def _check_alphas(config: Mapping[str, Any], source: str) -> None:
    """The tables and figures report PCK at the paper's alphas: every one must be evaluated."""
    from sd4match.reporting import TABLE3_ALPHAS

    alphas = config["evaluation"]["alphas"]
    missing = [a for a in TABLE3_ALPHAS if not any(abs(a - b) < 1e-9 for b in alphas)]
    if missing:
        raise config_error(
            source,
            "evaluation.alphas",
            f"must include {list(TABLE3_ALPHAS)} (the tables report them); missing {missing}",
        )


# ------------------------------------------------------------------------------------------------- figures


def _check_figures(config: Mapping[str, Any], source: str) -> None:
    """Fig. 3b's baseline sweeps timesteps; Fig. 4/5's prompts exist; Fig. 4's categories are SPair's.

    ``figures.generation`` needs no settings class here: GenerationSettings asks for positive integers
    (the schema) and a size that is a multiple of 8 (``_check_image_sizes``, with the UNet's minimum).
    """
    baseline = config["fig3b"]["baseline"]
    if "timestep" not in config["zero_shot"][baseline]:
        raise config_error(
            source,
            "fig3b.baseline",
            f"names {baseline!r}, a method without a timestep to sweep (kind sd or sd_dino)",
        )
    variants = config["sd4match"]["variants"]
    for name, kinds in FIGURE_VARIANTS.items():
        if name not in variants or variants[name]["kind"] not in kinds:
            raise config_error(
                source,
                f"sd4match.variants.{name}",
                f"must be a {' or '.join(kinds)} prompt: the figure rules train and use it by this name",
            )
    unknown = [c for c in config["figures"]["fig4_categories"] if c not in SPAIR_CATEGORIES]
    if unknown:
        raise config_error(
            source,
            "figures.fig4_categories",
            f"names {unknown}, not SPair-71k categories (Fig. 4 uses the SPair-tuned Class prompt): "
            f"{list(SPAIR_CATEGORIES)}",
        )


def _check_demo_world(config: Mapping[str, Any], source: str) -> None:
    """The demo world's spec overrides build a DemoWorldSpec (the demo_datasets job builds the same)."""
    from sd4match.demo_world import DemoWorldSpec, spec_from_config

    demo = config.get("demo_world")
    if not demo:
        return
    keys = {f.name: f"demo_world.spec.{f.name}" for f in fields(DemoWorldSpec)} | {"seed": "demo_world.seed"}
    _build(
        lambda: spec_from_config(demo),
        keys,
        "demo_world.spec",
        source,
        "the demo_datasets job (DemoWorldSpec)",
    )
