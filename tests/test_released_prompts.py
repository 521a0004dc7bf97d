"""The authors' released prompts: their format written at tiny width, packed, fetched, imported, evaluated."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sd4match.caches import build_dino_cache, cache_meta
from sd4match.data_sources import DatasetLocation, write_location
from sd4match.datasets import SPAIR_CATEGORIES, parse_pfwillow, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_pfwillow
from sd4match.evaluation import PromptModels, run_prompt_evaluation
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.fetch import extract, sha256_file
from sd4match.models import ModelSpec, load_dinov2, resolve_model, write_model_record
from sd4match.prompt_learning import (
    CPMConfig,
    PromptBatch,
    build_prompt_module,
    load_prompt,
    save_prompt,
    sidecar_path,
)
from sd4match.prompts import sos_eos_embeddings
from sd4match.released_demo import (
    PAPER_RELEASE,
    released_payload,
    torch_bytes,
    write_release_archive,
    write_zip,
)
from sd4match.released_prompts import (
    KNOWN_FOLDERS,
    ImportSettings,
    ReleasedFolder,
    ReleaseSource,
    acquire_release,
    dinov2_token_shape,
    find_release_root,
    import_release,
    load_text_encoder,
    run_released_import,
)
from sd4match.released_tables import read_released_summaries, released_table2, released_table3, summary_key
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion

D = 32  # tiny text encoder width
DINO_SHAPE = (256, 32)  # tiny DINOv2: 224 crop / patch 14 = 16 x 16 tokens of 32 channels
SOURCE = ReleaseSource("https://example.org/pretrained_prompts.zip", "0" * 64)
SETTINGS = ImportSettings(1e-3, DINO_SHAPE)
SINGLE = ReleasedFolder("spair", "single")
CLASS = ReleasedFolder("spair", "class")
CPM = ReleasedFolder("spair", "cpm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("released")
    sd_dir = build_tiny_stable_diffusion(base / "sd21", seed=0)
    dino_dir = build_tiny_dinov2(base / "dinov2", seed=0)
    text_encoder, tokenizer = load_text_encoder(sd_dir)
    archive = write_release_archive(base / "pretrained_prompts.zip", text_encoder, tokenizer, DINO_SHAPE)
    return {
        "base": base,
        "sd": sd_dir,
        "dino": dino_dir,
        "te": text_encoder,
        "tok": tokenizer,
        "zip": archive,
    }


def _release_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A release packed from ``files`` and extracted, like the fetch rule does."""
    archive = write_zip(tmp_path / "pretrained_prompts.zip", files)
    return extract(archive, tmp_path / "extracted")


def _payload(tiny, spec: ReleasedFolder, seed: int = 7) -> dict[str, torch.Tensor]:
    return released_payload(spec, tiny["te"], tiny["tok"], DINO_SHAPE, seed)


def _import(tiny, root: Path, out: Path, settings: ImportSettings = SETTINGS):
    return import_release(root, out, tiny["te"], tiny["tok"], SOURCE, settings, {"demo": True})


# --------------------------------------------------------------------------------------------------- format


def test_folder_names_and_files_are_the_released_ones():
    assert sorted(KNOWN_FOLDERS) == [
        "CPM_pfpascal_sd2-1_Pair-DINO-Feat-G25-C50",
        "CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50",
        "Class_pfpascal_sd2-1_TokenEmbeds75",
        "Class_spair_sd2-1_TokenEmbeds75",
        "Single_pfpascal_sd2-1_TokenEmbeds75",
        "Single_spair_sd2-1_TokenEmbeds75",
    ]
    assert (SINGLE.file, CLASS.file, CPM.file) == ("caption.pt", "caption.pt", "ckpt.pt")


def test_dinov2_token_shape_reads_the_tiny_models_configs(tiny):
    assert dinov2_token_shape(tiny["dino"]) == DINO_SHAPE


