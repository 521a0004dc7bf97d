"""What ``sd4match match`` matches with: the request (prompt, models, settings) and everything it loads.

Defaults come from the config (``config.yaml``; ``demo``: plus ``profiles/demo/world.yaml``), exactly as the
evaluation rules read them: a tuned or imported prompt uses ``sd4match.evaluation`` (timestep, ensemble) and
its run's seed (imported prompts: the config's ``seed``, as their evaluation); a text prompt is DIFT's
zero-shot setting (``zero_shot.dift``: timestep, ensemble) with the config's ``seed``. Models come from the
config's registry through the records the pipeline wrote (``<resources_dir>/models/<name>.json``) or from a
local folder. A prompt is refused when its sidecar names other models (``evaluation.check_prompt_models``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd4match.config import ConfigError, is_demo, load_config
from sd4match.custom_dataset import DEFAULT_CATEGORY
from sd4match.evaluation import MatchingSettings, check_prompt_models
from sd4match.matching import MATCHING_METHODS
from sd4match.models import ModelRecord, ModelSpec, read_model_record, resolve_local

DEMO_WORLD = "profiles/demo/world.yaml"
RELEASED_ORIGIN = "authors_release"  # sd4match.released_prompts.ORIGIN: an imported prompt of the authors
TEXT_PROMPT_BASELINE = "dift"  # the zero-shot method whose timestep/ensemble a text prompt uses


class MatchInputError(ValueError):
    """Bad input to ``match``: the message names the argument (``--points``, ``source``, ...)."""


@dataclass(frozen=True)
class MatchRequest:
    """What to match with; ``None`` takes the config's value. Exactly one of ``prompt`` (a tuned or imported
    prompt file) and ``text`` (a text prompt, ``{category}`` filled by ``category``)."""

    prompt: str | None = None
    text: str | None = None
    category: str = DEFAULT_CATEGORY
    config: tuple[str, ...] = ("config.yaml",)
    demo: bool = False
    sd_model: str | None = None
    dinov2_model: str | None = None
    method: str | None = None
    timestep: int | None = None
    ensemble: int | None = None
    seed: int | None = None
    image_size: int | None = None
    root: str | None = None
    pair_id: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.text is None):
            raise MatchInputError("arguments --prompt / --text: give exactly one (a prompt file or a text)")
        if self.method is not None and self.method not in MATCHING_METHODS:
            raise MatchInputError(f"argument --method: {self.method!r} is not one of {MATCHING_METHODS}")
        for name in ("timestep", "ensemble", "seed", "image_size"):
            value = getattr(self, name)
            minimum = 1 if name in ("ensemble", "image_size") else 0
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < minimum
            ):
                raise MatchInputError(f"argument --{name.replace('_', '-')}: must be an integer >= {minimum}")
        if isinstance(self.config, str):
            object.__setattr__(self, "config", (self.config,))

    def config_files(self) -> list[str]:
        """The config files read, in order (the demo world's overlay last)."""
        return [*self.config, *([DEMO_WORLD] if self.demo else [])]


@dataclass
class MatchSetup:
    """The loaded request: config, matching settings, networks, prompt and the noise/frame settings."""

    request: MatchRequest
    config: dict[str, Any]
    settings: MatchingSettings
    method: str
    timestep: int
    ensemble: int
    seed: int
    featurizer: Any
    prompt_source: Any  # a LearnedPrompt (Single/Class/CPM) or a prompts.TextPrompt
    module: Any  # the LearnedPrompt, None for a text prompt
    sd_record: ModelRecord
    dino_record: ModelRecord | None = None
    dino_model: Any = None
    dino_processor: Any = None

    @property
    def category(self) -> str:
        return self.request.category

    @property
    def root(self) -> str | None:
        return self.request.root

    @property
    def pair_id(self) -> str | None:
        return self.request.pair_id

    def describe(self) -> dict[str, Any]:
        """The settings a result records (JSON-able)."""
        prompt = (
            {"text": self.request.text, "filled": self.prompt_source.texts([self.category])[0]}
            if self.module is None
            else {"file": self.request.prompt, "variant": self.module.variant}
        )
        models = {"sd_model": self.sd_record, "dinov2_model": self.dino_record}
        return {
            "prompt": prompt,
            "category": self.category,
            "config": self.request.config_files(),
            "demo": is_demo(self.config),
            "image_size": self.settings.image_size,
            "timestep": self.timestep,
            "ensemble": self.ensemble,
            "seed": self.seed,
            "methods": list(self.settings.methods),
            "kernel_sigma": self.settings.kernel_sigma,
            "temperature": self.settings.temperature,
            "device": self.request.device,
            **{
                key: None if r is None else {"id": r.id, "revision": r.revision_resolved, "source": r.source}
                for key, r in models.items()
            },
        }


def _load_config(request: MatchRequest) -> dict[str, Any]:
    """The validated config of the request (a missing file names ``--config`` / ``--demo``)."""
    files = request.config_files()
    for path in files:
        if not Path(path).is_file():
            argument = "--demo" if path == DEMO_WORLD and request.demo else "--config"
            raise MatchInputError(
                f"argument {argument}: config file {path} not found (run in the project folder, or pass "
                f"--config)"
            )
    try:
        return load_config(*files)
    except ConfigError as exc:
        raise MatchInputError(f"argument --config: {exc}") from exc


def resolve_model(
    value: str, kind: str, argument: str, config: dict[str, Any], needed_by: str = ""
) -> tuple[ModelRecord, str | ModelRecord]:
    """A model of the registry (its record file under ``<resources_dir>/models``) or a local folder: its
    record and what ``check_prompt_models`` takes (the record file, or the folder's record)."""
    models = config["models"]
    if value in models:
        if models[value]["kind"] != kind:
            raise MatchInputError(f"argument {argument}: config model {value!r} is a {models[value]['kind']}")
        record_path = Path(config["resources_dir"]) / "models" / f"{value}.json"
        if not record_path.is_file():
            profile = " --profile profiles/demo" if is_demo(config) else " --cores 1"
            raise MatchInputError(
                f"argument {argument}: {needed_by}model record {record_path} (config model {value!r}) "
                f"does not exist: resolve it first (snakemake {record_path}{profile}) or pass a local "
                "model folder"
            )
        try:
            return read_model_record(record_path), str(record_path)
        except (OSError, ValueError) as exc:
            raise MatchInputError(f"argument {argument}: {exc}") from exc
    if Path(value).expanduser().is_dir():
        try:
            record = resolve_local(ModelSpec(Path(value).name or kind, value, kind))
        except (OSError, ValueError) as exc:
            raise MatchInputError(f"argument {argument}: {exc}") from exc
        return record, record
    raise MatchInputError(
        f"argument {argument}: {value!r} is neither a model of the config's registry ({sorted(models)}) nor "
        "a model folder"
    )


def _prompt_data(path: str) -> dict[str, Any]:
    """The prompt file's sidecar (variant, seed, metadata); errors name ``--prompt``."""
    from sd4match.prompt_learning import read_sidecar

    if not Path(path).is_file():
        raise MatchInputError(f"argument --prompt: prompt file {path} does not exist")
    try:
        return read_sidecar(path)
    except (OSError, ValueError) as exc:
        raise MatchInputError(f"argument --prompt: {exc}") from exc


def _check_image_size(size: int, block: int) -> None:
    from sd4match.unet_geometry import feature_image_size_problem

    problem = feature_image_size_problem(size, block)
    if problem:
        raise MatchInputError(f"argument --image-size: {problem}")


def _learned_prompt(request: MatchRequest, featurizer: Any, device: str) -> Any:
    """The prompt module of ``request.prompt`` on ``device``; a Class prompt must know the category."""
    from sd4match.prompt_learning import load_prompt

    try:
        module, _ = load_prompt(request.prompt, featurizer.text_encoder, featurizer.tokenizer)
    except (OSError, ValueError) as exc:
        raise MatchInputError(f"argument --prompt: {exc}") from exc
    categories = getattr(module, "categories", None)
    if module.variant == "class" and request.category not in categories:
        raise MatchInputError(
            f"argument --category: {request.category!r} is not a category of the Class prompt "
            f"{request.prompt} ({categories})"
        )
    return module.to(device).eval()


def load_setup(**fields: Any) -> MatchSetup:
    """Check the request against the config and the prompt's sidecar, then load the networks."""
    from sd4match.features import load_sd_featurizer
    from sd4match.prompts import TextPrompt

    request = MatchRequest(**fields)
    config = _load_config(request)
    sd4 = config["sd4match"]
    data = None if request.prompt is None else _prompt_data(request.prompt)
    cpm = data is not None and data["variant"] == "cpm"
    sd_record, sd_check = resolve_model(
        request.sd_model or sd4["model"], "stable_diffusion", "--sd-model", config
    )
    dino_record = dino_check = None
    if cpm:
        needed = f"the CPM prompt {request.prompt} needs DINOv2: "
        dino_record, dino_check = resolve_model(
            request.dinov2_model or sd4["dino_model"], "dinov2", "--dinov2-model", config, needed
        )
    if data is not None:
        try:
            check_prompt_models(request.prompt, sd_check, dino_check)
        except (OSError, ValueError) as exc:
            raise MatchInputError(f"argument --prompt: {exc}") from exc
    image_size = request.image_size or config["image_size"]
    _check_image_size(image_size, config["features"]["up_block_index"])
    featurizer = load_sd_featurizer(sd_record.local_path, config["features"], request.device)
    if data is None:
        try:
            prompt_source = TextPrompt(request.text, featurizer.text_encoder, featurizer.tokenizer)
        except ValueError as exc:
            raise MatchInputError(f"argument --text: {exc}") from exc
        module, baseline = None, config["zero_shot"][TEXT_PROMPT_BASELINE]
        timestep, ensemble, seed = baseline["timestep"], baseline["ensemble"], config["seed"]
    else:
        module = prompt_source = _learned_prompt(request, featurizer, request.device)
        released = data["metadata"].get("origin") == RELEASED_ORIGIN
        timestep, ensemble = sd4["evaluation"]["timestep"], sd4["evaluation"]["ensemble"]
        seed = config["seed"] if released else int(data["seed"])
    n_steps = int(featurizer.scheduler.config.num_train_timesteps)
    timestep = timestep if request.timestep is None else request.timestep
    if not 0 <= timestep < n_steps:
        raise MatchInputError(f"argument --timestep: must be in [0, {n_steps}), got {timestep}")
    matching = config["matching"]
    method = request.method or matching["reported"]
    methods = dict.fromkeys([*matching["methods"], method])
    settings = MatchingSettings.from_config(matching, image_size, (0.1,), methods=tuple(methods))
    setup = MatchSetup(
        request=request,
        config=config,
        settings=settings,
        method=method,
        timestep=timestep,
        ensemble=ensemble if request.ensemble is None else request.ensemble,
        seed=seed if request.seed is None else request.seed,
        featurizer=featurizer,
        prompt_source=prompt_source,
        module=module,
        sd_record=sd_record,
        dino_record=dino_record,
    )
    if cpm:
        from sd4match.models import load_dinov2

        setup.dino_model, setup.dino_processor = load_dinov2(dino_record.local_path, device=request.device)
    return setup
