"""Safetensors files written byte for byte reproducibly, atomically.

``safetensors`` serialises the header's ``__metadata__`` from a Rust hash map, whose key order changes from
one call to the next: two identical runs would write different bytes. ``save_tensors`` rewrites the header as
compact JSON with sorted keys (the data section, laid out by safetensors in a fixed order, is untouched).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from sd4match.io import atomic_path

HEADER_LENGTH_BYTES = 8
HEADER_ALIGNMENT = 8


def canonical_header(header: bytes) -> bytes:
    """The header JSON with every key sorted, compact, space-padded so the data start stays 8-byte aligned."""
    text = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = text.encode("utf-8")
    return encoded + b" " * (-(HEADER_LENGTH_BYTES + len(encoded)) % HEADER_ALIGNMENT)


def canonicalise(path: str | os.PathLike[str]) -> None:
    """Rewrite the header of the safetensors file ``path`` in canonical form (in place when it fits)."""
    source = Path(path)
    with source.open("r+b") as handle:
        length = int.from_bytes(handle.read(HEADER_LENGTH_BYTES), "little")
        header = canonical_header(handle.read(length))
        if len(header) == length:
            handle.seek(HEADER_LENGTH_BYTES)
            handle.write(header)
            return
    rewritten = source.with_name(source.name + ".canonical")
    try:
        with source.open("rb") as old, rewritten.open("wb") as new:
            new.write(len(header).to_bytes(HEADER_LENGTH_BYTES, "little") + header)
            old.seek(HEADER_LENGTH_BYTES + length)
            shutil.copyfileobj(old, new)
        os.replace(rewritten, source)
    finally:
        rewritten.unlink(missing_ok=True)


def save_tensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` atomically with a canonical header."""
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=None if metadata is None else dict(metadata))
        canonicalise(tmp)
