"""GPU allocation through lock files: the pool each environment grants, distinct GPUs per concurrent job,
SLURM allocations vs SLURM executor jobs, locks that outlive their job while a child runs, shared folders."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sd4match import gpu
from sd4match.gpu import GpuLease, allocate_gpus, device_for, visible_gpus

REPO = Path(__file__).resolve().parents[1]
SIMULATED = ["0", "1", "2"]
SCHEDULER_ENVS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "CUDA_VISIBLE_DEVICES",
    "SD4MATCH_GPU_LEASE",
)
OTHER_UID = 65534  # "nobody": a real second user for the shared-folder tests when they run as root

# A job that holds its lease until the test creates the `go` file (or 30 s pass), then `hold` seconds more.
JOB = """
import os, sys, time
from pathlib import Path
from sd4match.gpu import allocate_gpus
from sd4match.io import write_json_atomic, write_text_atomic
n, lock_dir, hold = int(sys.argv[1]), sys.argv[2], float(sys.argv[5])
out, go = Path(sys.argv[3]), Path(sys.argv[4])
with allocate_gpus(n, lock_dir=lock_dir, timeout=60, poll=0.02) as lease:
    start = time.monotonic()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    write_text_atomic(out.with_suffix(".holding"), str(visible))
    give_up = start + 30
    while not go.exists() and time.monotonic() < give_up:
        time.sleep(0.01)
    time.sleep(hold)
    end = time.monotonic()
record = {"start": start, "end": end, "visible": visible, "ids": lease.ids, "passthrough": lease.passthrough,
          "lock_paths": [str(p) for p in lease.lock_paths]}
write_json_atomic(out, record)
"""

# A job that takes `n` GPUs, reports its lease on stdout and then sleeps until it is killed.
HOLDER = """
import sys, time
from sd4match.gpu import allocate_gpus
with allocate_gpus(int(sys.argv[2]), lock_dir=sys.argv[1], timeout=10, poll=0.02) as lease:
    print(",".join(lease.ids), flush=True)
    time.sleep(60)
"""

# A child that uses the job's GPUs: reports `<pid> <ppid>` in `<ready>.started`, waits for `join` (then joins
# the lease when asked, as accelerate's workers do) and writes `ready`, then runs until `finish` exists.
CHILD = """
import os, sys, time
from pathlib import Path
ready, join, finish = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def wait(path):
    give_up = time.monotonic() + 60
    while not path.exists() and time.monotonic() < give_up:
        time.sleep(0.01)
ready.with_suffix(".tmp").write_text(f"{os.getpid()} {os.getppid()}")
os.replace(ready.with_suffix(".tmp"), ready.with_suffix(".started"))  # whole, never seen half-written
wait(join)
if sys.argv[4] == "join":
    from sd4match.gpu import join_gpu_lease
    join_gpu_lease()