def test_demo_archive_holds_the_released_format(tiny):
    with zipfile.ZipFile(tiny["zip"]) as archive:
        files = sorted(n for n in archive.namelist() if not n.endswith("/"))
        loaded = {n: torch.load(archive.open(n), weights_only=True) for n in files}
    assert files == sorted(
        f"{ReleasedFolder(t, v).name}/{ReleasedFolder(t, v).file}" for t, v in PAPER_RELEASE
    )
    sos, eos = sos_eos_embeddings(tiny["te"], tiny["tok"])
    single = loaded["Single_spair_sd2-1_TokenEmbeds75/caption.pt"]
    assert list(single) == ["dataset"] and single["dataset"].shape == (1, 77, D)
    assert torch.equal(single["dataset"][0, 0], sos.detach()) and torch.equal(
        single["dataset"][0, 76], eos.detach()
    )
    klass = loaded["Class_spair_sd2-1_TokenEmbeds75/caption.pt"]
    assert sorted(klass) == sorted(SPAIR_CATEGORIES) and {v.shape for v in klass.values()} == {(1, 77, D)}
    cpm = loaded["CPM_spair_sd2-1_Pair-DINO-Feat-G25-C50/ckpt.pt"]
    assert {k: tuple(v.shape) for k, v in cpm.items()} == {
        "global_embeds": (1, 25, D),
        "positional_embedding": (1, 50, D),
        "alpha_cond": (1, 50, D),
        "linear_C.weight": (D, 2 * 32),
        "linear_C.bias": (D,),
        "linear_N.weight": (256, 256),
        "linear_N.bias": (256,),
    }


# --------------------------------------------------------------------------------------------------- import


def test_fetch_and_import_the_demo_release(tiny, tmp_path):
    extracted, source = acquire_release(
        {"url": str(tiny["zip"]), "sha256": None}, tmp_path / "dl", tmp_path / "rel"
    )
    assert source == ReleaseSource(str(tiny["zip"]), sha256_file(tiny["zip"]))
    report = import_release(
        find_release_root(extracted),
        tmp_path / "out",
        tiny["te"],
        tiny["tok"],
        source,
        SETTINGS,
        {"demo": True},
    )
    assert sorted((e["trainset"], e["variant"]) for e in report.imported) == sorted(PAPER_RELEASE)
    assert report.missing == ["Class_pfpascal_sd2-1_TokenEmbeds75"]
    assert report.unknown == [] and all(files == [] for files in report.extra_files.values())
    single = torch.load(extracted / SINGLE.name / "caption.pt", weights_only=True)["dataset"]
    module, meta = load_prompt(tmp_path / "out/spair/single/prompt.safetensors", tiny["te"], tiny["tok"])
    assert torch.equal(module.prompt_for_images(["cat", "dog"]), single.expand(2, -1, -1))
    assert (
        meta["origin"] == "authors_release"
        and meta["training_set"] == "spair"
        and meta["variant"] == "single"
    )
    assert meta["release"] == {
        "url": str(tiny["zip"]),
        "archive_sha256": sha256_file(tiny["zip"]),
        "local_path": None,
        "folder": "Single_spair_sd2-1_TokenEmbeds75",
        "file": "caption.pt",
        "file_sha256": sha256_file(extracted / SINGLE.name / "caption.pt"),
    }
    assert meta["intended_sd_model"] == "stable-diffusion-2-1" and meta["sos_eos_max_abs_diff"] == 0.0


def test_imported_class_prompt_gives_each_categorys_file_sequence(tiny, tmp_path):
    payload = _payload(tiny, CLASS)
    _import(
        tiny, _release_dir(tmp_path, {f"{CLASS.name}/caption.pt": torch_bytes(payload)}), tmp_path / "out"
    )
    path = tmp_path / "out/spair/class/prompt.safetensors"
    module, meta = load_prompt(path, tiny["te"], tiny["tok"])
    order = ["train", "aeroplane", "cat", "train"]
    assert torch.equal(module.prompt_for_images(order), torch.cat([payload[c] for c in order]))
    assert module.categories == sorted(SPAIR_CATEGORIES)
    # one tensor per category on disk (index in the sorted list): each the released sequence's 75 learned rows
    saved = load_file(path)
    assert sorted(saved) == sorted(f"prompts.{i}" for i in range(18))
    for i, category in enumerate(sorted(SPAIR_CATEGORIES)):
        assert torch.equal(saved[f"prompts.{i}"], payload[category][0, 1:76])


