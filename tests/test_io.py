"""Atomic outputs: a failed write leaves neither a partial file nor a temp file, and the old file survives."""

import os
import stat

import pandas as pd
import pytest

from sd4match.io import atomic_path, write_json_atomic, write_table_atomic, write_text_atomic


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
