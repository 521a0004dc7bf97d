"""Provenance helpers: config sub-tree hashes (what a result depends on) and key-order-free params."""

from __future__ import annotations

import pytest

from sd4match.config import config_hash
from sd4match.provenance import canonical, config_subset, subset_hash

CONFIG = {
    "seed": 0,
    "figures": {"generation": {"steps": 50, "seed": 0}, "fig5_pairs": 4},
    "matching": {"methods": ["nn", "kernel_softmax"], "reported": "kernel_softmax"},
}


def test_config_subset_picks_dotted_paths() -> None:
    subset = config_subset(CONFIG, ["matching.methods", "figures.generation", "seed", "seed"])
    assert subset == {
        "matching.methods": ["nn", "kernel_softmax"],
        "figures.generation": {"steps": 50, "seed": 0},
        "seed": 0,
    }
    with pytest.raises(KeyError, match="'figures.fig4_categories' \\(missing 'fig4_categories'\\)"):
        config_subset(CONFIG, ["figures.fig4_categories"])
    with pytest.raises(KeyError, match="'seed.x'"):
        config_subset(CONFIG, ["seed.x"])


def test_subset_hash_ignores_other_keys_and_path_order() -> None:
    paths = ["matching.methods", "seed"]
    assert subset_hash(CONFIG, paths) == config_hash(
        {"matching.methods": ["nn", "kernel_softmax"], "seed": 0}
    )
    assert subset_hash(CONFIG, paths) == subset_hash(CONFIG, paths[::-1])
    edited = canonical(CONFIG) | {"figures": {"generation": {"steps": 3, "seed": 0}, "fig5_pairs": 4}}
    assert subset_hash(edited, paths) == subset_hash(CONFIG, paths)  # a figure edit: same hash
    assert subset_hash(edited, ["figures.generation"]) != subset_hash(CONFIG, ["figures.generation"])


def test_canonical_sorts_keys_recursively_and_keeps_lists() -> None:
    value = {"b": {"y": 1, "x": [{"d": 1, "c": 2}]}, "a": 0}
    out = canonical(value)
    assert list(out) == ["a", "b"] and list(out["b"]) == ["x", "y"] and list(out["b"]["x"][0]) == ["c", "d"]
    assert out == value and repr(canonical({"y": 1, "x": 2})) == repr(canonical({"x": 2, "y": 1}))
    assert canonical({1: "a", 2: "b"}) == {1: "a", 2: "b"}  # int keys (fig3a cases) stay ints
