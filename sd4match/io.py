"""Atomic file writing: every output appears whole or not at all, so a killed job never leaves a half file.

Temporary files and folders sit beside their target, named ``.<target>.<host>-<pid>.<random>.tmp`` (folders:
``.<target>.<what>-<host>-<pid>-<random>``): a later write of the same target sweeps those a killed process
on this host left behind. Outputs get the permissions of the user's umask, as a plain ``open`` would give
(``mkstemp``/``mkdtemp`` and some writers, e.g. safetensors, create 0600 / 0700). A full disk raises an
``OSError`` that names the file being written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("sd4match.io")

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------------------------------ umask


def current_umask() -> int:
    """The process umask, read from /proc where possible (``os.umask`` must set it to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new regular file under the user's umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permissions of a new folder under the user's umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


# --------------------------------------------------------------------------------- leftovers of killed jobs


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """``<host>-<pid>`` of this process: temporary names carry it so leftovers can be told from live work."""
    return f"{_host_tag()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _leftover(owner: str) -> bool:
    """True when ``<host>-<pid>`` names a process of this host that no longer runs."""
    host, _, pid = owner.rpartition("-")
    if host != _host_tag() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not _pid_alive(int(pid))


def remove_path(path: Path) -> None:
    """Delete a folder tree, or just the file or link itself (never the data a symlink points at)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep_leftovers(parent: str | os.PathLike[str], prefix: str, suffix: str = "") -> list[Path]:
    """Delete entries ``<prefix><host>-<pid><sep>...<suffix>`` in ``parent`` whose process died on this host.

    Live processes' entries, other hosts' (a shared filesystem) and foreign names are kept. Returns what went.
    """
    folder = Path(parent)
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"(?P<owner>[A-Za-z0-9_]+-\d+)[.-].*" + re.escape(suffix) + "$")
    swept = []
    for entry in folder.iterdir():
        match = pattern.match(entry.name)
        if match and _leftover(match["owner"]):
            remove_path(entry)
            swept.append(entry)
            log.info("removed %s, left behind by a killed process", entry)
    return swept


def temp_prefix(target: Path) -> str:
    """Start of the names of ``target``'s temporary files: ``.<name>.``."""
    return f".{target.name}."


# ------------------------------------------------------------------------------------------------ full disk


def disk_full_error(error: OSError, path: str | os.PathLike[str], action: str) -> OSError:
    """An OSError for a full disk / exhausted quota that names ``path`` and what was being done."""
    return OSError(
        error.errno,
        f"{os.strerror(error.errno or errno.ENOSPC)} while {action} {path}: free space on that filesystem "
        "(or point resources_dir / results_dir elsewhere) and rerun",
        str(path),
    )


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library wrapped it (pyarrow keeps the errno)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


# ------------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the umask's permissions whatever created it; leftovers of killed writes of ``path`` are
    swept first; a full disk raises an OSError naming ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target.parent, temp_prefix(target), ".tmp")
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{temp_prefix(target)}{owner_tag()}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, file_mode())  # after the writer: some recreate the file 0600
            os.replace(tmp, target)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full_error(error, target, "writing") from error
            raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_table_atomic(df: Any, path: str | os.PathLike[str]) -> None:
    """Write a pandas DataFrame atomically; the format follows the suffix (.parquet, .csv or .md)."""
    suffix = Path(path).suffix
    if suffix not in (".parquet", ".csv", ".md"):
        raise ValueError(f"write_table_atomic: unsupported table suffix {suffix!r} for {path}")
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            tmp.write_text(df.to_markdown(index=False) + "\n")