ready.write_text("ok")
wait(finish)
"""

# A job that leases GPUs and runs CHILD: through training's launch helper (`training`, fds passed), with
# a plain Popen that passes nothing (`plain`, like torch elastic's workers), or as the worker of a torch
# elastic agent that gets the fds as training's launch helper passes them (`torchrun`).
PARENT = """
import subprocess, sys
from sd4match.gpu import allocate_gpus, lease_fds
lock_dir, n, how, child = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
with allocate_gpus(n, lock_dir=lock_dir, timeout=10, poll=0.02):
    if how == "plain":
        subprocess.run([sys.executable, "-c", *child], start_new_session=True)
    elif how == "training":
        from sd4match.training import _run_streaming
        _run_streaming([sys.executable, "-c", *child])
    else:  # as training's launch helper does, without importing all of training
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        subprocess.run([*run, *child], pass_fds=lease_fds(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
"""

# Environments a job can find itself in: variables to set, the pool members and the lock sub-folder.
PLAIN = {"SD4MATCH_GPUS": "0,1,2"}
CUDA_POOL = {"SD4MATCH_GPUS": None, "CUDA_VISIBLE_DEVICES": "2,3"}
UUID_POOL = {"SD4MATCH_GPUS": None, "CUDA_VISIBLE_DEVICES": "GPU-8c1d5e0a,MIG-GPU-8c1d5e0a/1/0"}
SLURM_ALLOCATION = {  # snakemake run on a node SLURM allocated with 3 GPUs (cgroup-relative numbering)
    "SD4MATCH_GPUS": None,
    "SLURM_JOB_ID": "777",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_GPUS": "4,5,6",
    "CUDA_VISIBLE_DEVICES": "0,1,2",
}
ENVIRONMENTS = {
    "plain": (PLAIN, ["0", "1", "2"], ""),
    "cuda_pool": (CUDA_POOL, ["2", "3"], ""),
    "uuid_pool": (UUID_POOL, ["GPU-8c1d5e0a", "MIG-GPU-8c1d5e0a/1/0"], ""),
    "slurm_allocation": (SLURM_ALLOCATION, ["0", "1", "2"], "slurm-777"),
}


@pytest.fixture
def lock_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Three simulated GPUs, no scheduler variables, no nvidia-smi, and a private lock folder."""
    monkeypatch.setenv("SD4MATCH_GPUS", ",".join(SIMULATED))
    monkeypatch.delenv("SD4MATCH_GPU_LOCK_DIR", raising=False)
    for name in SCHEDULER_ENVS:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "no-nvidia-smi").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-nvidia-smi"))
    return tmp_path / "locks"


def _set_env(monkeypatch: pytest.MonkeyPatch, values: dict[str, str | None]) -> None:
    """Apply an environment table (None deletes the variable)."""
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def _child_env(values: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with ``values`` applied, for a subprocess."""
    env = dict(os.environ)
    for name, value in values.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


def _is_locked(path: Path) -> bool:
    """Whether another open file holds a (shared or exclusive) flock on ``path``."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``limit_s`` seconds."""
    give_up = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > give_up:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill and reap whichever of ``procs`` still run."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _run_jobs(n: int, envs: list[dict], lock_dir: Path, work: Path, concurrent: int) -> list[dict]:
    """Start one job per entry of ``envs`` (its environment table), each asking for ``n`` GPUs; wait until
    ``concurrent`` of them hold their lease at once, release them all, and return their lease records."""
    work.mkdir()
    go = work / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB, str(n), str(lock_dir), str(work / f"job{i}.json"), str(go), "0.05"],
            cwd=REPO,
            env=_child_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, env in enumerate(envs)
    ]
    try:
        _wait_for(lambda: len(list(work.glob("*.holding"))) >= concurrent, f"{concurrent} concurrent holders")
        go.touch()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
    finally:
        _stop(procs)
    return [json.loads((work / f"job{i}.json").read_text()) for i in range(len(envs))]


@contextlib.contextmanager
def _another_job(environ: dict[str, str]) -> Iterator[None]:
    """Inside a lease, act as a concurrent job started from ``environ`` (the environment outside the lease,
    which a lease replaces with its own grant), then restore the lease's environment."""
    inside = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(inside)


def _assert_no_shared_overlap(records: list[dict]) -> None:
    """No two jobs whose holding intervals overlap may share a GPU id."""
    for i, a in enumerate(records):
        for b in records[i + 1 :]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                assert not set(a["ids"]) & set(b["ids"]), (a, b)


# ------------------------------------------------------------------------------------------------ the pool