def _authors_cpm(weights: dict[str, torch.Tensor], sos, eos, src: torch.Tensor, trg: torch.Tensor):
    """The released CPM's forward written from protocol.md: concat, linear_C, linear_N on patches, max-pool to
    50, + positional, * tanh(alpha), then [SOS, 25 global, 50 conditional, EOS]."""
    hidden = F.linear(torch.cat([src, trg], dim=-1), weights["linear_C.weight"], weights["linear_C.bias"])
    hidden = F.linear(hidden.transpose(1, 2), weights["linear_N.weight"], weights["linear_N.bias"])
    cond = F.adaptive_max_pool1d(hidden, 50).transpose(1, 2)
    cond = (cond + weights["positional_embedding"]) * torch.tanh(weights["alpha_cond"])
    b = src.shape[0]
    parts = [sos.expand(b, 1, -1), weights["global_embeds"].expand(b, -1, -1), cond, eos.expand(b, 1, -1)]
    return torch.cat(parts, dim=1)


def test_imported_cpm_equals_the_authors_forward_and_the_module_built_from_its_weights(tiny, tmp_path):
    weights = _payload(tiny, CPM)
    _import(tiny, _release_dir(tmp_path, {f"{CPM.name}/ckpt.pt": torch_bytes(weights)}), tmp_path / "out")
    imported, _ = load_prompt(tmp_path / "out/spair/cpm/prompt.safetensors", tiny["te"], tiny["tok"])
    config = CPMConfig(dino_dim=32, n_patches=256)
    built = build_prompt_module("cpm", tiny["te"], tiny["tok"], cpm=config, seed=3)
    built.g_d.load_state_dict({"weight": weights["linear_C.weight"], "bias": weights["linear_C.bias"]})
    built.g_n.load_state_dict({"weight": weights["linear_N.weight"], "bias": weights["linear_N.bias"]})
    with torch.no_grad():
        built.global_prompt.copy_(weights["global_embeds"][0])
        built.omega_pos.copy_(weights["positional_embedding"][0])
        built.omega_alpha.copy_(weights["alpha_cond"][0])
    generator = torch.Generator().manual_seed(1)
    src, trg = torch.randn(2, 3, 256, 32, generator=generator)
    batch = PromptBatch(["cat", "dog", "car"], src_tokens=src, trg_tokens=trg)
    with torch.no_grad():
        ours_src, ours_trg = imported.prompt_pair(batch)
        assert torch.equal(ours_src, ours_trg)
        assert torch.equal(ours_src, built.prompt_pair(batch)[0])
        sos, eos = sos_eos_embeddings(tiny["te"], tiny["tok"])
        torch.testing.assert_close(ours_src, _authors_cpm(weights, sos, eos, src, trg), rtol=0, atol=1e-6)


def test_ddp_prefixed_cpm_state_dict_is_accepted(tiny, tmp_path):
    weights = _payload(tiny, CPM)
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    _import(tiny, _release_dir(tmp_path, {f"{CPM.name}/ckpt.pt": torch_bytes(prefixed)}), tmp_path / "out")
    module, _ = load_prompt(tmp_path / "out/spair/cpm/prompt.safetensors", tiny["te"], tiny["tok"])
    assert torch.equal(module.omega_alpha, weights["alpha_cond"][0])


def test_unknown_folders_extra_files_and_a_top_folder_are_reported_not_fatal(tiny, tmp_path):
    files = {
        f"pretrained_prompts/{SINGLE.name}/caption.pt": torch_bytes(_payload(tiny, SINGLE)),
        f"pretrained_prompts/{SINGLE.name}/args.json": b"{}",
        "pretrained_prompts/CPM_spair_sd2-1_Individual-DINO-Feat-C75/ckpt.pt": b"?",
        "pretrained_prompts/README.txt": b"prompts",
        "__MACOSX/._pretrained_prompts": b"",
    }
    root = find_release_root(_release_dir(tmp_path, files))
    assert root.name == "pretrained_prompts"
    report = _import(tiny, root, tmp_path / "out")
    assert [e["folder"] for e in report.imported] == [SINGLE.name]
    assert report.unknown == ["CPM_spair_sd2-1_Individual-DINO-Feat-C75", "README.txt"]
    assert report.missing == [name for name in KNOWN_FOLDERS if name != SINGLE.name]
    assert report.extra_files == {SINGLE.name: ["args.json"]}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "prompt.safetensors",
        "prompt.safetensors.json",
        "single",
        "spair",
    ]


