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


wildcard_constraints:
    dataset="|".join(DATASETS),
    split="trn|val|test",
    model="[A-Za-z0-9_]+",


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


def all_targets():
    """Every table this stage of the pipeline produces."""
    return [f"{OUT}/tables/zero_shot_dift.csv", f"{OUT}/tables/zero_shot_dift.md"]
