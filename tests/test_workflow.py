"""The Snakemake DAG: the paper DAG dry-runs with every job it must contain; every README command does what
its text says; profiles, resources, SLURM placement and rerun scoping by dry runs; the demo DAG runs once."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_probe import probe_workflow

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args], cwd=cwd, capture_output=True, text=True
    )


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table into {rule: count}."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def dry_run(*args: str, cwd: Path = REPO) -> dict[str, int]:
    result = snakemake("-n", "--quiet", "rules", *args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return job_counts(result.stdout + result.stderr)


@pytest.fixture
def empty_workdir(tmp_path: Path) -> Path:
    """A working directory with the configs but no results, so dry runs plan the whole DAG."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "profiles/demo").mkdir(parents=True)
    shutil.copy(REPO / "profiles/demo/world.yaml", tmp_path / "profiles/demo/world.yaml")
    return tmp_path


PAPER_JOBS = {
    "fetch_dataset": 3,
    "fetch_captioner": 1,
    "resolve_model": 5,  # SD 2-1, SD 1-5, DINOv2, DINO, CLIP ViT-L/14-336
    "pairs_table": 7,  # three test splits + SPair and PF-Pascal trn/val
    # Tables 2 and 3 show the authors' released prompts: the import is a checkpoint, so a dry run plans it and
    # their evaluations (evaluate_released_prompt) join the DAG once it has run
    "import_released_prompts": 1,
    # DIFT x3, DIFT-empty, DINO x3, DINOv2 x3, SD+DINO x3, SD+DINO* x3 (Table 1), DIFT at 10 t (Fig. 3b):
    # Fig. 3b's DIFT point at t=261 is the main DIFT SPair job (same method, prompt, ensemble, seed), reused;
    # issue 10: + DIFT by its own protocol x3 (dift_orig) + SD+DINO in the 768 frame x3 (sddino_squashed)
    "evaluate_zero_shot": 26 + 6,
    "latent_cache": 2,  # SPair, PF-Pascal (trn + val images)
    # VAE posteriors of the three test splits under SD 2-1: every SD4Match and DIFT evaluation reads them
    "test_latent_cache": 3,
    "dino_cache": 5,  # trn+val of the two training sets, test of the three test sets (CPM)
    "train_prompt": 10,  # SPair: Single, Class, CPM + 5 Fig. 3a cases; PF-Pascal: Single, CPM
    "evaluate_prompt": 18,  # 4 runs x 3 test sets + Class on SPair + 5 ablations on SPair
    # Fig. 3b grid of 11 t but t=50: that point is the main SPair-71k evaluation of spair/cpm
    # (evaluate_prompt: same prompt, seed, ensemble, matching), reused rather than run twice
    "evaluate_prompt_timestep": 10,
    "table_zero_shot_dift": 1,
    "table1": 1,
    "table2": 1,
    "table3": 1,
    "fig3a": 1,
    "fig3b": 1,
    "fig4": 1,
    "fig5": 1,
    "qualitative": 1,
    "all": 1,
}


def test_paper_dag_contains_every_job(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), cwd=empty_workdir)
    assert counts == PAPER_JOBS | {"total": sum(PAPER_JOBS.values())}


def test_demo_dag_adds_only_the_demo_world(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "--configfile", "config.yaml", "profiles/demo/world.yaml", cwd=empty_workdir
    )
    # the demo world adds its archives, five tiny models and the tiny captioner; it sweeps 2 timesteps
    # (50, 261: SD4Match's t=50 and DIFT's t=261 points are the main evaluations, so one job of each sweep
    # runs); it trains spair/single with a second seed (seeds_per_run), evaluated on the three test sets;
    # it packs its own release of the authors' prompts (demo_released_prompts) for Tables 2 and 3
    demo = PAPER_JOBS | {"evaluate_zero_shot": 32 - 9, "evaluate_prompt_timestep": 1}
    demo |= {"train_prompt": 10 + 1, "evaluate_prompt": 18 + 3}
    demo |= {"demo_datasets": 1, "tiny_model": 5, "tiny_captioner": 1, "demo_released_prompts": 1}
    # and its custom dataset `shapes` (issue 11): written, linked, parsed; DINO, DINOv2, DIFT and SD+DINO;
    # every tuned prompt but Class (spair/single x 2 seeds, spair/cpm, pfpascal/single, pfpascal/cpm), whose
    # CPM runs need its DINOv2 tokens; its table
    demo |= {"demo_custom_dataset": 1, "fetch_dataset": 3 + 1, "pairs_table": 7 + 1, "table_custom": 1}
    demo |= {"evaluate_zero_shot": 23 + 4, "evaluate_prompt": 21 + 5, "dino_cache": 5 + 1}
    demo |= {"test_latent_cache": 3 + 1}  # its VAE posteriors (DIFT and the tuned prompts read them)
    assert counts == demo | {"total": sum(demo.values())}


def test_one_target_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run(
        "-d", str(empty_workdir), "results/zero_shot/dift/pfwillow/summary.csv", cwd=empty_workdir
    )
    assert counts == {
        "fetch_dataset": 1,
        "resolve_model": 1,
        "pairs_table": 1,
        "test_latent_cache": 1,  # DIFT reads PF-Willow's test latents
        "evaluate_zero_shot": 1,
        "total": 5,
    }


def test_one_training_run_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run(
        "-d",
        str(empty_workdir),
        "results/sd4match/spair/single/seed0/pfwillow/summary.csv",
        cwd=empty_workdir,
    )
    assert counts == {
        "fetch_dataset": 2,
        "resolve_model": 1,
        "pairs_table": 3,
        "latent_cache": 1,
        "test_latent_cache": 1,  # the evaluation reads PF-Willow's test latents
        "train_prompt": 1,
        "evaluate_prompt": 1,
        "total": 10,
    }


