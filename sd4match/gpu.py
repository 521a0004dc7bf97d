"""GPU allocation through lock files, so concurrent Snakemake jobs each get their own GPU.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but never says *which* GPU a job
should use. A GPU job therefore enters :func:`allocate_gpus` first thing (before anything initialises
CUDA): it takes an exclusive ``flock`` on ``<lock_dir>/gpu-<id>.lock`` for each GPU it uses and sets
``CUDA_VISIBLE_DEVICES`` accordingly. ``flock`` locks belong to the open file and are dropped by the
kernel when the process dies, so a killed job never leaks a GPU. Under SLURM the scheduler already
isolates GPUs and the environment is passed through untouched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LOGGER = logging.getLogger(__name__)

GPUS_ENV = "SD4MATCH_GPUS"
LOCK_DIR_ENV = "SD4MATCH_GPU_LOCK_DIR"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"
SLURM_GPU_ENVS = (CUDA_ENV, "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
NVIDIA_SMI_TIMEOUT_S = 10.0
_GPU_ID = re.compile(r"[A-Za-z0-9._:-]+")


@dataclass
class GpuLease:
    """The GPUs a job may use: ``ids`` (as put in ``CUDA_VISIBLE_DEVICES``), whether the scheduler's
    assignment was passed through, and the lock files held for the lease's lifetime."""

    ids: list[str]
    passthrough: bool
    lock_paths: list[Path] = field(default_factory=list)


def _split_ids(text: str, source: str) -> list[str]:
    """Parse a comma- or newline-separated GPU id list; ``source`` names where it came from for errors."""
    ids = [part.strip() for part in re.split(r"[,\n]", text) if part.strip()]
    bad = [gpu for gpu in ids if not _GPU_ID.fullmatch(gpu)]
    if bad:
        raise ValueError(f"{source}: invalid GPU id(s) {bad!r} (allowed characters: A-Z a-z 0-9 . _ : -)")
    duplicates = sorted({gpu for gpu in ids if ids.count(gpu) > 1})
    if duplicates:
        raise ValueError(f"{source}: duplicate GPU id(s) {duplicates!r} in {text!r}")
    return ids


def _nvidia_smi_gpus() -> list[str]:
    """GPU indices reported by ``nvidia-smi``; [] when it is missing, fails or hangs."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    cmd = [exe, "--query-gpu=index", "--format=csv,noheader"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True)
        return _split_ids(done.stdout, f"output of {exe}")
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        LOGGER.warning("nvidia-smi GPU query failed (%s); assuming no GPUs", err)
        return []


def visible_gpus() -> list[str]:
    """GPU ids on this machine: ``$SD4MATCH_GPUS`` (simulation, restriction), else ``nvidia-smi``, else []."""
    if GPUS_ENV in os.environ:
        return _split_ids(os.environ[GPUS_ENV], f"environment variable {GPUS_ENV}")
    return _nvidia_smi_gpus()


def scheduler_isolated() -> bool:
    """True inside a SLURM job that already has its GPUs assigned; its environment must be left alone."""
    return "SLURM_JOB_ID" in os.environ and any(name in os.environ for name in SLURM_GPU_ENVS)


def cuda_initialised() -> bool:
    """Whether this process has initialised CUDA (after which ``CUDA_VISIBLE_DEVICES`` is ignored)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return bool(torch.cuda.is_initialized())


def default_lock_dir() -> Path:
    """Lock folder shared by all jobs of this user: ``$SD4MATCH_GPU_LOCK_DIR`` or a per-user temp folder."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"sd4match-gpu-locks-{os.getuid()}"


def lock_path(lock_dir: Path, gpu: str) -> Path:
    """The lock file guarding GPU ``gpu``."""
    return lock_dir / f"gpu-{gpu}.lock"


def _try_lock(path: Path) -> int | None:
    """Open ``path`` and take a non-blocking exclusive flock; the fd on success, None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(fds: list[int]) -> None:
    """Clear the holder pid, unlock and close each fd (lock files are kept: unlinking them races)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_holder(fd: int) -> None:
    """Record this process's pid in a held lock file, in place (replacing the file would orphan the lock)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _try_acquire(n: int, gpus: list[str], lock_dir: Path) -> list[tuple[str, int]] | None:
    """One all-or-nothing attempt at locking ``n`` of ``gpus``; partial holdings are released on failure."""
    held: list[tuple[str, int]] = []
    try:
        for gpu in gpus:
            fd = _try_lock(lock_path(lock_dir, gpu))
            if fd is not None:
                held.append((gpu, fd))
            if len(held) == n:
                return held
    except BaseException:
        _release([fd for _, fd in held])
        raise
    _release([fd for _, fd in held])
    return None


