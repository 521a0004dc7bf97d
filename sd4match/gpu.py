"""GPU allocation through lock files, so concurrent Snakemake jobs each get their own GPU.

Snakemake's ``--resources gpu=N`` bounds how many GPU jobs run at once but never says *which* GPU a job
should use. A GPU job therefore enters :func:`allocate_gpus` first thing (before anything initialises
CUDA): it divides the *pool* the environment grants among concurrent jobs, locking
``<lock folder>/gpu-<id>.lock`` for each GPU it takes, and sets ``CUDA_VISIBLE_DEVICES`` to those members.

The pool is the first of: ``CUDA_VISIBLE_DEVICES`` (a user's ``2,3``, SLURM's grant; UUIDs are opaque
members), ``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``, ``SD4MATCH_GPUS``, ``nvidia-smi``. ``SD4MATCH_GPUS``
set next to a granted set narrows it (and must be a subset of it).

Inside a SLURM allocation (``SLURM_JOB_ID``) the locks live in a sub-folder ``slurm-<job id>`` of the
lock folder: SLURM never gives one GPU to two allocations (unless it shares it on purpose: shards, MPS) and,
with cgroups, numbers each allocation's GPUs from 0, so jobs of different allocations must not compete for
"GPU 0", while all jobs inside one allocation must, whichever ``srun`` step they run in (steps may overlap
on the same GPUs). Snakemake run inside an allocation thus divides the allocation's GPUs among its jobs,
while a job started by the SLURM executor (one job per allocation, ``--gpus=<its gpu resource>``, run in
an ``srun`` step) finds its folder free, takes the whole pool and leaves the environment exactly as SLURM
set it (``passthrough``). The executor sets no variable a job could read, so the rule relies on what SLURM
sets, not on executor markers.

Lock lifetime: a holder takes an exclusive ``flock`` to see the GPU is free, stamps the file with
``<pid> <random token>`` and downgrades to a *shared* lock; a GPU is free only when nobody holds any lock
on its file. ``flock`` locks belong to the open file description, so children that inherit the fd
(:func:`lease_fds` for ``pass_fds``) keep the lock after the parent dies, and processes started without
our fds (``accelerate launch``'s workers) call :func:`join_gpu_lease` to take their own share, checked
against the stamp named in ``$SD4MATCH_GPU_LEASE``. The kernel drops the locks when the last of these
processes exits, so a killed job never leaks a GPU and never hands it over while a child still uses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
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
LEASE_ENV = "SD4MATCH_GPU_LEASE"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"
SLURM_GPU_ENVS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
NVIDIA_SMI_TIMEOUT_S = 10.0
SHARED_DIR_MODE = 0o1777  # a lock folder named by the user may be shared by several users: like /tmp
PRIVATE_DIR_MODE = 0o700
LOCK_FILE_MODE = 0o666  # every user of a shared folder must be able to lock (and stamp) every GPU
_GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")  # indices, GPU-<uuid>, MIG-<uuid>, MIG-GPU-<uuid>/1/0
_CUDA_MEMBER = re.compile(r"\d+|(?:GPU|MIG)-[A-Za-z0-9._:/-]+")
_SLURM_KEY = re.compile(r"[A-Za-z0-9_.-]+")
_HELD: dict[int, str] = {}  # fd -> lock path, for every lock this process holds (own leases and joined)


@dataclass
class GpuLease:
    """The GPUs a job may use: ``ids`` (members of the pool, as put in ``CUDA_VISIBLE_DEVICES``), whether
    SLURM's environment was left untouched, and the lock files held for the lease's lifetime."""

    ids: list[str]
    passthrough: bool
    lock_paths: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class GpuPool:
    """The GPUs the environment grants (``members``), where they came from, the SLURM allocation whose jobs
    compete for them (None outside SLURM), and whether ``SD4MATCH_GPUS`` narrowed the granted set."""

    members: list[str]
    source: str
    slurm_job: str | None = None
    narrowed: bool = False


# ------------------------------------------------------------------------------------------------ the pool


def _split_ids(text: str, source: str) -> list[str]:
    """Parse a comma- or newline-separated GPU id list; ``source`` names where it came from for errors."""
    ids = [part.strip() for part in re.split(r"[,\n]", text) if part.strip()]
    bad = [gpu for gpu in ids if not _GPU_ID.fullmatch(gpu)]
    if bad:
        raise ValueError(
            f"{source}: invalid GPU id(s) {bad!r} (allowed: A-Z a-z 0-9 . _ : / -, starting with a letter "
            "or digit)"
        )
    duplicates = sorted({gpu for gpu in ids if ids.count(gpu) > 1})
    if duplicates:
        raise ValueError(f"{source}: duplicate GPU id(s) {duplicates!r} in {text!r}")
    return ids


def _cuda_visible_ids(text: str) -> list[str]:
    """GPUs in ``CUDA_VISIBLE_DEVICES`` as CUDA reads it: indices or GPU-/MIG- UUIDs, up to the first entry
    CUDA rejects (``-1``, ``NoDevFiles``), which hides it and everything after it."""
    ids = [part.strip() for part in text.split(",")]
    ids = [] if ids == [""] else ids
    for position, gpu in enumerate(ids):
        if not _CUDA_MEMBER.fullmatch(gpu):
            if position or gpu not in ("-1", "NoDevFiles"):
                LOGGER.warning("%s=%r: CUDA ignores %r and everything after it", CUDA_ENV, text, gpu)
            ids = ids[:position]
            break
    return _split_ids(",".join(ids), f"environment variable {CUDA_ENV}")


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


def slurm_job() -> str | None:
    """The SLURM allocation this process runs in (``$SLURM_JOB_ID``), else None."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if not _SLURM_KEY.fullmatch(job):
        raise ValueError(f"environment variable SLURM_JOB_ID={job!r} is not a SLURM job id")
    return job