def test_one_ablation_target_plans_only_its_jobs(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), "ablation_cpm_no_gn", cwd=empty_workdir)
    assert counts == {
        "fetch_dataset": 1,
        "resolve_model": 2,
        "pairs_table": 3,
        "latent_cache": 1,
        "test_latent_cache": 1,  # the evaluation reads SPair's test latents
        "dino_cache": 2,
        "train_prompt": 1,
        "evaluate_prompt": 1,
        "ablation_cpm_no_gn": 1,
        "total": 13,
    }


def test_seeds_multiply_training_runs_and_their_evaluations(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), "--config", "seeds=[0, 1, 2]", cwd=empty_workdir)
    # every training run, its evaluations and the Fig. 3b sweep (10 t, t=50 reused) three times; zero-shot and
    # figures once
    tripled = {"train_prompt": 30, "evaluate_prompt": 54, "evaluate_prompt_timestep": 30}
    assert counts == PAPER_JOBS | tripled | {"total": sum((PAPER_JOBS | tripled).values())}


def test_one_seed_of_one_run_is_its_own_target(empty_workdir: Path):
    target = "results/sd4match/spair/single/seed7/pfwillow/summary.csv"  # any seed, configured or not
    counts = dry_run("-d", str(empty_workdir), target, cwd=empty_workdir)
    assert counts["train_prompt"] == 1 and counts["evaluate_prompt"] == 1
    ablation = dry_run(
        "-d",
        str(empty_workdir),
        "ablation_cpm_no_gn",
        "--config",
        "seeds_per_run={spair/cpm_no_gn: [3, 4]}",
        cwd=empty_workdir,
    )
    assert (ablation["train_prompt"], ablation["evaluate_prompt"]) == (2, 2)
    result = snakemake(
        "-n", "-d", str(empty_workdir), "--config", "seeds_per_run={spair/cpm_typo: [1]}", cwd=empty_workdir
    )
    assert result.returncode != 0
    assert "key 'seeds_per_run.spair/cpm_typo' names variant 'cpm_typo'" in result.stdout + result.stderr
    for bad in ("seeds=[]", "seeds=[0, 0]", "seeds=[-1]"):
        result = snakemake("-n", "-d", str(empty_workdir), "--config", bad, cwd=empty_workdir)
        assert result.returncode != 0 and "key 'seeds" in result.stdout + result.stderr, bad