def test_a_release_without_any_known_folder_is_an_error(tiny, tmp_path):
    root = _release_dir(tmp_path, {"Other_prompt/caption.pt": b"?"})
    with pytest.raises(FileNotFoundError, match="none of the known prompt folders.*Other_prompt"):
        _import(tiny, root, tmp_path / "out")


def _malformed(tiny, tmp_path, spec: ReleasedFolder, payload) -> str:
    """Import a one-folder release whose file is ``payload`` (dict or bytes); return the error message."""
    data = payload if isinstance(payload, bytes) else torch_bytes(payload)
    root = _release_dir(tmp_path, {f"{spec.name}/{spec.file}": data})
    (tmp_path / "out").mkdir()
    (tmp_path / "out/old.txt").write_text("kept")
    with pytest.raises(ValueError) as error:
        _import(tiny, root, tmp_path / "out")
    assert (tmp_path / "out/old.txt").read_text() == "kept"  # a failed import leaves the old output alone
    assert not [p for p in tmp_path.iterdir() if ".importing-" in p.name]
    return str(error.value)


def test_missing_cpm_key_names_file_and_key(tiny, tmp_path):
    payload = _payload(tiny, CPM)
    del payload["alpha_cond"]
    message = _malformed(tiny, tmp_path, CPM, payload)
    assert f"{CPM.name}/ckpt.pt" in message and "missing key 'alpha_cond'" in message


def test_wrong_shape_names_file_key_and_shapes(tiny, tmp_path):
    payload = _payload(tiny, CPM)
    payload["linear_N.weight"] = torch.zeros(255, 255)
    message = _malformed(tiny, tmp_path, CPM, payload)
    assert "key 'linear_N.weight' has shape (255, 255), expected (256, 256)" in message
    single = {"dataset": torch.zeros(1, 76, D)}
    message = _malformed(tiny, tmp_path / "single", SINGLE, single)
    assert (
        f"{SINGLE.name}/caption.pt" in message
        and "key 'dataset' has shape (1, 76, 32), expected (1, 77, 32)" in message
    )


def test_non_finite_values_name_the_category(tiny, tmp_path):
    payload = _payload(tiny, CLASS)
    payload["cat"][0, 5, :3] = torch.tensor([float("nan"), float("inf"), 0.0])
    message = _malformed(tiny, tmp_path, CLASS, payload)
    assert f"{CLASS.name}/caption.pt" in message and "key 'cat' holds 2 non-finite values" in message


def test_class_prompt_without_a_category_names_it(tiny, tmp_path):
    payload = _payload(tiny, CLASS)
    del payload["sheep"], payload["bus"]
    message = _malformed(tiny, tmp_path, CLASS, payload)
    assert "missing keys ['bus', 'sheep']" in message


def test_single_without_dataset_key_names_it(tiny, tmp_path):
    message = _malformed(tiny, tmp_path, SINGLE, {"prompt": torch.zeros(1, 77, D)})
    assert "missing key 'dataset'" in message and "['prompt']" in message


def test_sos_eos_of_another_text_encoder_are_refused_with_the_difference(tiny, tmp_path):
    payload = _payload(tiny, SINGLE)
    payload["dataset"][0, 76] += 0.25
    message = _malformed(tiny, tmp_path, SINGLE, payload)
    assert "SOS/EOS rows differ from the configured text encoder's by up to 0.25 (tolerance 0.001)" in message


class Payload:
    """An arbitrary object: unpickling it would run code, which weights_only refuses."""