@pytest.mark.parametrize(
    ("env", "members", "source"),
    [
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, ["2", "3"], "CUDA_VISIBLE_DEVICES=2,3"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-ab12, MIG-GPU-ab12/1/0"}, ["GPU-ab12", "MIG-GPU-ab12/1/0"], "CUDA"),
        ({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, ["1"], "CUDA"),  # CUDA stops at the first invalid entry
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, [], "CUDA"),  # SLURM's "no GPU device files"
        ({"CUDA_VISIBLE_DEVICES": ""}, [], "CUDA"),
        ({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "4,5"}, ["0", "1"], "CUDA_VISIBLE_DEVICES=0,1"),
        ({"SLURM_STEP_GPUS": "4", "SLURM_JOB_GPUS": "4,5"}, ["4"], "SLURM_STEP_GPUS=4"),
        ({"SLURM_JOB_GPUS": "4,5"}, ["4", "5"], "SLURM_JOB_GPUS=4,5"),
        ({"SD4MATCH_GPUS": "0,2"}, ["0", "2"], "SD4MATCH_GPUS=0,2"),
        ({"SD4MATCH_GPUS": "3,1", "CUDA_VISIBLE_DEVICES": "1,2,3"}, ["3", "1"], "SD4MATCH_GPUS within CUDA"),
    ],
)
def test_pool_comes_from_the_first_source_set(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, env: dict, members: list[str], source: str
) -> None:
    monkeypatch.delenv("SD4MATCH_GPUS")
    _set_env(monkeypatch, env)
    pool = gpu.gpu_pool()
    assert pool.members == members
    assert pool.source.startswith(source)
    assert pool.narrowed == (env.get("SD4MATCH_GPUS") == "3,1")


def test_sd4match_gpus_outside_the_granted_set_is_an_error(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ValueError, match=r"SD4MATCH_GPUS=0,1,2: GPU\(s\) \['0', '1'\] are not among .*=2,3"):
        with allocate_gpus(1, lock_dir=lock_dir):
            pass