def test_fig3b_reuses_the_main_evaluations(empty_workdir: Path):
    """Fig. 3b's SD4Match t=50 point is the main spair/cpm SPair evaluation and its DIFT t=261 point the main
    DIFT SPair evaluation: the figure reads those files, and no sweep job recomputes them."""
    result = snakemake("-n", "-d", str(empty_workdir), "fig3b", cwd=empty_workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    planned = result.stdout + result.stderr
    assert "results/sd4match/spair/cpm/seed0/spair/summary.csv" in planned
    assert "results/zero_shot/dift/spair/summary.csv" in planned
    assert "results/timesteps/spair/cpm/seed0/spair_t100/summary.csv" in planned
    assert "results/zero_shot/dift_t100/spair/summary.csv" in planned
    for duplicate in ("spair_t50/", "dift_t261/"):
        assert duplicate not in planned, duplicate
    counts = job_counts(planned)
    assert counts["evaluate_prompt_timestep"] == 10 and counts["evaluate_zero_shot"] == 11
    assert counts["evaluate_prompt"] == 1  # the main spair/cpm SPair evaluation


def params_block(rule: str, text: str) -> list[str]:
    """The lines of a rule's params: block in a .smk file."""
    body = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
    params = body.split("    params:\n", 1)[1].split("    script:", 1)[0]
    return [line.strip() for line in params.splitlines() if line.strip()]


def test_timestep_evaluation_differs_from_the_main_one_only_in_its_timestep():
    """What makes reusing the main evaluation for Fig. 3b's t=50 point exact: the two rules run the same
    script on the same inputs with the same params but the evaluation timestep."""
    text = (REPO / "rules/sd4match.smk").read_text()
    main, sweep = params_block("evaluate_prompt", text), params_block("evaluate_prompt_timestep", text)
    assert 'evaluation=lambda wc: SD4["evaluation"] | {"timestep": int(wc.t)},' in sweep
    assert [line for line in sweep if not line.startswith("evaluation=")] == [
        line for line in main if not line.startswith("evaluation=")
    ]
    assert 'evaluation=SD4["evaluation"],' in main
    for rule in ("evaluate_prompt", "evaluate_prompt_timestep"):
        body = text.split(f"rule {rule}:", 1)[1]
        assert body.split("input:", 1)[1].split("output:", 1)[0].strip() == "unpack(evaluate_prompt_inputs),"
        assert '"../workflow_scripts/evaluate_prompt.py"' in body.split("\nrule ", 1)[0]


def test_a_custom_dataset_joins_every_evaluation(empty_workdir: Path):
    """A user's folder + pairs.csv configured as `datasets.mine`: fetched (linked), parsed, evaluated by the
    default zero-shot baselines and every tuned prompt but Class, in its own table and in `all`."""
    folder = empty_workdir / "my_data"
    folder.mkdir()
    (folder / "pairs.csv").write_text("source,target,source_kps,target_kps\n")
    entry = {"kind": "custom", "local_path": str(folder), "threshold": "img"}
    (empty_workdir / "mine.yaml").write_text(yaml.safe_dump({"datasets": {"mine": entry}}))
    configs = ("--configfile", "config.yaml", "mine.yaml")
    counts = dry_run("-d", str(empty_workdir), "results/tables/custom_mine.md", *configs, cwd=empty_workdir)
    assert counts == {
        "fetch_dataset": 3,  # mine, and SPair / PF-Pascal for training
        "resolve_model": 5,
        "pairs_table": 5,  # mine test, SPair and PF-Pascal trn/val
        "evaluate_zero_shot": 4,  # dino, dinov2, dift, sddino_squashed
        "latent_cache": 2,
        "test_latent_cache": 1,  # mine's VAE posteriors (DIFT and the tuned prompts read them)
        "dino_cache": 3,  # mine test (CPM), SPair and PF-Pascal trn+val
        "train_prompt": 4,  # spair single/cpm, pfpascal single/cpm
        "evaluate_prompt": 4,
        "fetch_captioner": 1,
        "table_custom": 1,
        "total": 33,
    }
    full = dry_run("-d", str(empty_workdir), *configs, cwd=empty_workdir)
    assert full["table_custom"] == 1 and full["evaluate_zero_shot"] == PAPER_JOBS["evaluate_zero_shot"] + 4
    entry["zero_shot"] = ["dift"]
    (empty_workdir / "mine.yaml").write_text(yaml.safe_dump({"datasets": {"mine": entry}}))
    counts = dry_run("-d", str(empty_workdir), "custom_tables", *configs, cwd=empty_workdir)
    assert counts["evaluate_zero_shot"] == 1 and counts["custom_tables"] == 1


def test_named_table_target_plans_no_training(empty_workdir: Path):
    counts = dry_run("-d", str(empty_workdir), "table1", cwd=empty_workdir)
    assert counts["table1"] == 1 and counts["evaluate_zero_shot"] == 5 and "train_prompt" not in counts


def test_bad_config_value_stops_before_any_job(empty_workdir: Path):
    result = snakemake("-n", "-d", str(empty_workdir), "--config", "image_size=770", cwd=empty_workdir)
    assert result.returncode != 0
    assert "key 'image_size'" in result.stdout + result.stderr


def test_slurm_profile_names_only_existing_rules():
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    listed = snakemake("--list-rules", cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    rules = set(listed.stdout.split())
    assert profile["executor"] == "slurm"
    assert set(profile["set-resources"]) <= rules
    assert set(profile.get("set-threads", {})) <= rules


# --------------------------------------------------------------------------------- dry-run output, parsed


def planned_jobs(output: str) -> list[dict]:
    """The jobs of a (non-quiet) dry run: rule, output, log, benchmark, threads and resources of each."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \S+:\n)", output):
        header = re.match(r"(?:local)?(?:rule|checkpoint) (\S+):\n", block)
        if not header:
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        resources = dict(
            item.split("=", 1) for item in fields.get("resources", "").split(", ") if "=" in item
        )
        jobs.append(
            {
                "rule": header.group(1),
                "output": fields["output"].split(", ") if "output" in fields else [],
                "log": fields.get("log"),
                "benchmark": fields.get("benchmark"),
                "threads": int(fields.get("threads", 1)),
                "resources": resources,
            }
        )
    return jobs


def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``snakemake <args>`` in ``cwd`` exactly as a user types it there (Snakefile found in ``cwd``)."""
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


WORKFLOW_FILES = ("Snakefile", "config.yaml", "rules", "workflow_scripts", "report", "envs", "profiles")


def copy_workflow(project: Path) -> Path:
    """Copy the workflow (no results) to ``project``: commands run there as in a fresh checkout."""
    project.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        else:
            shutil.copy(source, project / name)
    return project


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path / "project")


# ------------------------------------------------------------------------------------ the README's commands


def readme_snakemake_commands() -> list[list[str]]:
    """Every `snakemake ...` line of the README's bash code blocks, as words (comments dropped)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "snakemake":
                commands.append(words)
    return commands


README_COMMANDS = readme_snakemake_commands()
SLURM_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None


@functools.cache
def target_rules() -> set[str]:
    """The workflow's target rules (`snakemake --list-target-rules`)."""
    listed = run_in(REPO, "--list-target-rules")
    assert listed.returncode == 0, listed.stderr
    return set(listed.stdout.split())


def intended_targets(words: list[str], target_rules: set[str]) -> list[str]:
    """The words a reader takes for targets: target rule names and output paths (not an option's file)."""
    single_value_options = {"--report", "-d", "--directory", "-s", "--snakefile", "--cores", "-c", "-j"}
    return [
        word
        for before, word in zip(words, words[1:], strict=False)
        if before not in single_value_options
        and (word in target_rules or word.startswith(("results/", "resources/")))
    ]


def readme_command(*words: str) -> list[str]:
    """The README command that contains all ``words`` (exactly one must)."""
    found = [command for command in README_COMMANDS if all(word in command for word in words)]
    assert len(found) == 1, (words, found)
    return found[0]


def test_ci_runs_the_readme_test_command():
    text = (REPO / "README.md").read_text()
    tests = [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("python -m pytest")]
    assert tests == ["python -m pytest -q"]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert tests[0] in ci_lines
    assert not any(
        line.startswith("snakemake --profile profiles/demo") for line in ci_lines
    )  # demo runs once


def test_readme_has_the_commands_it_documents():
    joined = [" ".join(words) for words in README_COMMANDS]
    assert "snakemake --profile profiles/demo" in joined
    assert "snakemake --cores all --resources gpu=3" in joined
    assert any("--forcerun" in c for c in joined) and any("--sdm conda" in c for c in joined)
    assert any("--report" in c for c in joined) and any("refresh_model_lock" in c for c in joined)


def config_options(words: list[str]) -> list[str]:
    """``--config``/``--configfile`` options of a command with their values: they change the plan."""
    out: list[str] = []
    taking = False
    for word in words[1:]:
        if word.startswith("-"):
            taking = word in ("--config", "--configfile", "--configfiles")
            if taking:
                out.append(word)
        elif taking:
            out.append(word)
    return out


@pytest.mark.parametrize("words", README_COMMANDS, ids=[" ".join(w[1:]) for w in README_COMMANDS])
def test_readme_command_does_what_its_text_says(
    words: list[str], project_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    """No option swallows a target, and the dry run plans exactly the jobs of the targets it names."""
    if "profiles/slurm" in words and not SLURM_PLUGIN:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (it is in the dev extra)")
    targets = intended_targets(words, target_rules())
    from snakemake.cli import parse_args

    monkeypatch.chdir(project_copy)
    _, args = parse_args(words[1:])
    assert list(args.targets) == targets, f"an option swallowed a target: {' '.join(words)}"
    if "--report" in words:
        return  # needs a finished run: the demo's report command runs in the slow demo test
    if "conda" in words and shutil.which("conda") is None:
        return  # parsed above; a dry run with --sdm conda needs the conda binary
    result = run_in(project_copy, *words[1:], "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    profile = [w for pair in zip(words, words[1:], strict=False) if pair[0] == "--profile" for w in pair]
    reference = run_in(project_copy, *targets, *profile, *config_options(words), "-n", "--quiet", "rules")
    assert counts == job_counts(reference.stdout + reference.stderr)
    for target in targets:
        assert "all" not in counts and (target in counts or "/" in target), (target, counts)


# --------------------------------------------------------------------------------------------- profiles


def test_demo_profile_settings_are_what_runs(project_copy: Path, monkeypatch: pytest.MonkeyPatch):
    """No auto-loaded workflow profile overrides --profile profiles/demo (it would win key by key)."""
    assert not (REPO / "profiles" / "default").exists()
    target = "results/demo/zero_shot/dift/spair/summary.csv"
    demo = run_in(project_copy, target, "-n", "--profile", "profiles/demo")
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out[-3000:]
    assert "Using profile profiles/demo for setting default command line arguments." in out
    assert "workflow specific profile" not in out
    jobs = planned_jobs(out)
    assert jobs and all(job["threads"] == 1 for job in jobs)  # max-threads: 1 of the demo profile
    plain = run_in(project_copy, target, "-n", "--cores", "8", "--configfile", *DEMO_CONFIGS)
    threads = {job["rule"]: job["threads"] for job in planned_jobs(plain.stdout + plain.stderr)}
    assert threads["evaluate_zero_shot"] == 4  # what the rule declares
    from snakemake.cli import parse_args

    monkeypatch.chdir(project_copy)
    _, args = parse_args(["--profile", "profiles/demo"])
    assert (args.cores, args.max_threads, str(args.resources["gpu"].value)) == (2, 1, "2")


DEMO_CONFIGS = ("config.yaml", "profiles/demo/world.yaml")
MODEL_NAMES = {"sd21", "sd15", "dinov2", "dino", "clip_vision"}
GPU_RULES = {
    "latent_cache", "test_latent_cache", "dino_cache", "train_prompt", "evaluate_prompt",
    "evaluate_prompt_timestep", "evaluate_zero_shot", "fig4", "fig5", "qualitative",
    "evaluate_released_prompt",
}  # fmt: skip
LOCAL_RULES = {
    "all", "tables", "figures", "demo_datasets", "tiny_model", "tiny_captioner", "fetch_dataset",
    "fetch_captioner", "resolve_model", "refresh_model_lock", "table_zero_shot_dift", "table1", "table2",
    "table3", "fig3a", "fig3b", "demo_custom_dataset", "table_custom", "custom_tables",
    "import_released_prompts", "demo_released_prompts", "released_table", "released_prompts",
    "released_tables",
    *(f"ablation_cpm_{case}" for case in (
        "pair_local", "pair_global", "individual_local", "individual_global", "no_global", "no_gn")),
}  # fmt: skip


def test_every_rule_declares_threads_memory_runtime_and_placement(empty_workdir: Path):
    data = probe_workflow(empty_workdir, "config.yaml")
    rules = data["rules"]
    for name, rule in rules.items():
        if rule["script"]:
            assert {"mem_mb", "runtime"} <= set(rule["resources"]), name
            assert rule["resources"]["mem_mb"] >= 1000 and rule["resources"]["runtime"] >= 10, name
        else:
            assert name in LOCAL_RULES, f"{name}: a rule without a script is a named target, run locally"
    assert {name for name, rule in rules.items() if "gpu" in rule["resources"]} == GPU_RULES
    assert all(rules[name]["threads"] >= 4 for name in GPU_RULES)
    assert rules["train_prompt"]["threads"] == 8 and rules["train_prompt"]["resources"]["runtime"] == 2880
    assert set(data["localrules"]) == LOCAL_RULES and not GPU_RULES & LOCAL_RULES


@pytest.mark.skipif(not SLURM_PLUGIN, reason="snakemake-executor-plugin-slurm is not installed (dev extra)")
def test_slurm_profile_places_gpu_cpu_and_local_rules(project_copy: Path):
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    account = profile["default-resources"]["slurm_account"]
    cpu, gpu = (
        profile["default-resources"]["slurm_partition"],
        profile["set-resources"]["train_prompt"]["slurm_partition"],
    )
    assert cpu != gpu and account
    assert {
        name for name, res in profile["set-resources"].items() if res.get("slurm_partition") == gpu
    } == GPU_RULES
    # a dry run caps threads at --cores (1 unless given); the SLURM executor itself does not cap them
    result = run_in(project_copy, "-n", "--profile", "profiles/slurm", "--cores", "64")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    jobs = planned_jobs(out)
    # released-prompt evaluations are planned after the import checkpoint has run, not in a dry run
    planned = GPU_RULES - {"evaluate_released_prompt"}
    assert {job["rule"] for job in jobs} >= planned | {"pairs_table", "fetch_dataset", "table2"}
    for job in jobs:
        res, rule = job["resources"], job["rule"]
        if rule in LOCAL_RULES:
            continue  # runs on the submit host: partition and account are not used
        assert res["slurm_account"] == account, rule
        if rule in GPU_RULES:
            assert res["slurm_partition"] == gpu and int(res["gpu"]) == 1, rule
        else:
            assert res["slurm_partition"] == cpu and int(res["gpu"]) == 0, rule
        assert int(res["mem_mb"]) >= 1000 and int(res["runtime"]) >= 10, rule
    train = next(job for job in jobs if job["rule"] == "train_prompt")
    assert train["threads"] == 8 and train["resources"]["runtime"] == "2880"


# ---------------------------------------------------------------------------------- logs and rerun scope


def test_demo_and_paper_runs_never_share_a_log_or_benchmark(empty_workdir: Path):
    def files(*configs: str) -> set[str]:
        extra = ("--configfile", *configs) if configs else ()
        result = snakemake("-n", "-d", str(empty_workdir), *extra, cwd=empty_workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        jobs = planned_jobs(result.stdout + result.stderr)
        return {path for job in jobs for path in (job["log"], job["benchmark"]) if path}

    paper, demo = files(), files(*DEMO_CONFIGS)
    assert paper and demo and not paper & demo
    assert all(p.startswith(("logs/paper/", "benchmarks/paper/")) for p in paper)
    assert all(p.startswith(("logs/demo/", "benchmarks/demo/")) for p in demo)


def _touch_planned_outputs(workdir: Path) -> None:
    """Create every output of the jobs a dry run of the demo DAG plans; the released-prompt import
    checkpoint's outputs are those of a finished import of the demo release, so its evaluations get planned
    next."""
    from sd4match.released_demo import PAPER_RELEASE

    plan = snakemake("-n", "-d", str(workdir), "--configfile", *DEMO_CONFIGS, cwd=workdir)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan.stdout + plan.stderr)
    # the import last: its outputs newer than its input (the demo release), so the next plan evaluates it
    for job in sorted(jobs, key=lambda job: job["rule"] == "import_released_prompts"):
        if job["rule"] == "import_released_prompts":
            prompts, report = (workdir / output for output in job["output"])
            for trainset, variant in PAPER_RELEASE:
                (prompts / trainset / variant).mkdir(parents=True, exist_ok=True)
                (prompts / trainset / variant / "prompt.safetensors").touch()
            imported = [{"trainset": t, "variant": v} for t, v in PAPER_RELEASE]
            report.write_text(json.dumps({"imported": imported}))
            continue
        for output in job["output"]:
            path = workdir / output
            if job["rule"] == "tiny_model":
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()


def _finished_demo_workdir(workdir: Path) -> None:
    """Make every output of the demo DAG exist and record its job metadata (params) with --touch."""
    _touch_planned_outputs(workdir)
    _touch_planned_outputs(workdir)  # the released prompts' evaluations, planned after the import
    # --forceall: touch every output in DAG order and record each job's params, as a finished run does
    configs = ("--configfile", *DEMO_CONFIGS)
    touched = snakemake("--touch", "--forceall", "--cores", "1", "-d", str(workdir), *configs, cwd=workdir)
    assert touched.returncode == 0, touched.stderr[-3000:]
    again = snakemake("-n", "-d", str(workdir), "--configfile", *DEMO_CONFIGS, cwd=workdir)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]


def _edit_demo_world(workdir: Path, edit) -> None:  # noqa: ANN001
    path = workdir / "profiles/demo/world.yaml"
    world = yaml.safe_load(path.read_text())
    edit(world)
    path.write_text(yaml.safe_dump(world))


def test_editing_a_setting_reruns_only_what_it_changes(empty_workdir: Path):
    """Default rerun triggers (mtime, params, input, code, software-env) on a finished demo workdir."""
    _finished_demo_workdir(empty_workdir)
    _edit_demo_world(empty_workdir, lambda w: w["figures"]["generation"].update(steps=3))
    _edit_demo_world(empty_workdir, lambda w: w["figures"].update(qualitative_pairs=1))
    counts = dry_run("-d", str(empty_workdir), "--configfile", *DEMO_CONFIGS, cwd=empty_workdir)
    planned = {rule for rule in counts if rule not in ("total", "all")}
    assert planned == {"fig4", "fig5", "qualitative"}, counts
    _edit_demo_world(empty_workdir, lambda w: w.update(matching={"reported": "soft_argmax"}))
    counts = dry_run("-d", str(empty_workdir), "--configfile", *DEMO_CONFIGS, cwd=empty_workdir)
    planned = {rule for rule in counts if rule not in ("total", "all")}
    # the reported matching picks table columns: tables and plots rerun, no evaluation and no training
    assert planned == {"fig4", "fig5", "qualitative", "table2", "table3", "fig3a", "fig3b", "table_custom"}, (
        counts
    )


# ------------------------------------------------------------------------ the demo DAG, run once (slow)


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's demo command, then its demo report command, in a fresh copy of the workflow."""
    project = copy_workflow(tmp_path_factory.mktemp("demo") / "project")
    demo = ["snakemake", "--profile", "profiles/demo"]
    assert demo in README_COMMANDS
    result = run_in(project, *demo[1:])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    report = readme_command("--report", "profiles/demo")
    result = run_in(project, *report[1:])
    assert result.returncode == 0, result.stderr[-5000:]
    return project


@pytest.mark.slow
def test_demo_dag_runs_end_to_end(demo_project: Path):
    """The whole demo DAG through the rules a GPU user runs: archives, fetch, parse, models, every table."""
    out = demo_project / "results/demo"
    for table_name in ("zero_shot_dift", "table1", "table2", "table3", "fig3a", "fig3b"):
        assert "DEMO RUN" in (out / f"tables/{table_name}.md").read_text()
        page = (out / f"tables/{table_name}.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "DEMO RUN" in page and '<tr class="' in page
    for figure in ("fig3a", "fig3b", "fig4", "fig5", "qualitative"):
        assert (out / f"figures/{figure}.png").stat().st_size > 0
        assert (out / f"figures/{figure}.pdf").stat().st_size > 0
        caption = (out / f"report/{figure}.rst").read_text()
        assert caption.startswith("**DEMO RUN**") and "Models: " in caption and "Protocol: " in caption
    table2 = pd.read_csv(out / "tables/table2.csv")
    assert {"ours", "paper", "delta", "quoted"} <= set(table2["source"])
    ours = table2[table2["source"] == "ours"]
    # issue 10: DIFT and SD+DINO by their own protocols beside the paper's numbers, then in the 768 frame
    assert list(ours["method"]) == ["DINO", "DINOv2", "DIFT", "SD+DINO", "DIFT", "SD+DINO", "SD4Match-Single",
                                    "SD4Match-Class", "SD4Match-CPM"]  # fmt: skip
    assert list(ours["protocol"]) == [
        "squashed frame", "squashed frame", "original frame (DIFT's eval)", "padded 112×112 (sd-dino's eval)",
        *["squashed frame"] * 5,
    ]  # fmt: skip
    # a delta for each zero-shot peer by its own protocol, each SD4Match variant and each released prompt
    # (released - paper); the 768 rows get none
    assert (table2["source"] == "delta").sum() == 4 + 3 + 3
    assert not table2["method"].str.contains(r"\((?:nn|kernel_softmax|soft_argmax)\)").any()
    # issue 12: every number with its interval, the two seeds of spair/single, the authors' released prompts
    assert ours["All_lo"].notna().all() and (ours["All_lo"] <= ours["All"] + 1e-9).all()
    assert (ours["All"] <= ours["All_hi"] + 1e-9).all()
    seeds = table2[table2["source"] == "seeds"]
    assert list(seeds["method"]) == ["SD4Match-Single"] and list(seeds["n_seeds"]) == [2]
    released = table2[table2["source"] == "released"]
    assert list(released["method"]) == [f"{kind} (authors' released prompt)" for kind in
                                        ("SD4Match-Single", "SD4Match-Class", "SD4Match-CPM")]  # fmt: skip
    assert released["All_lo"].notna().all()
    markdown = (out / "tables/table2.md").read_text()
    assert re.search(
        r"\| SD4Match-Single \| kernel_softmax \| seeds \| .* ± \d+\.\d \(2 seeds\) \|$", markdown, re.M
    )
    assert re.search(r"\| ours \| per image \| .*\d \[\d+\.\d, \d+\.\d\]", markdown)
    assert re.search(r"\| delta \| per image \| .* [✓✗] \|$", markdown, re.M)
    assert "Pairs: SPair-71k test " in markdown and "Intervals: 95% percentile bootstrap" in markdown
    assert "Pairs: SPair-71k test " in (out / "report/table2.rst").read_text()
    paired = pd.read_csv(out / "tables/paired.csv")
    assert list(paired["method"])[:2] == [
        "SD4Match-Class − SD4Match-Single",
        "SD4Match-CPM − SD4Match-Single",
    ]
    assert paired["All_lo"].le(paired["All"] + 1e-9).all() and paired["All"].le(paired["All_hi"] + 1e-9).all()
    fig3a = pd.read_csv(out / "tables/fig3a.csv")
    assert fig3a["vs_case_1"].notna().sum() >= 1 and fig3a["ours_lo"].notna().sum() >= 2
    table3 = pd.read_csv(out / "tables/table3.csv")
    assert {"seeds", "released"} <= set(table3["source"])
    tuned = table3[(table3["source"] == "ours") & (table3["group"] == "K")]
    assert sorted(zip(tuned["method"], tuned["trained_on"], strict=True)) == [
        ("SD4Match-CPM", "PF-Pascal"), ("SD4Match-CPM", "SPair-71k"),
        ("SD4Match-Single", "PF-Pascal"), ("SD4Match-Single", "SPair-71k"),
    ]  # fmt: skip
    table = pd.read_csv(out / "tables/zero_shot_dift.csv")
    assert set(table["source"]) == {"ours", "paper", "delta"}
    for dataset in ("spair", "pfpascal", "pfwillow"):
        pairs = pd.read_parquet(out / f"pairs/{dataset}_test.parquet")
        per_pair = pd.read_csv(out / f"zero_shot/dift/{dataset}/per_pair.csv")  # DIFT, 3 methods x 3 alphas
        # every pair scored once per matching method and alpha
        assert len(per_pair) == len(pairs) * 3 * 3
        assert per_pair["pck"].between(0, 100).all()
    # the peers' own protocols record their nearest-neighbour points in the original target frame too
    pairs = pd.read_parquet(out / "pairs/spair_test.parquet")
    for peer in ("dift_orig", "sddino"):
        predictions = pd.read_parquet(out / f"zero_shot/{peer}/spair/predictions.parquet")
        assert len(predictions) == pairs["n_kps"].sum() and set(predictions["method"]) == {"nn"}, peer
    dift_points = pd.read_parquet(out / "zero_shot/dift_orig/spair/predictions.parquet")
    assert (dift_points[["pred_x", "pred_y"]] == dift_points[["pred_x", "pred_y"]].round()).all().all()
    # two seeds of spair/single (seeds_per_run): two prompts, a spread, and intervals around summary.csv
    from sd4match.uncertainty import intervals_from_file, seed_spread_from_files

    run = out / "sd4match/spair/single"
    prompts = [(out / f"prompts/spair/single/seed{k}/prompt.safetensors").read_bytes() for k in (0, 1)]
    assert prompts[0] != prompts[1]
    spread = seed_spread_from_files({k: run / f"seed{k}/spair/summary.csv" for k in (0, 1)})
    assert (spread["n_seeds"] == 2).all() and spread["pck_per_image_std"].notna().all()
    intervals = intervals_from_file(run / "seed0/spair/per_pair.csv")
    summary = pd.read_csv(run / "seed0/spair/summary.csv")
    assert intervals["category"].tolist() == summary["category"].tolist()
    for kind in ("pck_per_image", "pck_per_keypoint"):
        assert intervals[kind].to_numpy() == pytest.approx(summary[kind].to_numpy(), abs=1e-9)
        assert (intervals[f"{kind}_lo"] <= intervals[kind] + 1e-9).all()
        assert (intervals[kind] <= intervals[f"{kind}_hi"] + 1e-9).all()
    for log in (
        "world/demo_datasets.log",
        "data/fetch_spair.log",
        "zero_shot/dift_spair.log",
        "train/spair_cpm_seed0.log",
        "train/spair_single_seed1.log",
    ):
        assert (demo_project / "logs/demo" / log).exists(), log
    assert (demo_project / "benchmarks/demo/train/spair_cpm_seed0.tsv").exists()
    assert not (demo_project / "logs/paper").exists() and not (demo_project / "benchmarks/paper").exists()
    records = [r for r in (demo_project / "resources/demo/models").glob("*.json") if r.stem in MODEL_NAMES]
    assert records and all(not str(json_field(r, "local_path")).startswith("/") for r in records)


@pytest.mark.slow
def test_demo_release_is_fetched_imported_evaluated_and_tabled(demo_project: Path):
    """The demo `all` packs its release zip, imports it and evaluates the 13 released prompts (Tables 2-3);
    `released_tables` then only writes its two tables (it never trains: test_released_prompts' dry run)."""
    from sd4match.released_demo import PAPER_RELEASE

    result = run_in(demo_project, "released_tables", "--profile", "profiles/demo")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    out = demo_project / "results/demo"
    report = json.loads((out / "released/import_report.json").read_text())
    assert sorted((e["trainset"], e["variant"]) for e in report["imported"]) == sorted(PAPER_RELEASE)
    assert report["missing"] == ["Class_pfpascal_sd2-1_TokenEmbeds75"]
    assert len(list((out / "released").glob("*/*/*/summary.csv"))) == 13
    table3 = pd.read_csv(out / "tables/released_table3.csv")
    assert (table3["source"] == "ours").sum() == 4 and (table3["source"] == "paper").sum() == 4
    assert "DEMO RUN" in (out / "tables/released_table2.md").read_text()


@pytest.mark.slow
def test_demo_custom_dataset_table_and_readme_match_command(demo_project: Path):
    """The demo's custom dataset went through the DAG, and the README's `sd4match match` command runs as
    written after the demo (its picture and its JSON on stdout)."""
    from test_match import readme_match_commands

    out = demo_project / "results/demo"
    table = pd.read_csv(out / "tables/custom_shapes.csv")
    rows = set(zip(table["method"], table["trained_on"], table["seed"].astype(str), strict=True))
    assert rows == {
        ("DINO", "-", "-"), ("DINOv2", "-", "-"), ("DIFT", "-", "-"), ("SD+DINO", "-", "-"),
        ("SD4Match-Single", "SPair-71k", "0"), ("SD4Match-Single", "SPair-71k", "1"),
        ("SD4Match-CPM", "SPair-71k", "0"), ("SD4Match-Single", "PF-Pascal", "0"),
        ("SD4Match-CPM", "PF-Pascal", "0"),
    }  # fmt: skip
    assert len(table) == 9 and list(table["method"])[:4] == ["DINO", "DINOv2", "DIFT", "SD+DINO"]
    markdown = (out / "tables/custom_shapes.md").read_text()
    assert "DEMO RUN" in markdown and "Intervals: 95% percentile bootstrap over image pairs" in markdown
    for column in ("PCK@0.1 per image", "PCK@0.1 per keypoint"):
        lo, hi = table[f"{column}_lo"], table[f"{column}_hi"]
        assert ((lo <= table[column]) & (table[column] <= hi)).all()
    pairs = pd.read_parquet(out / "pairs/shapes_test.parquet")
    predictions = pd.read_parquet(out / "sd4match/spair/cpm/seed0/shapes/predictions.parquet")
    assert len(predictions) == 3 * pairs["n_kps"].sum()
    command = next(words for words in readme_match_commands() if "--demo" in words)
    script = Path(sys.executable).parent / "sd4match"
    runner = [str(script)] if script.exists() else [sys.executable, "-m", "sd4match.match_cli"]
    result = subprocess.run([*runner, *command[1:]], cwd=demo_project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert len(data["matches"]) == 16 and data["settings"]["demo"] is True
    assert (demo_project / "match.png").read_bytes()[:4] == b"\x89PNG"


def json_field(path: Path, key: str):  # noqa: ANN201
    import json

    return json.loads(path.read_text())[key]


# a cell's number: bold or not, before its interval (<span class="ci">) when it has one
CELL_NUMBER = r"<td[^>]*>(?:<strong>)?([^<]*?)(?:</strong>)?(?: <span|</td>)"


def _table2_numbers(project: Path) -> list[str]:
    from render_report import expected_numbers

    return expected_numbers(project / "results/demo/tables/table2.csv")


def front_page_tables(report: str) -> dict[str, str]:
    """The tables on the report's front page (the workflow description), by title."""
    import json

    literal = re.search(r'var workflow_desc = ("(?:[^"\\]|\\.)*");', report)
    assert literal, "no workflow description in the report"
    front = json.loads(literal.group(1))
    tables = {}
    for part in front.split('<div class="sd4match-table">')[1:]:
        title = re.search(r"<h2>(.*?)</h2>", part).group(1)
        tables[title] = part
    return tables


@pytest.mark.slow
def test_demo_report_holds_every_table_and_figure(demo_project: Path):
    """The report file itself (no browser): Table 2's numbers on its front page and in its Table 2 result."""
    import base64

    report = (demo_project / "results/demo/report.html").read_text()
    numbers = _table2_numbers(demo_project)
    assert len(numbers) > 100
    front = front_page_tables(report)
    assert list(front)[:5] == [
        "Table 1 — prompt types, SPair-71k PCK@0.1 (nn)", "Table 2 — SPair-71k PCK@0.1 per category",
        "Table 2 — paired differences on SPair-71k, PCK@0.1 per category",
        "Table 3 — generalisation, PCK per image", "Zero-shot DIFT (nn matching) — paper Table 3 layout",
    ]  # fmt: skip
    cells = re.findall(CELL_NUMBER, front[list(front)[1]])
    missing = [n for n in numbers if n not in cells]
    assert not missing, missing[:20]
    pages = {}
    for name, payload in re.findall(r"filename=([\w.]+);base64,([A-Za-z0-9+/=]+)", report):
        pages[name] = base64.b64decode(payload).decode("utf-8", errors="replace")
    for name in ("table1", "table2", "table3", "zero_shot_dift", "fig3a", "fig3b"):
        assert f"{name}.html" in pages, sorted(pages)
    for name in ("fig3a", "fig3b", "fig4", "fig5", "qualitative"):
        assert f"{name}.png" in pages and f"{name}.pdf" in pages, sorted(pages)
    table2_cells = re.findall(CELL_NUMBER, pages["table2.html"])
    assert not [n for n in numbers if n not in table2_cells]
    assert '<span class="ci">[' in pages["table2.html"] and "paired.html" in pages
    for label in ('"Tables"', '"Ablations"', '"Figures"', "Table 2: SPair-71k per category", "table (HTML)"):
        assert label in report, label


@pytest.mark.slow
def test_demo_report_shows_table2_in_a_browser(demo_project: Path):
    import render_report

    browser = render_report.chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    report = demo_project / "results/demo/report.html"
    table = demo_project / "results/demo/tables/table2.csv"
    assert render_report.missing_numbers(report, table, browser) == []


# ---------------------------------------------------------------------------------------------- model lock


def _hub_cache_with(cache: Path, repo_id: str, source: Path, commit: str) -> None:
    """A Hugging Face cache holding ``source`` as ``repo_id`` at ``commit``, with `main` pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_first_resolution_locks_and_refresh_moves_only_what_changed(tmp_path: Path, monkeypatch):
    """The rules, offline on a hub cache: resolve_model writes the lock, refresh_model_lock moves it."""
    from sd4match.model_lock import read_lock
    from sd4match.models import read_model_record
    from sd4match.tiny_models import build_tiny_dinov2

    source = build_tiny_dinov2(tmp_path / "tiny-dinov2")
    first, second = "1" * 40, "2" * 40
    workdir = tmp_path / "work"
    workdir.mkdir()
    _hub_cache_with(workdir / "hf-cache", "org/tiny-dinov2", source, first)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"]["dinov2"] = {"kind": "dinov2", "id": "org/tiny-dinov2", "revision": "main"}
    for name in ("sd21", "sd15", "dino", "clip_vision"):  # local folders: never locked, never refreshed
        files = ["model.safetensors"]
        if config["models"][name]["kind"] == "stable_diffusion":
            files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/model.safetensors"]  # fmt: skip
        for file in files:
            (workdir / "local" / name / file).parent.mkdir(parents=True, exist_ok=True)
            (workdir / "local" / name / file).write_bytes(b"weights")
        config["models"][name] = {
            "kind": config["models"][name]["kind"],
            "id": f"local/{name}",
            "revision": "main",
        }
    config["hf_cache_dir"] = "hf-cache"
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = "resources/models/dinov2.json"
    result = snakemake(record, "--cores", "1", "-d", str(workdir), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_lock(workdir / "models.lock.yaml")["org/tiny-dinov2"].commit == first
    assert read_model_record(workdir / record).revision_resolved == first
    assert json_field(workdir / record, "local_path") is None  # found in the cache, never an absolute path
    (workdir / "hf-cache/models--org--tiny-dinov2/refs/main").write_text(second)  # upstream moves
    shutil.copytree(source, workdir / "hf-cache/models--org--tiny-dinov2/snapshots" / second)
    again = snakemake(record, "--cores", "1", "--forcerun", "resolve_model", "-d", str(workdir), cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_model_record(workdir / record).revision_resolved == first  # the lock holds
    refresh = snakemake("refresh_model_lock", "--cores", "1", "-d", str(workdir), cwd=workdir)
    assert refresh.returncode == 0, refresh.stderr[-3000:]
    assert read_lock(workdir / "models.lock.yaml")["org/tiny-dinov2"].commit == second
    assert read_model_record(workdir / record).revision_resolved == second
    log = (workdir / "logs/paper/models/refresh_model_lock.log").read_text()
    assert f"{first} -> {second}; record rewritten" in log
