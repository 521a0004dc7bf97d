"""The state a prompt-tuning run checkpoints, and the identity that decides whether a checkpoint is resumed.

``<out_dir>/checkpoint.pt`` (written atomically) holds every state the rest of a run depends on (prompt,
optimiser, grad scaler, generator, sampler, global RNGs, losses, validation history, the best prompt), the
run's identity and whether the run finished. Rerun semantics:

- no checkpoint, or the checkpoint of a *finished* run: train from step 0 (a rerun retrains);
- the checkpoint of an *interrupted* run with the same identity: resume (ending as an uninterrupted run);
- an interrupted run of another identity: refuse, naming what changed and the command that starts over.

The identity is everything that changes the result: the settings but the bookkeeping ones, the CPM config
and Class categories, the content of the pairs tables and caches, and the model revisions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sd4match.io import atomic_path

log = logging.getLogger("sd4match.training")

CHECKPOINT_FORMAT = "sd4match-train-checkpoint"
CHECKPOINT_VERSION = 2
CHECKPOINT_KEYS = (
    "format",
    "version",
    "identity",
    "identity_hash",
    "finished",
    "step",
    "prompt",
    "optimizer",
    "scaler",
    "generator",
    "sampler",
    "rng",
    "losses",
    "val_pck",
    "skipped_steps",
    "best",
)
CURVE_COLUMNS = ("step", "loss", "val_pck")
# Settings that do not change what a run computes; a checkpoint stays valid when they change (gradient
# checkpointing and the pairs per call only trade memory for time: a run killed by an out-of-memory error can
# resume with gradient checkpointing or fewer pairs per call, a run moved to a larger GPU with more).
BOOKKEEPING_SETTINGS = ("checkpoint_every", "log_every", "gradient_checkpointing", "per_device_batch")
# Identity entries shown setting by setting when they differ; the others are content digests or models.
ITEMISED = ("settings", "cpm")
IDENTITY_HASH_LENGTH = 16


@dataclass
class Progress:
    """What a checkpoint restores besides the tensors' owners: step, losses, validation PCKs, the best prompt
    and the steps the fp16 grad scaler skipped (non-finite gradients: the prompt was not updated)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    val_pck: dict[int, float] = field(default_factory=dict)
    best_step: int = -1
    best_val_pck: float = -math.inf
    best_state: dict[str, Tensor] | None = None
    skipped_steps: list[int] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        """The checkpoint entries of the progress."""
        return {
            "step": self.step,
            "losses": list(self.losses),
            "val_pck": dict(self.val_pck),
            "skipped_steps": list(self.skipped_steps),
            "best": {"step": self.best_step, "val_pck": self.best_val_pck, "state": self.best_state},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Progress:
        """The progress stored by ``to_state``."""
        best = state["best"]
        return cls(
            step=int(state["step"]),
            losses=[float(v) for v in state["losses"]],
            val_pck={int(k): float(v) for k, v in state["val_pck"].items()},
            best_step=int(best["step"]),
            best_val_pck=float(best["val_pck"]),
            best_state=best["state"],
            skipped_steps=[int(s) for s in state["skipped_steps"]],
        )

    def record_validation(self, step: int, pck: float, prompt: torch.nn.Module) -> None:
        """Store a validation result; a strictly higher PCK makes ``prompt`` the best (ties keep the earlier
        step)."""
        self.val_pck[step] = pck
        if pck > self.best_val_pck:
            self.best_step, self.best_val_pck = step, pck
            self.best_state = {k: v.detach().cpu().clone() for k, v in prompt.state_dict().items()}

    def skips_in_a_row(self, step: int) -> int:
        """How many consecutive steps up to ``step`` the grad scaler skipped."""
        skipped, count = set(self.skipped_steps), 0
        while step - count in skipped:
            count += 1
        return count

    def curve(self) -> pd.DataFrame:
        """Loss curve: one row per step with the batch loss and the validation PCK@0.1 where validated."""
        rows = [
            {"step": i + 1, "loss": loss, "val_pck": self.val_pck.get(i + 1, math.nan)}
            for i, loss in enumerate(self.losses)
        ]
        return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


# ------------------------------------------------------------------------------------------------ RNG states


def global_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python global RNG states, in types ``torch.load`` reads safely."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_global_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states saved by ``global_rng_state``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# -------------------------------------------------------------------------------------------------- identity


def training_identity(
    settings: Mapping[str, Any],
    cpm: Mapping[str, Any] | None,
    categories: list[str] | None,
    inputs: Mapping[str, Any],
) -> dict[str, Any]:
    """What determines a run's result: settings (but bookkeeping), CPM config, categories, and the content
    identities of its inputs (``TrainingData.inputs_identity``)."""
    bookkeeping = set(BOOKKEEPING_SETTINGS)
    if settings.get("batch_semantics") == "authors_code":
        bookkeeping.discard("per_device_batch")  # there it is the effective batch: it changes the result
    kept = {k: v for k, v in settings.items() if k not in bookkeeping}
    identity = {"settings": kept, "cpm": None if cpm is None else dict(cpm), "categories": categories}
    return json.loads(json.dumps({**identity, **inputs}, sort_keys=True))


def identity_hash(identity: Mapping[str, Any]) -> str:
    """Short sha256 of an identity (recorded as ``train_hash`` in the prompt's sidecar)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:IDENTITY_HASH_LENGTH]


def _shown(value: Any) -> str:
    """An identity value as a reader wants it: digests shortened, models as id@revision."""
    if isinstance(value, str) and len(value) == 64:
        return f"content sha256 {value[:12]}"
    if isinstance(value, dict) and set(value) == {"id", "revision"}:
        return f"{value['id']}@{value['revision']}"
    return json.dumps(value, sort_keys=True)


def identity_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per entry that differs, e.g. ``settings.lr: 0.01 -> 0.02`` or ``pairs_trn: content ...``."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key in ITEMISED and isinstance(before, dict) and isinstance(after, dict):
            for name in sorted(set(before) | set(after)):
                if before.get(name) != after.get(name):
                    lines.append(f"{key}.{name}: {_shown(before.get(name))} -> {_shown(after.get(name))}")
        elif isinstance(before, str) and isinstance(after, str) and len(before) == len(after) == 64:
            lines.append(f"{key}: content sha256 {before[:12]} -> {after[:12]}")
        else:
            lines.append(f"{key}: {_shown(before)} -> {_shown(after)}")
    return lines


def start_over_command(path: Path) -> str:
    """The command that discards a checkpoint so the next run starts from step 0."""
    return f"rm {shlex.quote(str(path))}"


def identity_mismatch(path: Path, state: Mapping[str, Any], identity: Mapping[str, Any]) -> ValueError:
    """The error for an interrupted run whose identity changed: what changed and how to go on."""
    changes = "\n".join(f"  {line}" for line in identity_changes(state["identity"], identity))
    return ValueError(
        f"checkpoint {path} belongs to another training configuration: it holds a run interrupted at step "
        f"{state['step']}, and since then\n{changes}\nIt is not resumed. To resume it, restore what changed. "
        f"To start this run over instead (its {state['step']} steps are lost), delete it:\n"
        f"  {start_over_command(path)}\nthen rerun the same command."
    )


# ----------------------------------------------------------------------------------------------- checkpoints


def _unusable(path: Path, why: str) -> ValueError:
    return ValueError(
        f"checkpoint {path} is unusable: {why}. It cannot be resumed; delete it to start the run over "
        f"from step 0:\n  {start_over_command(path)}\nthen rerun the same command."
    )


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None when absent); an unreadable, truncated or foreign file raises naming
    it and the command that starts over."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on damaged files
        raise _unusable(path, f"unreadable or truncated ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise _unusable(path, f"not a {CHECKPOINT_FORMAT} file")
    if state.get("version") != CHECKPOINT_VERSION:
        raise _unusable(
            path,
            f"written in format version {state.get('version')}, this sd4match reads {CHECKPOINT_VERSION}",
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise _unusable(path, f"entries {missing} are missing")
    return state


def require_finite_prompt(prompt: Mapping[str, Tensor], step: int) -> None:
    """Raise FloatingPointError naming the first non-finite prompt parameter: never checkpoint or use it."""
    for name, tensor in prompt.items():
        if not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(
                f"non-finite prompt parameter {name!r} after step {step}: training stopped, the last "
                f"checkpoint (before this step) is kept"
            )


def write_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically; its prompt must be finite. Serialised in memory first (a prompt and
    its Adam state: a few MB) so that a full disk is an OSError naming the checkpoint, not torch's writer
    error."""
    require_finite_prompt(state["prompt"], int(state["step"]))
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


@dataclass
class RunParts:
    """The objects whose states a checkpoint holds besides the progress (prompt module unwrapped)."""

    prompt: torch.nn.Module
    optimizer: Any
    scaler: Any
    generator: torch.Generator
    sampler: Any


class Checkpointer:
    """``<out_dir>/checkpoint.pt`` of one run: what it holds, and whether a rerun resumes it."""

    def __init__(self, path: Path, identity: Mapping[str, Any]) -> None:
        self.path, self.identity = Path(path), dict(identity)

    def state(self, parts: RunParts, progress: Progress, finished: bool) -> dict[str, Any]:
        """Every state the rest of the run depends on, its identity and whether the run finished."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "identity": self.identity,
            "identity_hash": identity_hash(self.identity),
            "finished": finished,
            "prompt": {k: v.detach().cpu().clone() for k, v in parts.prompt.state_dict().items()},
            "optimizer": parts.optimizer.state_dict(),
            "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
            "generator": parts.generator.get_state(),
            "sampler": parts.sampler.state_dict(),
            "rng": global_rng_state(),
            **progress.to_state(),
        }

    def save(self, parts: RunParts, progress: Progress, finished: bool = False) -> None:
        """Write the checkpoint atomically (never with a non-finite prompt)."""
        write_checkpoint(self.path, self.state(parts, progress, finished))

    def resumable(self) -> dict[str, Any] | None:
        """The checkpoint of an interrupted run of this identity, or None (no checkpoint, or a finished run:
        train from step 0); an interrupted run of another identity raises naming what changed."""
        state = read_checkpoint(self.path)
        if state is None:
            return None
        if state["finished"]:
            log.info("%s holds a finished run: training again from step 0", self.path)
            return None
        if state["identity"] != self.identity:
            raise identity_mismatch(self.path, state, self.identity)
        return state

    def restore(self, state: Mapping[str, Any], parts: RunParts) -> Progress:
        """Load a resumable checkpoint into the run's objects and global RNGs; returns its progress."""
        parts.prompt.load_state_dict(state["prompt"])
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.scaler is not None and state["scaler"] is not None:
            parts.scaler.load_state_dict(state["scaler"])
        parts.generator.set_state(state["generator"])
        parts.sampler.load_state_dict(state["sampler"], f"checkpoint {self.path}")
        set_global_rng_state(state["rng"])
        return Progress.from_state(state)
