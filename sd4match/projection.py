"""Cost projection of the configured DAG: GPU FLOPs per job, H100-hours at a stated MFU, and the CPU work done
while a GPU is held.

The job list is the DAG's own: snakemake's API builds the DAG of the configuration with every job forced (what
``snakemake -n -F`` lists), with each job's wildcards and params. ``sd4match.workload.job_work`` says what
each GPU job computes; ``sd4match.flops.FlopMeter`` counts the FLOPs of each network call on the real
architectures (meta device); ``sd4match.workload.CpuCosts`` times the CPU work per item on this machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd4match.flops import FlopMeter
from sd4match.workload import (
    CodePaths,
    Context,
    CpuCosts,
    DagJob,
    DatasetCounts,
    JobWork,
    UnknownCounts,
    job_work,
)

H100_DENSE_BF16_FLOPS = 989e12  # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16/FP16 tensor cores
DEFAULT_MFU = 0.40
SECONDS_PER_HOUR = 3600.0


# --------------------------------------------------------------------------------------------- the DAG


def dag_jobs(
    configfiles: Sequence[str | os.PathLike[str]], workdir: str | os.PathLike[str] = "."
) -> tuple[dict[str, Any], list[DagJob]]:
    """The merged config and every job of the default target, as a forced dry run sees them.

    Uses snakemake's API (``SnakemakeApi`` -> workflow -> DAG with ``forceall``); nothing runs.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,
    )

    root = Path(workdir).resolve()
    configs = [Path(c) if Path(c).is_absolute() else root / c for c in configfiles]
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"projection: config file(s) {missing} do not exist")
    with chdir(root), SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=configs),
            snakefile=root / "Snakefile",
            workdir=root,
        )
        workflow_api.dag(DAGSettings(forceall=True))
        workflow = workflow_api._workflow  # the API offers no job listing: build the DAG as printd3dag does
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        jobs = [
            DagJob(
                rule=job.rule.name,
                wildcards=dict(job.wildcards_dict),
                params=dict(job.params.items()),
                gpu=int(job.resources.get("gpu", 0) or 0),
            )
            for job in workflow.dag.needrun_jobs()
        ]
        config = dict(workflow.config)
    return config, sorted(jobs, key=lambda j: (j.rule, j.label))


# --------------------------------------------------------------------------------------------- report


@dataclass
class JobCost:
    """One GPU job's projected cost."""

    job: DagJob
    work: JobWork


@dataclass
class Projection:
    """Per-job costs and the totals at a stated MFU of a stated peak."""

    jobs: list[JobCost]
    mfu: float
    peak_flops: float
    code: CodePaths
    count_sources: dict[str, str]
    unprojected: list[str] = field(default_factory=list)  # GPU jobs on splits that cannot be counted yet

    def gpu_hours(self, flops: float) -> float:
        """Hours of one GPU at ``mfu`` x ``peak_flops``."""
        return flops / (self.mfu * self.peak_flops) / SECONDS_PER_HOUR

    @property
    def total_flops(self) -> float:
        return sum(c.work.total_flops for c in self.jobs)

    @property
    def total_gpu_hours(self) -> float:
        return self.gpu_hours(self.total_flops)

    @property
    def total_cpu_hours(self) -> float:
        return sum(c.work.total_cpu_s for c in self.jobs) / SECONDS_PER_HOUR

    @property
    def cpu_fraction(self) -> float:
        """CPU time while a GPU is held, as a fraction of the GPU time."""
        return self.total_cpu_hours / self.total_gpu_hours if self.total_gpu_hours else math.inf

    def by_rule(self) -> dict[str, tuple[int, float, float]]:
        """Per rule: jobs, GPU hours, CPU hours while held."""
        out: dict[str, tuple[int, float, float]] = {}
        for cost in self.jobs:
            n, gpu, cpu = out.get(cost.job.rule, (0, 0.0, 0.0))
            out[cost.job.rule] = (
                n + 1,
                gpu + self.gpu_hours(cost.work.total_flops),
                cpu + cost.work.total_cpu_s / SECONDS_PER_HOUR,
            )
        return out


def project(
    config: dict[str, Any],
    jobs: Sequence[DagJob],
    counts: DatasetCounts,
    cpu: CpuCosts,
    code: CodePaths | None = None,
    meter: FlopMeter | None = None,
    mfu: float = DEFAULT_MFU,
    peak_flops: float = H100_DENSE_BF16_FLOPS,
) -> Projection:
    """The projection of every GPU job of ``jobs`` (jobs holding no GPU are not GPU time)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"projection: mfu must be in (0, 1], got {mfu}")
    code = CodePaths() if code is None else code
    ctx = Context(config, counts, meter or FlopMeter(), cpu, code)
    costs, unknown = [], []
    for job in jobs:
        if job.gpu <= 0:
            continue
        try:
            costs.append(JobCost(job, job_work(job, ctx)))
        except UnknownCounts:  # said in the output, never counted as zero
            unknown.append(job.label)
    return Projection(costs, mfu, peak_flops, code, dict(counts.sources), unknown)


def markdown(projection: Projection, per_job: bool = True) -> str:
    """Per-job (optional) and per-rule tables with the totals, H100-hours at the stated MFU."""
    p = projection
    lines = [
        f"GPU FLOPs counted on the real architectures (meta device); H100-hours at MFU {p.mfu:.0%} of "
        f"{p.peak_flops / 1e12:.0f} TFLOP/s (H100 SXM dense BF16). Code paths: {p.code}.",
        "",
    ]
    if per_job:
        lines += ["| job | GPU PFLOP | H100-h | CPU-h while held | passes |", "|---|---|---|---|---|"]
        for cost in p.jobs:
            passes = ", ".join(f"{k} {v:,}" for k, v in sorted(cost.work.passes.items()))
            lines.append(
                f"| {cost.job.label} | {cost.work.total_flops / 1e15:,.2f} | "
                f"{p.gpu_hours(cost.work.total_flops):.3f} | {cost.work.total_cpu_s / 3600:.3f} | {passes} |"
            )
        lines.append("")
    lines += ["| rule | jobs | H100-h | CPU-h while held |", "|---|---|---|---|"]
    for rule, (n, gpu, cpu) in sorted(p.by_rule().items()):
        lines.append(f"| {rule} | {n} | {gpu:.2f} | {cpu:.2f} |")
    lines += [
        f"| **total** | {len(p.jobs)} | **{p.total_gpu_hours:.2f}** | **{p.total_cpu_hours:.2f}** |",
        "",
        f"Total GPU work {p.total_flops / 1e18:.2f} EFLOP = {p.total_gpu_hours:.2f} H100-hours; CPU work "
        f"while a GPU is held {p.total_cpu_hours:.2f} h = {p.cpu_fraction:.1%} of the GPU time.",
    ]
    if p.unprojected:
        lines += [
            "",
            f"Not projected ({len(p.unprojected)} GPU jobs on splits with no pairs table yet and no "
            f"published counts; build their pairs tables and rerun): {', '.join(p.unprojected)}.",
        ]
    return "\n".join(lines)