def test_unsafe_or_unreadable_files_are_refused(tiny, tmp_path):
    message = _malformed(tiny, tmp_path / "a", SINGLE, torch_bytes({"dataset": Payload()}))
    assert "cannot be read with torch.load(weights_only=True)" in message
    assert "cannot be read" in _malformed(tiny, tmp_path / "b", SINGLE, b"not a torch file")
    assert "expected a dict of tensors, got list" in _malformed(tiny, tmp_path / "c", SINGLE, pickle_list())
    message = _malformed(tiny, tmp_path / "d", SINGLE, {"dataset": torch.zeros(1, 77, D, dtype=torch.long)})
    assert "key 'dataset' has dtype torch.int64, not floating point" in message


def pickle_list() -> bytes:
    """A torch.save'd list (a valid, safe file that is not a dict)."""
    buffer = io.BytesIO()
    torch.save([torch.zeros(1)], buffer)
    return buffer.getvalue()


def test_local_copy_is_linked_not_downloaded(tiny, tmp_path):
    copy = _release_dir(tmp_path, {f"{SINGLE.name}/caption.pt": torch_bytes(_payload(tiny, SINGLE))})
    folder, source = acquire_release(
        {"url": "https://unreachable.invalid/x.zip", "local_path": str(copy)},
        tmp_path / "dl",
        tmp_path / "rel",
    )
    assert folder.is_symlink() and folder.resolve() == copy.resolve()
    assert source == ReleaseSource(None, None, str(copy)) and not (tmp_path / "dl").exists()


# --------------------------------------------------------------------------------------- the workflow job


@pytest.fixture(scope="module")
def world(tiny):
    """The tiny PF-Willow world with model records, a DINOv2 cache and the demo release imported."""
    base = tiny["base"] / "world"
    images_zip, pairs_csv = make_pfwillow(base / "archives", DemoWorldSpec())
    extract(images_zip, base / "root")
    pairs = parse_pfwillow(base / "root", pairs_csv)
    write_pairs_table(pairs.head(8), base / "pairs.parquet")
    write_location(DatasetLocation("pfwillow", str(base / "root")), base / "fetch.json")
    sd_record = resolve_model(ModelSpec(name="sd21", id=str(tiny["sd"]), kind="stable_diffusion"))
    dino_record = resolve_model(ModelSpec(name="dinov2", id=str(tiny["dino"]), kind="dinov2"))
    write_model_record(sd_record, base / "sd21.json")
    write_model_record(dino_record, base / "dinov2.json")
    model, processor = load_dinov2(tiny["dino"])
    meta = cache_meta(dino_record, None, "dino", processor=processor)
    build_dino_cache([pairs.head(8)], base / "root", model, processor, base / "dino.safetensors", meta)
    cfg = {"url": str(tiny["zip"]), "sha256": None, "local_path": None, "sos_eos_atol": 1e-3}
    report = run_released_import(
        cfg,
        base / "sd21.json",
        base / "dinov2.json",
        base / "dl",
        base / "rel",
        base / "prompts",
        base / "report.json",
        {"demo": True},
    )
    return {"base": base, "report": report, "sd_record": sd_record, "dino_record": dino_record}


