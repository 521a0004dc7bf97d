"""Replicate seeds of prompt tuning (issue 12): each seed of a run trains its own prompt and evaluates it,
as separate jobs under ``.../<trainset>/<variant>/seed<k>/``; tables report the spread across seeds.

Config: ``seeds`` (top level) lists the seeds of every run, ``[0]`` being the paper's single run;
``seeds_per_run`` overrides them for single runs, keyed ``"<trainset>/<variant>"``. The first listed seed is
the run's primary seed: the figures that show one prompt (Fig. 4, Fig. 5, qualitative) use it. The
top-level ``seed`` stays the seed of everything that is not replicated (zero-shot evaluations, the demo
world's tiny models). Seed ``k`` seeds a run's training (``TrainSettings.seed``) and the noise of its
evaluations, so the spread across seeds covers both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd4match.config import ConfigError

SEED_DIR = "seed{seed}"


def seed_dir(seed: int | str) -> str:
    """The path component of one seed: ``seed0``, ``seed1``, ... (``seed{seed}`` for the wildcard)."""
    return SEED_DIR.format(seed=seed)


def run_key(trainset: str, variant: str) -> str:
    """The ``seeds_per_run`` key of a run."""
    return f"{trainset}/{variant}"


def run_seeds(config: Mapping[str, Any], trainset: str, variant: str) -> list[int]:
    """The seeds of one prompt-tuning run: its ``seeds_per_run`` entry, else the top-level ``seeds``."""
    overrides = config.get("seeds_per_run") or {}
    return [int(s) for s in overrides.get(run_key(trainset, variant), config["seeds"])]


def primary_seed(config: Mapping[str, Any], trainset: str, variant: str) -> int:
    """The first seed of a run: the one whose prompt the single-prompt figures show."""
    return run_seeds(config, trainset, variant)[0]


def _as_seed(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.isdigit() else value


def coerce_seed_lists(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with digit strings in ``seeds`` / ``seeds_per_run`` made integers: Snakemake's
    ``--config seeds=[0,1,2]`` parses list items as strings. Anything else is left for the schema to judge."""
    out = dict(config)
    if isinstance(out.get("seeds"), list):
        out["seeds"] = [_as_seed(s) for s in out["seeds"]]
    if isinstance(out.get("seeds_per_run"), Mapping):
        out["seeds_per_run"] = {
            k: [_as_seed(s) for s in v] if isinstance(v, list) else v for k, v in out["seeds_per_run"].items()
        }
    return out


def check_seeds(config: Mapping[str, Any], source: str) -> None:
    """Cross-field rule the schema cannot express: ``seeds_per_run`` names configured prompt variants."""
    variants = config["sd4match"]["variants"]
    for key in config.get("seeds_per_run") or {}:
        variant = key.partition("/")[2]
        if variant not in variants:
            raise ConfigError(
                f"invalid configuration in {source}: key 'seeds_per_run.{key}' names variant {variant!r}, "
                f"not in 'sd4match.variants' ({sorted(variants)})"
            )