def test_slurm_job_key(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu.slurm_job() is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert gpu.slurm_job() == "4242"
    monkeypatch.setenv("SLURM_JOB_ID", "42/../x")
    with pytest.raises(ValueError, match=r"SLURM_JOB_ID='42/../x' is not a SLURM job id"):
        gpu.slurm_job()


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
    assert visible_gpus() == []
    _fake_nvidia_smi(
        tmp_path / "ok",
        'test "$*" = "--query-gpu=index --format=csv,noheader" && printf "0\\n1\\n"',
        monkeypatch,
    )
    assert visible_gpus() == ["0", "1"]
    assert gpu.gpu_pool().source == "nvidia-smi"
    _fake_nvidia_smi(tmp_path / "broken", "echo 'NVIDIA-SMI has failed' >&2; exit 9", monkeypatch)
    assert visible_gpus() == []


# ---------------------------------------------------------------------------- concurrent jobs, by environment


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_concurrent_jobs_get_distinct_members_of_the_pool(lock_dir: Path, tmp_path: Path, name: str) -> None:
    env, members, sub = ENVIRONMENTS[name]
    records = _run_jobs(1, [env] * (3 * len(members)), lock_dir, tmp_path / name, concurrent=len(members))
    for record in records:
        assert len(record["ids"]) == 1 and record["ids"][0] in members
        assert record["visible"] == record["ids"][0]  # a member of the granted set, not an index into it
        assert record["passthrough"] is False
        assert record["lock_paths"] == [str(gpu.lock_path(lock_dir / sub, record["ids"][0]))]
    _assert_no_shared_overlap(records)
    assert {record["ids"][0] for record in records} == set(members)
    assert not any(_is_locked(gpu.lock_path(lock_dir / sub, member)) for member in members)


def test_concurrent_two_gpu_jobs_get_two_distinct_gpus(lock_dir: Path, tmp_path: Path) -> None:
    records = _run_jobs(2, [PLAIN] * 4, lock_dir, tmp_path / "double", concurrent=1)
    for record in records:
        assert len(record["ids"]) == 2
        assert len(set(record["ids"])) == 2
        assert set(record["ids"]) <= set(SIMULATED)
        assert record["visible"] == ",".join(record["ids"])
    _assert_no_shared_overlap(records)


def test_slurm_executor_jobs_pass_through_concurrently(lock_dir: Path, tmp_path: Path) -> None:
    """The SLURM executor runs one job per allocation: each sees its own GPUs as CUDA_VISIBLE_DEVICES=0 (or
    0,1), all run at once, and each keeps SLURM's environment untouched."""
    envs = [
        {"SD4MATCH_GPUS": None, "SLURM_JOB_ID": str(900 + i), "SLURM_STEP_ID": "0", "SLURM_JOB_GPUS": str(i)}
        | {"CUDA_VISIBLE_DEVICES": "0"}
        for i in range(4)
    ]
    records = _run_jobs(1, envs, lock_dir, tmp_path / "executor", concurrent=len(envs))
    pairs = [{**envs[0], "SLURM_JOB_ID": str(950 + i), "CUDA_VISIBLE_DEVICES": "0,1"} for i in range(2)]
    records2 = _run_jobs(2, pairs, lock_dir, tmp_path / "executor2", concurrent=len(pairs))
    for i, record in enumerate(records):
        assert record["ids"] == ["0"] and record["visible"] == "0" and record["passthrough"] is True
        assert record["lock_paths"] == [str(lock_dir / f"slurm-{900 + i}" / "gpu-0.lock")]
    for record in records2:
        assert record["ids"] == ["0", "1"] and record["visible"] == "0,1" and record["passthrough"] is True
    for batch in (records, records2):  # none waited for another: all held their GPU "0" at one moment
        assert max(record["start"] for record in batch) < min(record["end"] for record in batch)


def test_slurm_whole_pool_is_passed_through_but_still_locked(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_env(monkeypatch, SLURM_ALLOCATION)
    allocation = lock_dir / "slurm-777"
    outside = dict(os.environ)
    with allocate_gpus(3, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(
            ids=SIMULATED, passthrough=True, lock_paths=[allocation / f"gpu-{g}.lock" for g in "012"]
        )
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
        for step in ("0", "1"):  # a second job of the allocation waits, also from another (overlapping) step
            with pytest.raises(TimeoutError, match="slurm-777;"):
                with (
                    _another_job(outside | {"SLURM_STEP_ID": step}),
                    allocate_gpus(1, lock_dir=lock_dir, timeout=0),
                ):
                    pass
        another = outside | {"SLURM_JOB_ID": "778", "CUDA_VISIBLE_DEVICES": "0"}  # its own GPUs, from 0
        with _another_job(another), allocate_gpus(1, lock_dir=lock_dir, timeout=0) as other:
            assert other.ids == ["0"] and other.lock_paths == [lock_dir / "slurm-778" / "gpu-0.lock"]
    assert stat.S_IMODE(allocation.stat().st_mode) == 0o700


def test_slurm_job_gpus_without_cuda_env(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _set_env(monkeypatch, {"SD4MATCH_GPUS": None, "SLURM_JOB_ID": "4242", "SLURM_JOB_GPUS": "3,5"})
    with allocate_gpus(2, lock_dir=lock_dir) as whole:
        assert whole == GpuLease(
            ids=["3", "5"],
            passthrough=True,
            lock_paths=[lock_dir / "slurm-4242" / f"gpu-{g}.lock" for g in "35"],
        )
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with allocate_gpus(1, lock_dir=lock_dir) as part:
        assert part.ids == ["3"] and not part.passthrough
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(
        ValueError, match=r"3 GPU\(s\) requested but only 2 visible \(3,5\) from SLURM_JOB_GPUS"
    ):
        with allocate_gpus(3, lock_dir=lock_dir):
            pass


def test_cuda_pool_and_uuid_members_in_process(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _set_env(monkeypatch, UUID_POOL)
    outside = dict(os.environ)
    with allocate_gpus(1, lock_dir=lock_dir) as first:
        assert first.ids == ["GPU-8c1d5e0a"] and os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-8c1d5e0a"
        with _another_job(outside), allocate_gpus(1, lock_dir=lock_dir, timeout=0) as second:
            assert second.ids == ["MIG-GPU-8c1d5e0a/1/0"]
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "MIG-GPU-8c1d5e0a/1/0"
            assert second.lock_paths == [lock_dir / "gpu-MIG-GPU-8c1d5e0a%2F1%2F0.lock"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == UUID_POOL["CUDA_VISIBLE_DEVICES"]


# ------------------------------------------------------------------------------------------- in-process rules


def test_lease_sets_env_stamps_pid_and_releases(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1,0")  # SD4MATCH_GPUS=0,1,2 narrows it to that order
    with allocate_gpus(2, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(
            ids=["0", "1"], passthrough=False, lock_paths=[lock_dir / "gpu-0.lock", lock_dir / "gpu-1.lock"]
        )
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        pid, token = (lock_dir / "gpu-0.lock").read_text().split()
        assert pid == str(os.getpid()) and len(token) == 16
        assert json.loads(os.environ["SD4MATCH_GPU_LEASE"]) == {
            "stamp": f"{pid} {token}",
            "locks": [str(lock_dir / "gpu-0.lock"), str(lock_dir / "gpu-1.lock")],
        }
        assert _is_locked(lock_dir / "gpu-0.lock") and _is_locked(lock_dir / "gpu-1.lock")
        assert not _is_locked(lock_dir / "gpu-2.lock")
        assert len(gpu.lease_fds()) == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,1,0"
    assert "SD4MATCH_GPU_LEASE" not in os.environ and gpu.lease_fds() == []
    assert not _is_locked(lock_dir / "gpu-0.lock")


def test_second_lease_skips_held_gpu(lock_dir: Path) -> None:
    outside = dict(os.environ)
    with allocate_gpus(1, lock_dir=lock_dir) as first:
        assert first.ids == ["0"]
        with _another_job(outside), allocate_gpus(2, lock_dir=lock_dir, timeout=0) as second:
            assert second.ids == ["1", "2"]
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_lease_environment_is_its_grant(lock_dir: Path) -> None:
    """Processes inside a lease see only its GPUs (SD4MATCH_GPUS would otherwise name GPUs outside it)."""
    with allocate_gpus(1, lock_dir=lock_dir) as lease:
        assert lease.ids == ["0"] and "SD4MATCH_GPUS" not in os.environ
        assert gpu.gpu_pool() == gpu.GpuPool(["0"], "CUDA_VISIBLE_DEVICES=0")
        with pytest.raises(TimeoutError):  # its GPU is taken (by the lease itself)
            with allocate_gpus(1, lock_dir=lock_dir, timeout=0):
                pass
    with allocate_gpus(0, lock_dir=lock_dir):
        assert "SD4MATCH_GPUS" not in os.environ and visible_gpus() == []
    assert os.environ["SD4MATCH_GPUS"] == "0,1,2"


def test_default_lock_dir_from_env_and_tempdir(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(lock_dir.parent))
    private = lock_dir.parent / f"sd4match-gpu-locks-{os.getuid()}"
    assert gpu.default_lock_dir() == private
    with allocate_gpus(1) as lease:
        assert lease.lock_paths == [private / "gpu-0.lock"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    monkeypatch.setenv("SD4MATCH_GPU_LOCK_DIR", str(lock_dir))
    assert gpu.default_lock_dir() == lock_dir
    with allocate_gpus(1) as lease:
        assert lease.lock_paths == [lock_dir / "gpu-0.lock"]


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


@pytest.mark.parametrize(
    "env", [{"SD4MATCH_GPUS": ""}, {"CUDA_VISIBLE_DEVICES": "-1", "SD4MATCH_GPUS": None}]
)
def test_no_visible_gpus_runs_on_cpu_with_env_untouched(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, env: dict
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "9")
    _set_env(monkeypatch, env)
    before = os.environ["CUDA_VISIBLE_DEVICES"]
    with allocate_gpus(2, lock_dir=lock_dir) as lease:
        assert lease == GpuLease(ids=[], passthrough=False, lock_paths=[])
        assert os.environ["CUDA_VISIBLE_DEVICES"] == before
        assert device_for(lease) == "cpu"
    assert "2 GPU(s) requested but none visible" in caplog.text
    assert not lock_dir.exists()


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
    outside = dict(os.environ)
    with allocate_gpus(3, lock_dir=lock_dir):
        with pytest.raises(TimeoutError) as raised, _another_job(outside):
            with allocate_gpus(1, lock_dir=lock_dir, timeout=0.1, poll=0.02):
                pass
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    message = str(raised.value)
    assert str(lock_dir) in message
    assert "could not lock 1 GPU(s) of the 3 visible (0,1,2, from SD4MATCH_GPUS=0,1,2)" in message
    assert f"'0': '{os.getpid()}'" in message


def test_acquisition_is_all_or_nothing(lock_dir: Path) -> None:
    outside = dict(os.environ)
    with allocate_gpus(1, lock_dir=lock_dir, timeout=0) as held:
        assert held.ids == ["0"]
        with pytest.raises(TimeoutError), _another_job(outside):
            with allocate_gpus(3, lock_dir=lock_dir, timeout=0.1, poll=0.02):
                pass
        assert not _is_locked(lock_dir / "gpu-1.lock")
        assert not _is_locked(lock_dir / "gpu-2.lock")


def test_env_and_locks_restored_on_exception(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(KeyError, match="boom"):
        with allocate_gpus(2, lock_dir=lock_dir):
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
            raise KeyError("boom")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert "SD4MATCH_GPU_LEASE" not in os.environ
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


# ----------------------------------------------------------------------------------- kills and lock lifetime


@pytest.mark.parametrize("name", ["plain", "cuda_pool", "slurm_allocation"])
def test_killed_holder_releases_its_gpus(lock_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    env, members, sub = ENVIRONMENTS[name]
    _set_env(monkeypatch, env)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), str(len(members))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "holder subprocess did not report its lease"
        assert proc.stdout.readline().decode().strip() == ",".join(members)
        assert gpu.lock_path(lock_dir / sub, members[-1]).read_text().split()[0] == str(proc.pid)
        with pytest.raises(TimeoutError):
            with allocate_gpus(1, lock_dir=lock_dir, timeout=0):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with allocate_gpus(len(members), lock_dir=lock_dir, timeout=10, poll=0.02) as lease:
            assert lease.ids == members
            assert gpu.lock_path(lock_dir / sub, members[-1]).read_text().split()[0] == str(os.getpid())
    finally:
        _stop([proc])
        proc.stdout.close()
        proc.stderr.close()


def _run_parent(lock_dir: Path, n: int, how: str, child: list[str], work: Path) -> subprocess.Popen:
    """Start PARENT leasing ``n`` GPUs and running ``child`` (argv after ``python -c``) ``how``."""
    with open(work / "parent.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", PARENT, str(lock_dir), str(n), how, *child],
            cwd=REPO,
            env=_child_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _lifetime_files(work: Path) -> tuple[Path, Path, Path]:
    """The ready / join / finish files a CHILD waits on."""
    work.mkdir()
    return work / "ready", work / "join", work / "finish"


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped counts: its fds are closed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _kill_pid(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("how", ["training", "plain"])
def test_killed_parent_keeps_gpus_locked_while_its_child_runs(
    lock_dir: Path, tmp_path: Path, how: str
) -> None:
    """`training`: the child gets the lease's fds (training's launch helper); `plain`: it gets none (like
    torch elastic's workers) and joins the lease. Either way the GPUs stay locked until the child exits."""
    ready, join, finish = _lifetime_files(tmp_path / "run")
    mode = "join" if how == "plain" else "inherit"
    parent = _run_parent(lock_dir, 2, how, [CHILD, str(ready), str(join), str(finish), mode], tmp_path)
    child_pid = None
    try:
        _wait_for(lambda: ready.with_suffix(".started").exists() or parent.poll() is not None, "child start")
        assert parent.poll() is None, (tmp_path / "parent.err").read_text()
        child_pid = int(ready.with_suffix(".started").read_text().split()[0])
        join.touch()
        _wait_for(ready.exists, "child ready")
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _is_locked(lock_dir / "gpu-0.lock") and _is_locked(lock_dir / "gpu-1.lock")
        with pytest.raises(TimeoutError):
            with allocate_gpus(2, lock_dir=lock_dir, timeout=0.2, poll=0.02):
                pass
        finish.touch()
        _wait_for(lambda: not _is_locked(lock_dir / "gpu-0.lock"), "the child to exit and free GPU 0")
        with allocate_gpus(3, lock_dir=lock_dir, timeout=10, poll=0.02) as lease:
            assert lease.ids == SIMULATED
    finally:
        finish.touch()
        _stop([parent])
        if child_pid is not None:
            _kill_pid(child_pid)


def test_torch_elastic_worker_keeps_gpus_after_job_and_agent_are_killed(
    lock_dir: Path, tmp_path: Path
) -> None:
    """The real multi-GPU chain: job -> torch elastic agent (given the lease's fds) -> worker (started by
    torch without our fds). Killing the job leaves the agent holding the lease; the worker then joins it;
    killing the agent too leaves the worker holding it; the GPUs are free only when the worker exits."""
    ready, join, finish = _lifetime_files(tmp_path / "run")
    script = tmp_path / "worker.py"
    script.write_text(CHILD)
    parent = _run_parent(
        lock_dir, 2, "torchrun", [str(script), str(ready), str(join), str(finish), "join"], tmp_path
    )
    pids: list[int] = []
    try:
        _wait_for(lambda: ready.with_suffix(".started").exists() or parent.poll() is not None, "worker start")
        assert parent.poll() is None, (tmp_path / "parent.err").read_text()
        pids = [int(pid) for pid in ready.with_suffix(".started").read_text().split()]  # worker, agent
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _is_locked(lock_dir / "gpu-0.lock") and _is_locked(lock_dir / "gpu-1.lock")  # the agent's fds
        join.touch()
        _wait_for(ready.exists, "worker joined the lease")
        _kill_pid(pids[1])
        _wait_for(lambda: _gone(pids[1]), "the agent to die")
        assert _is_locked(lock_dir / "gpu-0.lock") and _is_locked(lock_dir / "gpu-1.lock")  # the worker's
        finish.touch()
        _wait_for(lambda: not _is_locked(lock_dir / "gpu-1.lock"), "the worker to exit and free GPU 1")
    finally:
        finish.touch()
        _stop([parent])
        for pid in pids:
            _kill_pid(pid)


def test_join_refuses_a_lease_another_job_took_over(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu.join_gpu_lease() == []  # no lease: nothing to join
    with allocate_gpus(1, lock_dir=lock_dir):
        stale = os.environ["SD4MATCH_GPU_LEASE"]
        joined = gpu.join_gpu_lease()  # a share of the live lease, kept until the process exits...
        assert len(joined) == 1 and len(gpu.lease_fds()) == 2
        gpu._release(joined)  # ...or here, released by hand
    with allocate_gpus(1, lock_dir=lock_dir):  # the next job takes GPU 0 and stamps it
        monkeypatch.setenv("SD4MATCH_GPU_LEASE", stale)
        with pytest.raises(RuntimeError, match=r"gpu-0.lock no longer belongs to this job's lease"):
            gpu.join_gpu_lease()
    monkeypatch.setenv("SD4MATCH_GPU_LEASE", '{"stamp": 1}')
    with pytest.raises(ValueError, match="SD4MATCH_GPU_LEASE=.* is not a GPU lease"):
        gpu.join_gpu_lease()


# ---------------------------------------------------------------------------------- a folder shared by users


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A temp folder every user can traverse (pytest's tmp_path is private to its user)."""
    base = Path(tempfile.mkdtemp(prefix="sd4match-gpu-test-"))
    base.chmod(0o755)
    yield base
    for path in [base, *base.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(base)


def _as_other_user(action: Callable[[], object]) -> dict:
    """Run ``action()`` in a forked child as uid/gid 65534 when root (a real second user), else as this
    user on files the caller made unwritable; ``{"ok": result}`` or ``{"error": message}``."""
    if os.geteuid() != 0:
        try:
            return {"ok": action()}
        except Exception as err:  # noqa: BLE001 - reported to the test
            return {"error": f"{type(err).__name__}: {err}"}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            outcome = {"ok": action()}
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            outcome = {"error": f"{type(err).__name__}: {err}"}
        with os.fdopen(write, "w") as stream:
            json.dump(outcome, stream)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        outcome = json.load(stream)
    os.waitpid(pid, 0)
    return outcome


def _lease_one(folder: Path, n: int = 1) -> dict:
    """Lease ``n`` GPUs without waiting and report them."""
    with allocate_gpus(n, lock_dir=folder, timeout=0) as lease:
        return {"ids": lease.ids, "visible": os.environ["CUDA_VISIBLE_DEVICES"]}


def test_lock_folder_and_files_are_made_shareable(lock_dir: Path) -> None:
    previous = os.umask(0o077)
    try:
        with allocate_gpus(1, lock_dir=lock_dir):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777  # like /tmp: all may add, none may delete others'
    assert stat.S_IMODE((lock_dir / "gpu-0.lock").stat().st_mode) == 0o666


@pytest.mark.skipif(os.geteuid() != 0, reason="a second real user needs root (setuid in a forked child)")
def test_second_user_shares_the_lock_folder(lock_dir: Path, shared_base: Path) -> None:
    folder = shared_base / "locks"
    outside = dict(os.environ)
    with allocate_gpus(1, lock_dir=folder) as mine, _another_job(outside):  # creates folder and GPU 0's lock
        assert mine.ids == ["0"]
        assert _as_other_user(lambda: _lease_one(folder)) == {"ok": {"ids": ["1"], "visible": "1"}}
        blocked = _as_other_user(lambda: _lease_one(folder, 3))
        assert blocked["error"].startswith("TimeoutError: allocate_gpus: could not lock 3 GPU(s)")
    assert (folder / "gpu-1.lock").stat().st_uid == OTHER_UID
    assert _as_other_user(lambda: _lease_one(folder, 3)) == {"ok": {"ids": SIMULATED, "visible": "0,1,2"}}


def test_unwritable_lock_file_says_how_to_share_or_split(lock_dir: Path, shared_base: Path) -> None:
    folder = shared_base / "locks"
    with allocate_gpus(3, lock_dir=folder):
        pass
    (folder / "gpu-0.lock").chmod(0o444)  # as another user's lock file made under umask 022 reads to us
    outcome = _as_other_user(lambda: _lease_one(folder))
    message = outcome["error"]
    assert message.startswith(
        f"PermissionError: [Errno 13] GPU lock file {folder / 'gpu-0.lock'} (owner uid "
    )
    assert "mode 0444) is not writable by uid" in message
    assert f"chmod a+rw {folder}/gpu-*.lock" in message
    assert "export SD4MATCH_GPU_LOCK_DIR=/tmp/sd4match-gpu-locks-$(id -u)" in message


def test_unwritable_lock_folder_says_how_to_share_or_split(lock_dir: Path, shared_base: Path) -> None:
    folder = shared_base / "locks"
    folder.mkdir(mode=0o555)  # made by hand, not writable by the other user
    folder.chmod(0o555)
    outcome = _as_other_user(lambda: _lease_one(folder))
    message = outcome["error"]
    assert message.startswith(f"PermissionError: [Errno 13] GPU lock folder {folder} (owner uid ")
    assert "mode 0555) is not writable by uid" in message and "chmod 1777, like /tmp" in message
    assert "SD4MATCH_GPU_LOCK_DIR" in message


def test_default_lock_folder_must_be_this_users_own(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # the folder below then belongs to "another user"
    squatted = tmp_path / f"sd4match-gpu-locks-{me + 1}"
    squatted.mkdir()
    with pytest.raises(
        PermissionError,
        match=rf"{re.escape(str(squatted))} is not a folder owned by uid {me + 1} \(owner uid {me}\)",
    ):
        with allocate_gpus(1):
            pass
    monkeypatch.setattr(os, "getuid", lambda: me)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / f"sd4match-gpu-locks-{me}").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="is not a folder owned by uid"):
        with allocate_gpus(1):
            pass