def test_import_job_writes_the_report_and_model_records(world):
    base = world["base"]
    report = json.loads((base / "report.json").read_text())
    assert report["missing"] == ["Class_pfpascal_sd2-1_TokenEmbeds75"] and len(report["imported"]) == 5
    sidecar = json.loads((base / "prompts/pfpascal/cpm/prompt.safetensors.json").read_text())
    record = world["sd_record"]
    assert sidecar["metadata"]["sd_model"] == {"id": record.id, "revision": record.revision_resolved}
    dino = world["dino_record"]
    assert sidecar["metadata"]["dinov2_model"] == {"id": dino.id, "revision": dino.revision_resolved}
    assert sidecar["cpm"]["dino_dim"] == 32 and sidecar["cpm"]["n_patches"] == 256
    single = json.loads((base / "prompts/spair/single/prompt.safetensors.json").read_text())
    assert single["metadata"]["dinov2_model"] is None and single["metadata"]["demo"] is True


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_imported_prompt_evaluates_like_the_module_built_from_its_weights(tiny, world, tmp_path, variant):
    """The evaluation path is the tuned prompts' one: an imported prompt scores exactly like the same weights
    saved by save_prompt from a module we built."""
    base = world["base"]
    imported = base / f"prompts/spair/{variant}/prompt.safetensors"
    module, _ = load_prompt(imported, tiny["te"], tiny["tok"])
    rebuilt = build_prompt_module(
        variant, tiny["te"], tiny["tok"], cpm=getattr(module, "config", None), seed=5
    )
    rebuilt.load_state_dict(module.state_dict())
    models = json.loads(sidecar_path(imported).read_text())["metadata"]
    save_prompt(
        rebuilt, tmp_path / "rebuilt.safetensors", {k: models[k] for k in ("sd_model", "dinov2_model")}
    )
    cpm = variant == "cpm"
    matching = {"methods": ["nn", "kernel_softmax"], "kernel_sigma": 7.0, "softmax_temperature": 0.04}
    features = {"precision": "fp32", "up_block_index": 1, "max_unet_batch": 8}
    settings = JobSettings(features, matching, [0.1], None, 64, 0)
    summaries = []
    for prompt in (imported, tmp_path / "rebuilt.safetensors"):
        summaries.append(
            run_prompt_evaluation(
                prompt,
                PromptModels(
                    base / "sd21.json", *((base / "dinov2.json", base / "dino.safetensors") if cpm else ())
                ),
                SplitInputs(base / "pairs.parquet", base / "fetch.json"),
                {"timestep": 50, "ensemble": 1, "pair_batch": 4},
                settings,
                JobOutputs(tmp_path / f"{prompt.stem}_per_pair.csv", tmp_path / f"{prompt.stem}_summary.csv"),
            )
        )
    pd.testing.assert_frame_equal(summaries[0], summaries[1])
    all_rows = summaries[0][summaries[0].category == "All"]
    assert len(all_rows) == 2 and (all_rows.n_pairs == 8).all()


# ------------------------------------------------------------------------------------------------ tables


def _summary(pck: float, categories=("All",)) -> pd.DataFrame:
    rows = [
        {"category": c, "method": "kernel_softmax", "alpha": a, "n_pairs": 4, "n_kps": 20}
        | {"pck_per_image": pck, "pck_per_keypoint": pck - 1}
        for c in categories
        for a in (0.05, 0.1, 0.15)
    ]
    return pd.DataFrame(rows)


def _write_summaries(root: Path, values: dict[tuple[str, str, str], float]) -> list[Path]:
    paths = []
    for (trainset, variant, dataset), pck in values.items():
        path = root / trainset / variant / dataset / "summary.csv"
        path.parent.mkdir(parents=True)
        _summary(pck, ("All", "cat") if dataset == "spair" else ("All",)).to_csv(path, index=False)
        paths.append(path)
    return paths


def test_released_tables_put_each_prompt_beside_the_papers_row(tmp_path):
    values = {("pfpascal", "cpm", d): 90.0 for d in ("spair", "pfpascal", "pfwillow")}
    values |= {("spair", "cpm", d): 80.0 for d in ("spair", "pfpascal", "pfwillow")}
    values[("spair", "class", "spair")] = 70.0
    summaries = read_released_summaries(_write_summaries(tmp_path, values))
    table3 = released_table3(summaries, "kernel_softmax")
    assert list(table3["method"]) == [
        "SD4Match-CPM (authors' released prompt, tuned on SPair-71k)",
        "SD4Match-CPM (Tuned on SPair-71k)",
        "ours − paper",
        "SD4Match-CPM (authors' released prompt, tuned on PF-Pascal)",
        "SD4Match-CPM",
        "ours − paper",
    ]
    assert list(table3["matching"]) == ["kernel_softmax", "", "kernel_softmax"] * 2  # quoted rows: none
    assert table3["SPair-71k@0.1"].tolist() == pytest.approx([80.0, 75.5, 4.5, 90.0, 40.9, 49.1])
    assert table3["PF-Pascal@0.05"].tolist() == pytest.approx([80.0, 73.3, 6.7, 90.0, 84.4, 5.6])
    table2 = released_table2(summaries, "kernel_softmax")
    assert list(table2["source"]) == ["ours", "paper", "delta"] * 2
    assert table2["Cat"].tolist()[0] == 70.0 and table2["All"].tolist()[:3] == pytest.approx(
        [70.0, 75.5, -5.5]
    )
    assert pd.isna(table2["Aero"].iloc[0])  # a category the summary lacks


