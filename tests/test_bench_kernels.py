"""The kernel-switch benchmark (issue 9) runs the combinations on the tiny model and measures each one's
feature deviation from the fp32 eager features; speed goes to BENCHMARKS.md, never into assertions."""

from __future__ import annotations

import json

from sd4match import bench_kernels
from sd4match.tiny_models import build_tiny_stable_diffusion


def test_bench_kernels_rows_cover_the_switches_and_measure_the_deviation(tmp_path, capsys):
    model = build_tiny_stable_diffusion(tmp_path / "sd21", seed=0)
    out = tmp_path / "kernels.jsonl"
    argv = ["--model", str(model), "--image-size", "64", "--batch", "2", "--repeats", "1"]
    argv += ["--precisions", "fp32", "--skip-compile", "--device", "cpu", "--out", str(out)]
    assert bench_kernels.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    switches = [(r["settings"]["compile"], r["settings"]["channels_last"]) for r in rows]
    assert switches == [(False, False), (False, True)]  # compile: tests/test_kernels.py (tracing is slow)
    deviations = [r["metrics"]["max_abs_dev_from_fp32"] for r in rows]
    assert deviations[0] == 0.0  # the fp32 eager configuration is the reference itself
    assert max(deviations) < 1e-4  # channels_last reorders fp32 sums only
    assert all(r["metrics"]["images_per_s"] > 0 and r["metrics"]["first_call_s"] > 0 for r in rows)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