def _granted() -> tuple[list[str], str] | None:
    """The GPU set a scheduler or the user granted, and its source: ``CUDA_VISIBLE_DEVICES``, else SLURM's
    step/job GPU list; None when none of them is set."""
    if CUDA_ENV in os.environ:
        text = os.environ[CUDA_ENV]
        return _cuda_visible_ids(text), f"{CUDA_ENV}={text}"
    for name in SLURM_GPU_ENVS:
        if name in os.environ:
            text = os.environ[name]
            return _split_ids(text, f"environment variable {name}"), f"{name}={text}"
    return None


def gpu_pool() -> GpuPool:
    """The GPUs jobs divide among them (see the module docstring for the order of sources)."""
    job = slurm_job()
    granted = _granted()
    restriction = None
    if GPUS_ENV in os.environ:
        restriction = _split_ids(os.environ[GPUS_ENV], f"environment variable {GPUS_ENV}")
    if granted is None:
        if restriction is not None:
            return GpuPool(restriction, f"{GPUS_ENV}={os.environ[GPUS_ENV]}", job)
        return GpuPool(_nvidia_smi_gpus(), "nvidia-smi", job)
    members, source = granted
    if restriction is None:
        return GpuPool(members, source, job)
    outside = [gpu for gpu in restriction if gpu not in members]
    if outside:
        raise ValueError(
            f"{GPUS_ENV}={os.environ[GPUS_ENV]}: GPU(s) {outside!r} are not among the GPUs granted by "
            f"{source}; list only granted GPUs in {GPUS_ENV} or unset it"
        )
    return GpuPool(restriction, f"{GPUS_ENV} within {source}", job, narrowed=restriction != members)


def visible_gpus() -> list[str]:
    """The members of this environment's GPU pool (:func:`gpu_pool`)."""
    return gpu_pool().members


def cuda_initialised() -> bool:
    """Whether this process has initialised CUDA (after which ``CUDA_VISIBLE_DEVICES`` is ignored)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return bool(torch.cuda.is_initialized())


# ------------------------------------------------------------------------------------------ the lock folder


def default_lock_dir() -> Path:
    """Lock folder shared by all jobs of this user: ``$SD4MATCH_GPU_LOCK_DIR`` or a per-user temp folder."""
    if os.environ.get(LOCK_DIR_ENV):
        return Path(os.environ[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"sd4match-gpu-locks-{os.getuid()}"


def lock_path(lock_dir: Path, gpu: str) -> Path:
    """The lock file guarding GPU ``gpu`` (a ``/`` of a MIG id is written ``%2F``)."""
    return lock_dir / f"gpu-{gpu.replace('/', '%2F')}.lock"


def _sharing_hint(path: Path, err: OSError) -> PermissionError:
    """A PermissionError naming ``path``, its owner and mode, and the two ways out."""
    try:
        info = path.stat()
        owner = f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"
    except OSError:
        owner = "owner unknown"
    return PermissionError(
        errno.EACCES,
        f"GPU lock {'folder' if path.is_dir() else 'file'} {path} ({owner}) is not writable by uid "
        f"{os.getuid()} ({err.strerror}). A lock folder shared by several users needs the folder "
        f"writable by all (chmod 1777, like /tmp) and its lock files too (chmod a+rw {path.parent}/gpu-*"
        ".lock); ask its owner, or give each user a folder of their own (jobs of different users then no "
        f"longer see each other's locks): export {LOCK_DIR_ENV}=/tmp/sd4match-gpu-locks-$(id -u)",
    )


def _make_folder(folder: Path, mode: int) -> None:
    """Create ``folder`` (and parents) with exactly ``mode``, umask bypassed; an existing one is kept."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return
    except PermissionError as err:
        raise _sharing_hint(folder.parent, err) from err
    os.chmod(folder, mode)