def test_summary_paths_must_follow_the_layout(tmp_path):
    assert summary_key("results/released/spair/cpm/pfwillow/summary.csv") == ("spair", "cpm", "pfwillow")
    with pytest.raises(ValueError, match="unknown training set"):
        summary_key("results/released/pfwillow/cpm/spair/summary.csv")


# --------------------------------------------------------------------------------------------------- DAG

REPO = Path(__file__).resolve().parents[1]


def _dry_run(workdir: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n"]
        + ["--quiet", "rules", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


def _job_counts(output: str) -> dict[str, int]:
    block = output.split("Job stats:", 1)[1].splitlines()[3:]
    counts = {}
    for line in block:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture
def paper_workdir(tmp_path: Path) -> Path:
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    return tmp_path


def test_released_prompts_target_plans_the_import_and_no_training(paper_workdir):
    code, output = _dry_run(paper_workdir, "--", "released_prompts")
    assert code == 0, output
    assert _job_counts(output) == {
        "resolve_model": 2,
        "import_released_prompts": 1,
        "released_prompts": 1,
        "total": 4,
    }


def _imported(workdir: Path, runs: list[tuple[str, str]]) -> None:
    """The import checkpoint's outputs, as a finished import of ``runs`` leaves them."""
    prompts = workdir / "results/released/prompts"
    for trainset, variant in runs:
        (prompts / trainset / variant).mkdir(parents=True)
        (prompts / trainset / variant / "prompt.safetensors").touch()
    imported = [{"trainset": t, "variant": v} for t, v in runs]
    (workdir / "results/released/import_report.json").write_text(json.dumps({"imported": imported}))


def test_after_the_import_every_released_prompt_is_evaluated_without_training(paper_workdir):
    _imported(paper_workdir, list(PAPER_RELEASE))
    code, output = _dry_run(paper_workdir, "--", "released_prompts")
    assert code == 0, output
    # Single and CPM of both training sets on the three test sets, Class (SPair) on SPair only
    assert _job_counts(output) == {
        "fetch_dataset": 3,
        "resolve_model": 2,
        "pairs_table": 3,
        "dino_cache": 3,
        "test_latent_cache": 3,  # each test split's VAE posteriors, read by every evaluation of the split
        "evaluate_released_prompt": 13,
        "released_prompts": 1,
        "total": 28,
    }


def test_a_prompt_the_release_lacks_is_named(paper_workdir):
    _imported(paper_workdir, [("spair", "single")])
    code, output = _dry_run(paper_workdir, "--", "results/released/pfpascal/cpm/spair/summary.csv")
    assert code != 0
    assert "the authors' release has no cpm prompt tuned on pfpascal" in output


def test_demo_profile_builds_its_release_from_the_tiny_models(paper_workdir):
    (paper_workdir / "profiles/demo").mkdir(parents=True)
    shutil.copy(REPO / "profiles/demo/world.yaml", paper_workdir / "profiles/demo/world.yaml")
    args = ("--configfile", "config.yaml", "profiles/demo/world.yaml", "--", "released_tables")
    code, output = _dry_run(paper_workdir, *args)
    assert code == 0, output
    # the tables' captions count the pairs evaluated (issue 12): the pairs tables of the three test sets,
    # which the released prompts' evaluations need anyway, are planned before the import
    assert _job_counts(output) == {
        "tiny_model": 2,
        "demo_released_prompts": 1,
        "resolve_model": 2,
        "import_released_prompts": 1,
        "demo_datasets": 1,
        "fetch_dataset": 3,
        "pairs_table": 3,
        "released_table": 1,
        "released_tables": 1,
        "total": 15,
    }


# The demo release run end to end (zip, import, 13 evaluations, two tables) is checked on the shared demo
# run: tests/test_workflow.py::test_demo_release_is_fetched_imported_evaluated_and_tabled.
