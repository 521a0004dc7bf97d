"""Config validation, paths, wildcard constraints and input functions shared by every stage."""

from pathlib import Path

from sd4match.config import config_hash, is_demo, validate_config

config = validate_config(
    config, source="the workflow configuration (config.yaml + overlays)"
)

RES = config["resources_dir"]
OUT = config["results_dir"]
DEMO = is_demo(config)
CONFIG_HASH = config_hash(config)
DATASETS = ["spair", "pfpascal", "pfwillow"]
TEST_DATASETS = config["evaluation"]["test_datasets"]
CONDA_ENV = "../envs/sd4match.yaml"


SD4 = config["sd4match"]
TRAIN_SETS = ["spair", "pfpascal"]


wildcard_constraints:
    dataset="|".join(DATASETS),
    trainset="|".join(TRAIN_SETS),
    split="trn|val|test",
    part="trnval|test",
    model="[A-Za-z0-9_]+",
    variant="[a-z0-9_]+",


def is_remote(url):
    """True for http(s) URLs; anything else is a local file the workflow may itself produce."""
    return url.startswith(("http://", "https://"))


def local_source(url):
    """The local file behind a file:// URL or a plain path (empty for remote URLs)."""
    if is_remote(url):
        return []
    return [url[len("file://") :] if url.startswith("file://") else url]


def dataset_sources(wildcards):
    """Local archives a dataset's fetch depends on (the demo world's archives are workflow outputs)."""
    cfg = config["datasets"][wildcards.dataset]
    if cfg["local_path"]:
        return []
    urls = [cfg["url"]] + ([cfg["pairs_url"]] if "pairs_url" in cfg else [])
    return [path for url in urls for path in local_source(url)]


def tiny_model_dir(name):
    """Where the demo world's tiny model `name` is built."""
    return f"{RES}/tiny_models/{name}"


def model_source(wildcards):
    """A model folder the workflow builds itself (the demo world's tiny models), else nothing."""
    model_id = config["models"][wildcards.model]["id"]
    return [model_id] if model_id == tiny_model_dir(wildcards.model) else []


def fetch_record(dataset):
    return f"{RES}/data/{dataset}/fetch.json"


def model_record(name):
    return f"{RES}/models/{name}.json"


def pairs_table(dataset, split):
    return f"{OUT}/pairs/{dataset}_{split}.parquet"


def variant_kind(variant):
    """single | class | cpm for a configured prompt variant."""
    if variant not in SD4["variants"]:
        raise ValueError(
            f"prompt variant {variant!r} is not defined under 'sd4match.variants' in the config"
        )
    return SD4["variants"][variant]["kind"]


def train_settings(wildcards):
    """TrainSettings of one run: the config's training block plus variant kind, image size and seed."""
    return {
        **SD4["training"],
        "variant": variant_kind(wildcards.variant),
        "image_size": config["image_size"],
        "seed": config["seed"],
    }


def cpm_options(wildcards):
    """The CPM ablation options of a variant (None for Single/Class)."""
    cfg = SD4["variants"][wildcards.variant]
    return (
        None if cfg["kind"] != "cpm" else {k: v for k, v in cfg.items() if k != "kind"}
    )


def train_runs():
    """(training set, variant) of every configured prompt-tuning run."""
    return [
        (trainset, variant)
        for trainset, variants in SD4["train_sets"].items()
        for variant in variants
    ]


def eval_datasets(trainset, variant):
    """Test sets a learned prompt is evaluated on (Class only where its categories exist: its own set)."""
    if variant_kind(variant) == "class":
        return [d for d in TEST_DATASETS if d == trainset]
    return TEST_DATASETS


def latent_cache(dataset):
    return f"{OUT}/cache/latents/{dataset}_trnval.safetensors"


def dino_cache(dataset, part):
    return f"{OUT}/cache/dinov2/{dataset}_{part}.safetensors"


def prompt_file(trainset, variant):
    return f"{OUT}/prompts/{trainset}/{variant}/prompt.safetensors"


def sd4match_summary(trainset, variant, dataset):
    return f"{OUT}/sd4match/{trainset}/{variant}/{dataset}/summary.csv"


def train_inputs(wildcards):
    """Inputs of one training run; DINOv2 and its caches only for CPM."""
    inputs = {
        "pairs_trn": pairs_table(wildcards.trainset, "trn"),
        "pairs_val": pairs_table(wildcards.trainset, "val"),
        "data": fetch_record(wildcards.trainset),
        "sd_model": model_record(SD4["model"]),
        "latent_cache": latent_cache(wildcards.trainset),
    }
    if variant_kind(wildcards.variant) == "cpm":
        inputs["dinov2_model"] = model_record(SD4["dino_model"])
        inputs["dino_cache"] = dino_cache(wildcards.trainset, "trnval")
    return inputs


def evaluate_prompt_inputs(wildcards):
    """Inputs of one learned-prompt evaluation; DINOv2 tokens of the test images only for CPM."""
    inputs = {
        "prompt": prompt_file(wildcards.trainset, wildcards.variant),
        "pairs": pairs_table(wildcards.dataset, "test"),
        "data": fetch_record(wildcards.dataset),
        "sd_model": model_record(SD4["model"]),
    }
    if variant_kind(wildcards.variant) == "cpm":
        inputs["dino_cache"] = dino_cache(wildcards.dataset, "test")
        inputs["dinov2_model"] = model_record(SD4["dino_model"])
    return inputs


def sd4match_summaries(trainsets=TRAIN_SETS):
    """Summaries of every configured (training set, variant, test set) evaluation."""
    return [
        sd4match_summary(trainset, variant, dataset)
        for trainset, variant in train_runs()
        if trainset in trainsets
        for dataset in eval_datasets(trainset, variant)
    ]


def all_targets():
    """Every table this pipeline produces."""
    return [
        f"{OUT}/tables/{name}.{ext}"
        for name in ("zero_shot_dift", "table2_sd4match", "table3_sd4match")
        for ext in ("csv", "md")
    ]