def _check_own_folder(folder: Path) -> None:
    """The per-user default folder must be a real folder of this user (not another user's or a symlink)."""
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(
            errno.EACCES,
            f"GPU lock folder {folder} is not a folder owned by uid {os.getuid()} (owner uid {info.st_uid}); "
            f"remove it or point {LOCK_DIR_ENV} to a folder of your own",
        )


def lock_folder(lock_dir: str | os.PathLike[str] | None, pool: GpuPool) -> Path:
    """The folder whose lock files this pool's jobs compete for, created if needed: ``lock_dir`` (or
    ``$SD4MATCH_GPU_LOCK_DIR``, mode 1777 when created) or the private per-user default, plus
    ``slurm-<job id>`` inside a SLURM allocation."""
    explicit = lock_dir is not None or bool(os.environ.get(LOCK_DIR_ENV))
    base = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _make_folder(base, SHARED_DIR_MODE if explicit else PRIVATE_DIR_MODE)
    if not explicit:
        _check_own_folder(base)
    if pool.slurm_job is None:
        return base
    folder = base / f"slurm-{pool.slurm_job}"
    _make_folder(folder, PRIVATE_DIR_MODE)
    return folder


# ------------------------------------------------------------------------------------------------ the locks


def _open_lock_file(path: Path) -> int:
    """Open (creating, mode 0666) a lock file read-write. An existing file is opened without O_CREAT, which
    protected_regular refuses for another user's file in a sticky folder."""
    while True:
        try:
            return os.open(path, os.O_RDWR)
        except FileNotFoundError:
            pass
        except PermissionError as err:
            raise _sharing_hint(path, err) from err
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, LOCK_FILE_MODE)
        except FileExistsError:
            continue  # created by another job meanwhile: open it as an existing file
        except PermissionError as err:
            raise _sharing_hint(path.parent, err) from err
        os.fchmod(fd, LOCK_FILE_MODE)
        return fd


def _read_stamp(fd: int) -> str:
    """The ``<pid> <token>`` stamp of a lock file ('' when empty)."""
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


def _try_lock(path: Path, stamp: str) -> int | None:
    """Take GPU ``path`` if nobody holds it: exclusive lock, stamp, downgrade to shared, and keep it only if
    the stamp is still ours (the downgrade is not atomic, another job may slip in). The fd, or None."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{stamp}\n".encode(), 0)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if _read_stamp(fd) == stamp:
            _HELD[fd] = str(path)
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _release(fds: list[int]) -> None:
    """Close each fd. Never ``LOCK_UN``: that would also unlock children sharing the open file; the kernel
    drops the lock when its last fd closes. The stamp stays as a record of the last holder."""
    for fd in fds:
        _HELD.pop(fd, None)
        os.close(fd)


def _try_acquire(n: int, gpus: list[str], folder: Path, stamp: str) -> list[tuple[str, int]] | None:
    """One all-or-nothing attempt at locking ``n`` of ``gpus``; partial holdings are released on failure."""
    held: list[tuple[str, int]] = []
    try:
        for gpu in gpus:
            fd = _try_lock(lock_path(folder, gpu), stamp)
            if fd is not None:
                held.append((gpu, fd))
            if len(held) == n:
                return held
    except BaseException:
        _release([fd for _, fd in held])
        raise
    _release([fd for _, fd in held])
    return None


def _holders(folder: Path, gpus: list[str]) -> dict[str, str]:
    """Pid of the last holder stamped in each GPU's lock file (for error messages); '?' when unknown."""
    holders = {}
    for gpu in gpus:
        try:
            holders[gpu] = (lock_path(folder, gpu).read_text().split() or ["?"])[0]
        except OSError:
            holders[gpu] = "?"
    return holders


def _acquire(
    n: int, pool: GpuPool, folder: Path, timeout: float | None, poll: float, stamp: str
) -> list[tuple[str, int]]:
    """Retry :func:`_try_acquire` every ``poll`` seconds until it succeeds or ``timeout`` runs out."""
    gpus = pool.members
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        held = _try_acquire(n, gpus, folder, stamp)
        if held is not None:
            return held
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"allocate_gpus: could not lock {n} GPU(s) of the {len(gpus)} visible ({','.join(gpus)}, "
                f"from {pool.source}) within {timeout} s in lock dir {folder}; holder pids by GPU: "
                f"{_holders(folder, gpus)}"
            )
        time.sleep(poll if remaining is None else min(poll, remaining))


# ------------------------------------------------------------------------------------------------ the lease


