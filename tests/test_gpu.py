"""GPU allocation through lock files: distinct GPUs per concurrent job, SLURM passthrough, crash safety."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest

from sd4match import gpu
from sd4match.gpu import GpuLease, allocate_gpus, device_for, scheduler_isolated, visible_gpus

REPO = Path(__file__).resolve().parents[1]
SIMULATED = ["0", "1", "2"]
SCHEDULER_ENVS = ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")

# A job that holds its lease until the test creates the `go` file (or 10 s pass), then `hold` seconds more.
JOB = """
import os, sys, time
from pathlib import Path
from sd4match.gpu import allocate_gpus
from sd4match.io import write_json_atomic, write_text_atomic
n, lock_dir, hold = int(sys.argv[1]), sys.argv[2], float(sys.argv[5])
out, go = Path(sys.argv[3]), Path(sys.argv[4])
with allocate_gpus(n, lock_dir=lock_dir, timeout=20, poll=0.02) as lease:
    start = time.monotonic()
    visible = os.environ["CUDA_VISIBLE_DEVICES"]
    write_text_atomic(out.with_suffix(".holding"), visible)
    give_up = start + 10
    while not go.exists() and time.monotonic() < give_up:
        time.sleep(0.01)
    time.sleep(hold)
    end = time.monotonic()
record = {"start": start, "end": end, "visible": visible, "ids": lease.ids,
          "lock_paths": [str(p) for p in lease.lock_paths]}
write_json_atomic(out, record)
"""

# A job that takes every GPU, reports its lease on stdout and then sleeps until it is killed.
HOLDER = """
import sys, time
from sd4match.gpu import allocate_gpus
with allocate_gpus(3, lock_dir=sys.argv[1], timeout=10, poll=0.02) as lease:
    print(",".join(lease.ids), flush=True)
    time.sleep(60)
"""


@pytest.fixture
def lock_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Three simulated GPUs, no scheduler variables, and a private lock folder."""
    monkeypatch.setenv("SD4MATCH_GPUS", ",".join(SIMULATED))
    monkeypatch.delenv("SD4MATCH_GPU_LOCK_DIR", raising=False)
    for name in SCHEDULER_ENVS:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "locks"


def _is_locked(path: Path) -> bool:
    """Whether another open file holds an exclusive flock on ``path``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _wait_for(predicate, what: str, limit_s: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``limit_s`` seconds."""
    give_up = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > give_up:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _run_jobs(n: int, count: int, lock_dir: Path, work: Path) -> list[dict]:
    """Start ``count`` concurrent jobs each asking for ``n`` GPUs; return their lease records."""
    work.mkdir()
    go = work / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(n), str(lock_dir), str(work / f"job{i}.json"), str(go), "0.1"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(count)
    ]
    try:
        concurrent = len(SIMULATED) // n
        _wait_for(lambda: len(list(work.glob("*.holding"))) >= concurrent, f"{concurrent} concurrent holders")
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [json.loads((work / f"job{i}.json").read_text()) for i in range(count)]


def _assert_no_shared_overlap(records: list[dict]) -> None:
    """No two jobs whose holding intervals overlap may share a GPU id."""
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert not set(a["ids"]) & set(b["ids"]), (a, b)


def test_concurrent_single_gpu_jobs_get_distinct_gpus(lock_dir: Path, tmp_path: Path) -> None:
    records = _run_jobs(1, 12, lock_dir, tmp_path / "single")
    for record in records:
        assert len(record["ids"]) == 1
        assert record["ids"][0] in SIMULATED
        assert record["visible"] == record["ids"][0]
        assert record["lock_paths"] == [str(lock_dir / f"gpu-{record['ids'][0]}.lock")]
    _assert_no_shared_overlap(records)
    assert {record["ids"][0] for record in records} == set(SIMULATED)
    assert not any(_is_locked(lock_dir / f"gpu-{g}.lock") for g in SIMULATED)


