"""Atomic outputs: a failed write leaves neither a partial file nor a temp file, and the old file survives."""

import errno
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from sd4match.io import (
    atomic_path,
    current_umask,
    owner_tag,
    sweep_leftovers,
    write_json_atomic,
    write_table_atomic,
    write_text_atomic,
)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_writes_and_permissions(tmp_path):
    write_text_atomic(tmp_path / "a" / "t.txt", "x")
    write_json_atomic(tmp_path / "j.json", {"b": 1, "a": 2})
    assert (tmp_path / "a" / "t.txt").read_text() == "x"
    assert (tmp_path / "j.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "j.json").stat().st_mode) == 0o666 & ~mask


def test_tables_by_suffix(tmp_path):
    df = pd.DataFrame({"a": [1, 2]})
    write_table_atomic(df, tmp_path / "t.csv")
    write_table_atomic(df, tmp_path / "t.parquet")
    assert (tmp_path / "t.csv").read_text() == "a\n1\n2\n"
    assert pd.read_parquet(tmp_path / "t.parquet")["a"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="unsupported table suffix '.xlsx'"):
        write_table_atomic(df, tmp_path / "t.xlsx")


# --------------------------------------------------------------------------------------------- issue 7 §5/§6


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_killed_writes_leave_no_temp_files_after_the_next_write(tmp_path):
    host = owner_tag().rsplit("-", 1)[0]
    killed = tmp_path / f".out.parquet.{host}-{_dead_pid()}.k2j4x9_a.tmp"
    live = tmp_path / f".out.parquet.{host}-{os.getppid()}.abcdefgh.tmp"  # a writer that still runs
    other_host = tmp_path / ".out.parquet.node17-4242.abcdefgh.tmp"  # a shared filesystem: not ours to judge
    other_target = tmp_path / f".other.csv.{host}-{_dead_pid()}.abcdefgh.tmp"
    for path in (killed, live, other_host, other_target):
        path.write_bytes(b"half a table")
    write_table_atomic(pd.DataFrame({"a": [1]}), tmp_path / "out.parquet")
    assert not killed.exists()
    assert live.exists() and other_host.exists() and other_target.exists()
    assert sweep_leftovers(tmp_path, ".other.csv.", ".tmp") == [other_target]


def test_temp_names_carry_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "x.json") as tmp:
        assert tmp.name.startswith(f".x.json.{owner_tag()}.") and tmp.name.endswith(".tmp")
        tmp.write_text("{}")


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".md"])
def test_table_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch, suffix):
    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    monkeypatch.setattr(pd.DataFrame, "to_markdown", lambda self, **kw: full(self, None))
    target = tmp_path / "tables" / f"table2{suffix}"
    with pytest.raises(OSError) as info:
        write_table_atomic(pd.DataFrame({"a": [1]}), target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert f"No space left on device while writing {target}" in str(info.value)
    assert list(target.parent.iterdir()) == []


def test_other_os_errors_pass_unchanged(tmp_path):
    with pytest.raises(PermissionError, match="read-only"):
        with atomic_path(tmp_path / "x.txt"):
            raise PermissionError(errno.EACCES, "read-only")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_follow_the_umask_whatever_writes_them(tmp_path, umask, mode):
    """safetensors recreates its file 0600; mkstemp makes 0600: both end up as the umask says."""
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        with atomic_path(tmp_path / "prompt.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, tmp)
        with atomic_path(tmp_path / "checkpoint.pt") as tmp:
            torch.save({"step": 1}, tmp)
        write_table_atomic(pd.DataFrame({"a": [1]}), tmp_path / "pairs.parquet")
        write_json_atomic(tmp_path / "sidecar.json", {})
    finally:
        os.umask(old)
    for name in ("prompt.safetensors", "checkpoint.pt", "pairs.parquet", "sidecar.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