def _require_cuda_uninitialised() -> None:
    """Refuse to assign GPUs once CUDA is initialised: the new ``CUDA_VISIBLE_DEVICES`` would be ignored."""
    if cuda_initialised():
        raise RuntimeError(
            f"allocate_gpus: CUDA is already initialised in this process, so setting {CUDA_ENV} would be "
            "ignored; allocate GPUs before anything touches torch.cuda"
        )


@contextlib.contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the block and restore the previous values after."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    """Hold ``n`` distinct GPUs of the pool for the block and expose only them via ``CUDA_VISIBLE_DEVICES``.

    ``n == 0`` hides all GPUs; an empty pool runs on CPU with the environment untouched; a SLURM allocation's
    whole pool is taken with SLURM's environment untouched. Locks are taken all-or-nothing, retried every
    ``poll`` s, with ``TimeoutError`` after ``timeout`` s; children get them via :func:`lease_fds` or
    :func:`join_gpu_lease` (``$SD4MATCH_GPU_LEASE`` is set for the block; ``$SD4MATCH_GPUS`` is unset, as
    ``CUDA_VISIBLE_DEVICES`` then names the whole grant).
    """
    _validate_request(n, timeout, poll)
    if n == 0:
        _require_cuda_uninitialised()
        with _environment({CUDA_ENV: "", GPUS_ENV: None}):
            yield GpuLease(ids=[], passthrough=False, lock_paths=[])
        return
    pool = gpu_pool()
    if not pool.members:
        LOGGER.warning(
            "allocate_gpus: %d GPU(s) requested but none visible (%s); running on CPU", n, pool.source
        )
        yield GpuLease(ids=[], passthrough=False, lock_paths=[])
        return
    if n > len(pool.members):
        raise ValueError(
            f"allocate_gpus: {n} GPU(s) requested but only {len(pool.members)} visible "
            f"({','.join(pool.members)}) from {pool.source}; grant more GPUs or lower the job's gpu count"
        )
    folder = lock_folder(lock_dir, pool)
    _require_cuda_uninitialised()
    stamp = f"{os.getpid()} {secrets.token_hex(8)}"
    held = _acquire(n, pool, folder, timeout, poll, stamp)
    try:
        ids = [gpu for gpu, _ in held]
        paths = [lock_path(folder, gpu) for gpu in ids]
        passthrough = pool.slurm_job is not None and not pool.narrowed and ids == pool.members
        env: dict[str, str | None] = {
            LEASE_ENV: json.dumps({"stamp": stamp, "locks": [str(p) for p in paths]})
        }
        if not passthrough:  # the lease is now the whole grant its processes see
            env.update({CUDA_ENV: ",".join(ids), GPUS_ENV: None})
        with _environment(env):
            yield GpuLease(ids=ids, passthrough=passthrough, lock_paths=paths)
    finally:
        _release([fd for _, fd in held])


def lease_fds() -> list[int]:
    """Fds of every GPU lock this process holds: pass them to a child that uses the GPUs
    (``subprocess.Popen(..., pass_fds=lease_fds())``) so the locks live as long as the child does."""
    return sorted(_HELD)


def _lease_from_env() -> tuple[str, list[str]] | None:
    """The (stamp, lock paths) of ``$SD4MATCH_GPU_LEASE``; None when unset."""
    text = os.environ.get(LEASE_ENV)
    if not text:
        return None
    try:
        lease = json.loads(text)
        stamp, locks = lease["stamp"], lease["locks"]
        if not (
            isinstance(stamp, str) and isinstance(locks, list) and all(isinstance(p, str) for p in locks)
        ):
            raise TypeError("stamp must be a string and locks a list of paths")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"environment variable {LEASE_ENV}={text!r} is not a GPU lease ({err})") from err
    return stamp, locks


def join_gpu_lease() -> list[int]:
    """Take a shared lock on each GPU of the lease in ``$SD4MATCH_GPU_LEASE`` (a no-op without one), kept
    until this process exits: for processes started without the job's fds, e.g. accelerate's workers."""
    lease = _lease_from_env()
    if lease is None:
        return []
    stamp, locks = lease
    fds: list[int] = []
    try:
        for path in locks:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                stale = True
            else:
                stale = _read_stamp(fd) != stamp
            if stale:
                raise RuntimeError(
                    f"join_gpu_lease: GPU lock {path} no longer belongs to this job's lease "
                    f"({LEASE_ENV} stamp {stamp!r}): the job that allocated it has ended and the GPU may be "
                    "in use by another job, so this process refuses to use it"
                )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    _HELD.update({fd: path for fd, path in zip(fds, locks, strict=True)})
    return fds


def device_for(lease: GpuLease) -> str:
    """The torch device string for a lease: "cuda" when it grants GPUs and CUDA is usable, else "cpu"."""
    if not (lease.ids or lease.passthrough):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
