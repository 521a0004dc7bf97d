"""Reproducible safetensors files: canonical header, identical bytes for identical content."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd4match.tensor_files import canonicalise, save_tensors

TENSORS = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
METADATA = {"zeta": "1", "alpha": "2", "mid": json.dumps({"y": 1, "x": 2})}


def header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]


def test_save_tensors_writes_identical_bytes_with_a_sorted_header(tmp_path: Path) -> None:
    paths = [tmp_path / f"t{i}.safetensors" for i in range(12)]
    for path in paths:
        save_tensors(TENSORS, path, METADATA)
    assert len({path.read_bytes() for path in paths}) == 1
    text = header(paths[0]).decode().rstrip(" ")
    assert text.startswith('{"__metadata__":{"alpha":"2","mid":"{\\"y\\": 1, \\"x\\": 2}","zeta":"1"},"a":')
    assert (8 + len(header(paths[0]))) % 8 == 0
    loaded = load_file(paths[0])
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], TENSORS[k]) for k in TENSORS)
    with safe_open(paths[0], framework="pt") as handle:
        assert handle.metadata() == METADATA
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporary left


def test_canonicalise_rewrites_a_header_of_another_length(tmp_path: Path) -> None:
    """A header written with spaces (longer than the compact form) is rewritten with the data moved."""
    reference = tmp_path / "reference.safetensors"
    save_tensors(TENSORS, reference, METADATA)
    loose = tmp_path / "loose.safetensors"
    save_file(TENSORS, loose, metadata=METADATA)
    data = loose.read_bytes()
    length = int.from_bytes(data[:8], "little")
    spaced = json.dumps(json.loads(data[8 : 8 + length]), indent=1).encode()
    spaced += b" " * (-(8 + len(spaced)) % 8)
    loose.write_bytes(len(spaced).to_bytes(8, "little") + spaced + data[8 + length :])
    canonicalise(loose)
    assert loose.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.safetensors", "reference.safetensors"]