def test_concurrent_two_gpu_jobs_get_two_distinct_gpus(lock_dir: Path, tmp_path: Path) -> None:
    records = _run_jobs(2, 4, lock_dir, tmp_path / "double")
    for record in records:
        assert len(record["ids"]) == 2
        assert len(set(record["ids"])) == 2
        assert set(record["ids"]) <= set(SIMULATED)
        assert record["visible"] == ",".join(record["ids"])
    _assert_no_shared_overlap(records)


def test_lease_sets_env_writes_pid_and_releases(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with allocate_gpus(2, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(
            ids=["0", "1"], passthrough=False, lock_paths=[lock_dir / "gpu-0.lock", lock_dir / "gpu-1.lock"]
        )
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert (lock_dir / "gpu-0.lock").read_text() == f"{os.getpid()}\n"
        assert _is_locked(lock_dir / "gpu-0.lock") and _is_locked(lock_dir / "gpu-1.lock")
        assert not _is_locked(lock_dir / "gpu-2.lock")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert (lock_dir / "gpu-0.lock").read_text() == ""
    assert not _is_locked(lock_dir / "gpu-0.lock")


def test_second_lease_skips_held_gpu(lock_dir: Path) -> None:
    with (
        allocate_gpus(1, lock_dir=lock_dir) as first,
        allocate_gpus(2, lock_dir=lock_dir, timeout=0) as second,
    ):
        assert first.ids == ["0"]
        assert second.ids == ["1", "2"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_default_lock_dir_from_env_and_tempdir(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(lock_dir.parent))
    assert gpu.default_lock_dir() == lock_dir.parent / f"sd4match-gpu-locks-{os.getuid()}"
    monkeypatch.setenv("SD4MATCH_GPU_LOCK_DIR", str(lock_dir))
    assert gpu.default_lock_dir() == lock_dir
    with allocate_gpus(1) as lease:
        assert lease.lock_paths == [lock_dir / "gpu-0.lock"]


def test_slurm_passthrough_leaves_env_unchanged(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert scheduler_isolated()
    with allocate_gpus(1, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(ids=["5", "6"], passthrough=True, lock_paths=[])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"
    assert not lock_dir.exists()


def test_slurm_gpus_without_cuda_env_pass_through(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    with allocate_gpus(2, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(ids=["3"], passthrough=True, lock_paths=[])
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_scheduler_isolated_needs_job_and_gpus(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not scheduler_isolated()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert not scheduler_isolated()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert not scheduler_isolated()
    monkeypatch.setenv("SLURM_STEP_GPUS", "0")
    assert scheduler_isolated()


def test_zero_gpus_hides_devices_and_restores(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with allocate_gpus(0, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(ids=[], passthrough=False, lock_paths=[])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with allocate_gpus(0, lock_dir=lock_dir):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert not lock_dir.exists()


def test_no_visible_gpus_runs_on_cpu_with_env_untouched(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SD4MATCH_GPUS", "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "9")
    with allocate_gpus(2, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(ids=[], passthrough=False, lock_paths=[])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "9"
        assert device_for(lease) == "cpu"
    assert "2 GPU(s) requested but none visible" in caplog.text


def test_more_gpus_than_visible_is_value_error(lock_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"4 GPU\(s\) requested but only 3 visible \(0,1,2\)"):
        with allocate_gpus(4, lock_dir=lock_dir):
            pass
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must be a non-negative int"),
        ({"n": 1, "timeout": -1}, "timeout"),
        ({"n": 1, "poll": 0}, "poll"),
    ],
)
def test_bad_arguments_are_value_errors(lock_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        with allocate_gpus(lock_dir=lock_dir, **kwargs):
            pass


def test_timeout_when_all_gpus_held_names_lock_dir(lock_dir: Path) -> None:
    with allocate_gpus(3, lock_dir=lock_dir):
        with pytest.raises(TimeoutError) as raised:
            with allocate_gpus(1, lock_dir=lock_dir, timeout=0.1, poll=0.02):
                pass
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    message = str(raised.value)
    assert str(lock_dir) in message
    assert "could not lock 1 GPU(s) of the 3 visible (0,1,2)" in message
    assert f"'0': '{os.getpid()}'" in message


def test_acquisition_is_all_or_nothing(lock_dir: Path) -> None:
    with allocate_gpus(1, lock_dir=lock_dir, timeout=0) as held:
        assert held.ids == ["0"]
        with pytest.raises(TimeoutError):
            with allocate_gpus(3, lock_dir=lock_dir, timeout=0.1, poll=0.02):
                pass
        assert not _is_locked(lock_dir / "gpu-1.lock")
        assert not _is_locked(lock_dir / "gpu-2.lock")


def test_killed_holder_releases_its_gpus(lock_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "holder subprocess did not report its lease"
        assert proc.stdout.readline().decode().strip() == "0,1,2"
        assert (lock_dir / "gpu-2.lock").read_text() == f"{proc.pid}\n"
        with pytest.raises(TimeoutError):
            with allocate_gpus(1, lock_dir=lock_dir, timeout=0):
                pass
        proc.kill()
        proc.wait(timeout=10)
        with allocate_gpus(3, lock_dir=lock_dir, timeout=5, poll=0.02) as lease:
            assert lease.ids == SIMULATED
            assert (lock_dir / "gpu-2.lock").read_text() == f"{os.getpid()}\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_env_and_locks_restored_on_exception(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(KeyError, match="boom"):
        with allocate_gpus(2, lock_dir=lock_dir):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
            raise KeyError("boom")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert not any(_is_locked(lock_dir / f"gpu-{g}.lock") for g in SIMULATED)


def test_refuses_when_cuda_already_initialised(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "cuda_initialised", lambda: True)
    for n in (0, 1):
        with pytest.raises(RuntimeError, match="CUDA is already initialised"):
            with allocate_gpus(n, lock_dir=lock_dir):
                pass
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not _is_locked(lock_dir / "gpu-0.lock")


def test_cuda_initialised_reads_imported_torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpu.cuda_initialised() is False
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert gpu.cuda_initialised() is True


def test_device_for(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert device_for(GpuLease(ids=["1"], passthrough=False, lock_paths=[])) == "cuda"
    assert device_for(GpuLease(ids=[], passthrough=True, lock_paths=[])) == "cuda"
    assert device_for(GpuLease(ids=[], passthrough=False, lock_paths=[])) == "cpu"
    fake.cuda.is_available = lambda: False
    assert device_for(GpuLease(ids=["1"], passthrough=False, lock_paths=[])) == "cpu"


def test_visible_gpus_from_env(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert visible_gpus() == SIMULATED
    monkeypatch.setenv("SD4MATCH_GPUS", " 3, GPU-ab12 ,")
    assert visible_gpus() == ["3", "GPU-ab12"]
    monkeypatch.setenv("SD4MATCH_GPUS", "0,1,0")
    with pytest.raises(ValueError, match=r"SD4MATCH_GPUS: duplicate GPU id\(s\) \['0'\]"):
        visible_gpus()
    monkeypatch.setenv("SD4MATCH_GPUS", "0,../x")
    with pytest.raises(ValueError, match=r"SD4MATCH_GPUS: invalid GPU id\(s\) \['../x'\]"):
        visible_gpus()


def _fake_nvidia_smi(folder: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put an executable ``nvidia-smi`` running ``script`` (sh) alone on PATH."""
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))


def test_visible_gpus_from_nvidia_smi(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SD4MATCH_GPUS")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus() == []
    _fake_nvidia_smi(
        tmp_path / "ok",
        'test "$*" = "--query-gpu=index --format=csv,noheader" && printf "0\\n1\\n"',
        monkeypatch,
    )
    assert visible_gpus() == ["0", "1"]
    _fake_nvidia_smi(tmp_path / "broken", "echo 'NVIDIA-SMI has failed' >&2; exit 9", monkeypatch)
    assert visible_gpus() == []
