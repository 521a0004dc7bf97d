"""The authors' release format written by us: ``pretrained_prompts.zip`` for the demo world and the tests.

Files are exactly what protocol.md describes (key names, shapes, ``torch.save`` dicts, folder names), at the
width of whatever text encoder and DINOv2 they are made for, initialised like the authors' code (plus seeded
noise, so an import that ignored the file would be caught).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sd4match.io import atomic_path
from sd4match.prompt_learning import initial_prompts
from sd4match.prompts import hidden_size
from sd4match.released_prompts import (
    N_COND,
    N_GLOBAL,
    SET_CATEGORIES,
    SINGLE_KEY,
    Framing,
    ReleasedFolder,
    framing_for,
)

# The prompts the paper reports (Tables 2 and 3): what the demo release packs (no Class prompt for PF-Pascal).
PAPER_RELEASE = (
    ("spair", "single"),
    ("spair", "class"),
    ("spair", "cpm"),
    ("pfpascal", "single"),
    ("pfpascal", "cpm"),
)
ZIP_DATE_TIME = (2024, 1, 1, 0, 0, 0)


def _sequence_tensor(framing: Framing, learned: Tensor) -> Tensor:
    """The released (1, 77, D) sequence [SOS, learned, EOS]."""
    return torch.cat([framing.sos[None], learned, framing.eos[None]])[None].contiguous()


def released_payload(
    spec: ReleasedFolder,
    text_encoder: nn.Module,
    tokenizer: Any,
    dino_shape: tuple[int, int],
    seed: int,
) -> dict[str, Tensor]:
    """A prompt file's dict in the released format: initialised like the authors' code, plus seeded noise."""
    framing = framing_for(text_encoder, tokenizer, atol=0.0)
    generator = torch.Generator().manual_seed(seed)
    if spec.variant == "cpm":
        n_patches, dino_dim = dino_shape
        width = hidden_size(text_encoder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            linear_c, linear_n = nn.Linear(2 * dino_dim, width), nn.Linear(n_patches, n_patches)
        tensors = {
            "global_embeds": torch.rand(1, N_GLOBAL, width, generator=generator),
            "positional_embedding": torch.rand(1, N_COND, width, generator=generator),
            "alpha_cond": torch.rand(1, N_COND, width, generator=generator),
        }
        tensors |= {f"linear_C.{k}": v.detach() for k, v in linear_c.state_dict().items()}
        return tensors | {f"linear_N.{k}": v.detach() for k, v in linear_n.state_dict().items()}
    keys = [SINGLE_KEY] if spec.variant == "single" else list(SET_CATEGORIES[spec.trainset])
    init = initial_prompts(text_encoder, tokenizer, len(keys), seed).cpu()
    learned = init + 0.01 * torch.randn(init.shape, generator=generator)
    return {key: _sequence_tensor(framing, learned[i]) for i, key in enumerate(keys)}


def torch_bytes(data: Mapping[str, Tensor]) -> bytes:
    """``torch.save`` of a dict into bytes (the released files are plain ``torch.save`` outputs)."""
    buffer = io.BytesIO()
    torch.save(dict(data), buffer)
    return buffer.getvalue()


def write_zip(path: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Write ``files`` (archive name -> bytes, folders implied) as a zip atomically, in sorted order."""
    target = Path(path)
    folders = sorted({name.rsplit("/", 1)[0] + "/" for name in files if "/" in name})
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for folder in folders:
            archive.writestr(zipfile.ZipInfo(folder, date_time=ZIP_DATE_TIME), b"")
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name])
    return target


def write_release_archive(
    path: str | os.PathLike[str],
    text_encoder: nn.Module,
    tokenizer: Any,
    dino_shape: tuple[int, int],
    prompts: Sequence[tuple[str, str]] = PAPER_RELEASE,
    seed: int = 0,
) -> Path:
    """``pretrained_prompts.zip`` in the released layout: one folder per (training set, variant) prompt."""
    files = {}
    for index, (trainset, variant) in enumerate(prompts):
        spec = ReleasedFolder(trainset, variant)
        payload = released_payload(spec, text_encoder, tokenizer, dino_shape, seed * 1000 + index + 1)
        files[f"{spec.name}/{spec.file}"] = torch_bytes(payload)
    return write_zip(path, files)