def _holders(lock_dir: Path, gpus: list[str]) -> dict[str, str]:
    """Holder pid recorded in each GPU's lock file (for error messages); '?' when unreadable or empty."""
    holders = {}
    for gpu in gpus:
        try:
            holders[gpu] = lock_path(lock_dir, gpu).read_text().strip() or "?"
        except OSError:
            holders[gpu] = "?"
    return holders


def _acquire(
    n: int, gpus: list[str], lock_dir: Path, timeout: float | None, poll: float
) -> list[tuple[str, int]]:
    """Retry :func:`_try_acquire` every ``poll`` seconds until it succeeds or ``timeout`` runs out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        held = _try_acquire(n, gpus, lock_dir)
        if held is not None:
            return held
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"allocate_gpus: could not lock {n} GPU(s) of the {len(gpus)} visible ({','.join(gpus)}) "
                f"within {timeout} s in lock dir {lock_dir}; holder pids by GPU: {_holders(lock_dir, gpus)}"
            )
        time.sleep(poll if remaining is None else min(poll, remaining))


def _require_cuda_uninitialised() -> None:
    """Refuse to assign GPUs once CUDA is initialised: the new ``CUDA_VISIBLE_DEVICES`` would be ignored."""
    if cuda_initialised():
        raise RuntimeError(
            f"allocate_gpus: CUDA is already initialised in this process, so setting {CUDA_ENV} would be "
            "ignored; allocate GPUs before anything touches torch.cuda"
        )


@contextlib.contextmanager
def _cuda_visible_devices(value: str) -> Iterator[None]:
    """Set ``CUDA_VISIBLE_DEVICES`` for the block and restore the previous value (or absence) after."""
    previous = os.environ.get(CUDA_ENV)
    os.environ[CUDA_ENV] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CUDA_ENV, None)
        else:
            os.environ[CUDA_ENV] = previous


def _scheduler_ids() -> list[str]:
    """GPU ids the scheduler assigned (``CUDA_VISIBLE_DEVICES``, else SLURM's step/job GPU list)."""
    for name in (CUDA_ENV, "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if name in os.environ:
            return _split_ids(os.environ[name], f"environment variable {name}")
    return []


def _validate_request(n: int, timeout: float | None, poll: float) -> None:
    """Reject a negative GPU count, a negative timeout or a non-positive poll interval."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"allocate_gpus: n must be a non-negative int, got {n!r}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"allocate_gpus: timeout must be >= 0 seconds or None, got {timeout!r}")
    if poll <= 0:
        raise ValueError(f"allocate_gpus: poll must be > 0 seconds, got {poll!r}")


@contextlib.contextmanager
def allocate_gpus(
    n: int, lock_dir: str | os.PathLike[str] | None = None, timeout: float | None = None, poll: float = 0.5
) -> Iterator[GpuLease]:
    """Hold ``n`` distinct GPUs for the block and expose only them via ``CUDA_VISIBLE_DEVICES``.

    ``n == 0`` hides all GPUs; no GPUs on the machine runs on CPU with the environment untouched; under
    SLURM the scheduler's assignment is passed through. Otherwise GPU lock files in ``lock_dir`` are
    taken all-or-nothing, retried every ``poll`` s, with ``TimeoutError`` after ``timeout`` s.
    """
    _validate_request(n, timeout, poll)
    if n == 0:
        _require_cuda_uninitialised()
        with _cuda_visible_devices(""):
            yield GpuLease(ids=[], passthrough=False, lock_paths=[])
        return
    if scheduler_isolated():
        yield GpuLease(ids=_scheduler_ids(), passthrough=True, lock_paths=[])
        return
    gpus = visible_gpus()
    if not gpus:
        LOGGER.warning("allocate_gpus: %d GPU(s) requested but none visible; running on CPU", n)
        yield GpuLease(ids=[], passthrough=False, lock_paths=[])
        return
    if n > len(gpus):
        raise ValueError(
            f"allocate_gpus: {n} GPU(s) requested but only {len(gpus)} visible ({','.join(gpus)}); "
            f"set {GPUS_ENV} or lower the job's gpu count"
        )
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    _require_cuda_uninitialised()
    held = _acquire(n, gpus, folder, timeout, poll)
    try:
        for _, fd in held:
            _write_holder(fd)
        ids = [gpu for gpu, _ in held]
        with _cuda_visible_devices(",".join(ids)):
            yield GpuLease(ids=ids, passthrough=False, lock_paths=[lock_path(folder, gpu) for gpu in ids])
    finally:
        _release([fd for _, fd in held])


def device_for(lease: GpuLease) -> str:
    """The torch device string for a lease: "cuda" when it grants GPUs and CUDA is usable, else "cpu"."""
    if not (lease.ids or lease.passthrough):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
