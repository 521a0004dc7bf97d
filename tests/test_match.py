"""`sd4match match` and `sd4match.match(...)` on the demo world: the same predictions as the evaluation
writes (text, Single and CPM prompts), the confidence's definition, points and outputs, and bad input named.

Tolerance of the equality with the evaluation (tests/test_matching_equivalence.py explains it): the
evaluation matches a category's pairs in one batched call, ``match`` one pair; nearest neighbour is compared
exactly, the soft localisers within PRED_ATOL px of the squashed frame (the evaluation's own batching
tolerance), mapped to the original frame. One thread (the tests' OMP_NUM_THREADS=1) gives exact equality.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sd4match.caches import build_dino_cache, cache_meta
from sd4match.data_sources import DatasetLocation, write_location
from sd4match.datasets import parse_spair, read_pairs_table, write_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_custom_dataset, make_spair
from sd4match.evaluation import PromptModels, run_prompt_evaluation
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.fetch import extract
from sd4match.match_cli import build_parser, main
from sd4match.match_models import MatchInputError
from sd4match.match_points import (
    CONFIDENCE_DEFINITION,
    Matcher,
    grid_points,
    kernel_softmax_confidence,
    kernel_softmax_distribution,
    match,
    read_points,
)
from sd4match.matching import kernel_soft_argmax, nearest_neighbour
from sd4match.models import ModelSpec, load_dinov2, load_stable_diffusion, resolve_model, write_model_record
from sd4match.predictions import from_squashed_frame, read_predictions
from sd4match.prompt_learning import CPMConfig, build_prompt_module, save_prompt
from sd4match.tiny_models import build_tiny_dinov2, build_tiny_stable_diffusion
from sd4match.zero_shot import run_zero_shot

REPO = Path(__file__).resolve().parents[1]
S = 128  # profiles/demo/world.yaml image_size
PRED_ATOL = 1e-3  # px in the squashed frame (tests/test_matching_equivalence.py)
TINY_CPM = CPMConfig(dino_dim=32, n_patches=256)
SPEC = DemoWorldSpec(
    spair_categories=("cat", "dog"), spair_images_per_split=(2, 2, 3), spair_pairs_per_split=(1, 1, 3)
)
METHODS = ["nn", "soft_argmax", "kernel_softmax"]
MATCHING = {"methods": METHODS, "kernel_sigma": 7.0, "softmax_temperature": 0.04}
FEATURES = {"precision": "fp32", "up_block_index": 1, "max_unet_batch": 8}
SHAPES = "resources/demo/demo_custom/shapes/images"
CAT_1, CAT_2 = f"{SHAPES}/cat/cat_1.jpg", f"{SHAPES}/cat/cat_2.png"


# -------------------------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder as after the demo: configs, tiny SD 2-1 and DINOv2 with their records, the SPair
    test pairs (a small spec), the demo custom dataset, and a DINOv2 cache of the SPair test images."""
    root = tmp_path_factory.mktemp("match") / "project"
    (root / "profiles/demo").mkdir(parents=True)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    shutil.copy(REPO / "profiles/demo/world.yaml", root / "profiles/demo/world.yaml")
    res = root / "resources/demo"
    records = {}
    for name, kind, build in (
        ("sd21", "stable_diffusion", build_tiny_stable_diffusion),
        ("dinov2", "dinov2", build_tiny_dinov2),
    ):
        build(res / "tiny_models" / name, seed=0)
        record = resolve_model(ModelSpec(name=name, id=str(res / "tiny_models" / name), kind=kind))
        write_model_record(record, res / "models" / f"{name}.json")
        records[name] = record
    archive = make_spair(root / "archives", SPEC)
    extract(archive, res / "data/spair")
    data = res / "data/spair/SPair-71k"
    pairs = parse_spair(data, "test")
    write_pairs_table(pairs, root / "pairs.parquet")
    write_location(DatasetLocation("spair", str(data)), root / "fetch.json")
    model, processor = load_dinov2(res / "tiny_models/dinov2")
    meta = cache_meta(records["dinov2"], None, "dino", processor=processor)
    build_dino_cache([pairs], data, model, processor, root / "dino.safetensors", meta)
    make_custom_dataset(res / "demo_custom/shapes")
    return root


@pytest.fixture
def in_project(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project)
    return project


def _records(project: Path) -> dict[str, dict]:
    return {
        n: json.loads((project / f"resources/demo/models/{n}.json").read_text()) for n in ("sd21", "dinov2")
    }


def save_demo_prompt(project: Path, variant: str, path: Path, seed: int = 0, sd_revision: str | None = None):
    """A prompt of the tiny world at its seeded initialisation, with the sidecar training writes."""
    components = load_stable_diffusion(project / "resources/demo/tiny_models/sd21")
    records = _records(project)
    meta = {"sd_model": {"id": "sd21", "revision": sd_revision or records["sd21"]["revision_resolved"]}}
    if variant == "cpm":
        meta["dinov2_model"] = {"id": "dinov2", "revision": records["dinov2"]["revision_resolved"]}
    cpm = TINY_CPM if variant == "cpm" else None
    module = build_prompt_module(variant, components.text_encoder, components.tokenizer, cpm=cpm, seed=seed,
                                 categories=["cat", "dog"] if variant == "class" else None)  # fmt: skip
    save_prompt(module, path, meta)
    return path


def _evaluate_prompt(project: Path, prompt: Path, out: Path, seed: int, pair_batch: int) -> pd.DataFrame:
    """run_prompt_evaluation with the demo config's settings (as rule evaluate_prompt passes them)."""
    cpm = "cpm" in prompt.name
    models = project / "resources/demo/models"
    run_prompt_evaluation(
        prompt_path=prompt,
        models=PromptModels(
            models / "sd21.json",
            models / "dinov2.json" if cpm else None,
            project / "dino.safetensors" if cpm else None,
        ),
        split=SplitInputs(project / "pairs.parquet", project / "fetch.json"),
        evaluation={"timestep": 50, "ensemble": 2, "pair_batch": pair_batch},
        settings=JobSettings(FEATURES, MATCHING, [0.05, 0.1, 0.15], None, S, seed, "cpu"),
        outputs=JobOutputs(out / "per_pair.csv", out / "summary.csv", out / "predictions.parquet"),
    )
    return read_predictions(out / "predictions.parquet")


def assert_same_predictions(
    project: Path, matcher: Matcher, written: pd.DataFrame, pairs: pd.DataFrame
) -> int:
    """Match every pair of ``pairs`` with ``matcher`` and compare with the written predictions; returns the
    number of predictions compared."""
    root = project / "resources/demo/data/spair/SPair-71k"
    compared = 0
    for row in pairs.itertuples():
        points = np.array(row.src_kps)
        result = matcher.match(root / row.src_image, root / row.trg_image, points)
        assert result.source.key == row.src_image and result.target.key == row.trg_image
        for method in METHODS:
            ours = written[(written.pair_id == row.pair_id) & (written.method == method)].sort_values("kp")
            np.testing.assert_array_equal(ours[["src_x", "src_y"]].to_numpy(), points)
            expected = ours[["pred_x", "pred_y"]].to_numpy()
            scale = np.array([row.trg_width / S, row.trg_height / S]) * PRED_ATOL
            if method == "nn":
                np.testing.assert_array_equal(result.predictions[method], expected)
            else:
                assert np.all(np.abs(result.predictions[method] - expected) <= scale), (row.pair_id, method)
            compared += len(expected)
        np.testing.assert_array_equal(result.target_points, result.predictions["kernel_softmax"])
        assert ((result.confidence > 0) & (result.confidence <= 1)).all()
    return compared


# ------------------------------------------------------------------- the same numbers as the evaluation


def test_single_prompt_matches_the_evaluations_predictions(in_project: Path, tmp_path: Path):
    prompt = save_demo_prompt(in_project, "single", tmp_path / "single.safetensors", seed=1)
    written = _evaluate_prompt(in_project, prompt, tmp_path, seed=1, pair_batch=4)
    root = "resources/demo/data/spair/SPair-71k"
    matcher = Matcher.from_request(prompt=str(prompt), demo=True, root=root, category="cat")
    # the run's seed comes from the prompt's sidecar, t and ensemble from sd4match.evaluation (demo: 2)
    assert (matcher.setup.seed, matcher.setup.timestep, matcher.setup.ensemble) == (1, 50, 2)
    pairs = read_pairs_table(in_project / "pairs.parquet")
    assert assert_same_predictions(in_project, matcher, written, pairs) == len(written)


def test_text_prompt_matches_the_zero_shot_dift_predictions(in_project: Path, tmp_path: Path):
    config = Matcher.from_request(text="a photo of a {category}", demo=True).setup.config
    run_zero_shot(
        method=config["zero_shot"]["dift"],
        records={"model": in_project / "resources/demo/models/sd21.json"},
        split=SplitInputs(in_project / "pairs.parquet", in_project / "fetch.json"),
        settings=JobSettings(FEATURES, MATCHING, [0.1], None, S, config["seed"], "cpu"),
        outputs=JobOutputs(
            tmp_path / "per_pair.csv", tmp_path / "summary.csv", tmp_path / "predictions.parquet"
        ),
    )
    written = read_predictions(tmp_path / "predictions.parquet")
    pairs = read_pairs_table(in_project / "pairs.parquet")
    for category in ("cat", "dog"):  # the template is filled with the pair's category
        matcher = Matcher.from_request(
            text="a photo of a {category}",
            category=category,
            demo=True,
            root="resources/demo/data/spair/SPair-71k",
        )
        assert (matcher.setup.timestep, matcher.setup.ensemble) == (261, 2)  # zero_shot.dift in the demo
        of_category = pairs[pairs.category == category]
        subset = written[written.pair_id.isin(of_category.pair_id)]
        assert assert_same_predictions(in_project, matcher, subset, of_category) == len(subset) > 0


def test_cpm_prompt_matches_the_evaluation_of_one_pair_per_batch(in_project: Path, tmp_path: Path):
    """CPM draws noise per batch of pairs (seeded by their ids): a pair alone in its batch, same id."""
    prompt = save_demo_prompt(in_project, "cpm", tmp_path / "cpm.safetensors")
    written = _evaluate_prompt(in_project, prompt, tmp_path, seed=0, pair_batch=1)
    pairs = read_pairs_table(in_project / "pairs.parquet")
    root = in_project / "resources/demo/data/spair/SPair-71k"
    for row in pairs.head(3).itertuples():
        matcher = Matcher.from_request(prompt=str(prompt), demo=True, root=str(root), pair_id=row.pair_id)
        result = matcher.match(root / row.src_image, root / row.trg_image, np.array(row.src_kps))
        for method in METHODS:
            ours = written[(written.pair_id == row.pair_id) & (written.method == method)].sort_values("kp")
            expected = ours[["pred_x", "pred_y"]].to_numpy()
            if method == "nn":
                np.testing.assert_array_equal(result.predictions[method], expected)
            else:
                tol = np.array([row.trg_width / S, row.trg_height / S]) * PRED_ATOL
                assert np.all(np.abs(result.predictions[method] - expected) <= tol), (row.pair_id, method)
    assert result.settings["dinov2_model"]["revision"] == _records(in_project)["dinov2"]["revision_resolved"]


def test_written_predictions_are_what_the_evaluation_scored(in_project: Path, tmp_path: Path):
    """predictions.parquet, squashed back to S, gives every per-pair count of per_pair.csv."""
    from sd4match.evaluation import MatchingSettings, score_predictions

    prompt = save_demo_prompt(in_project, "single", tmp_path / "single.safetensors")
    written = _evaluate_prompt(in_project, prompt, tmp_path, seed=0, pair_batch=4)
    per_pair = pd.read_csv(tmp_path / "per_pair.csv")
    pairs = read_pairs_table(in_project / "pairs.parquet")
    settings = MatchingSettings(S, tuple(METHODS), (0.05, 0.1, 0.15))
    assert len(written) == 3 * pairs.n_kps.sum()
    for row in pairs.itertuples():
        preds = {}
        for method in METHODS:
            ours = written[(written.pair_id == row.pair_id) & (written.method == method)].sort_values("kp")
            xy = ours[["pred_x", "pred_y"]].to_numpy() * np.array([S / row.trg_width, S / row.trg_height])
            preds[method] = torch.tensor(xy, dtype=torch.float32)
        for score in score_predictions(row, preds, settings):
            counted = per_pair[
                (per_pair.pair_id.astype(str) == row.pair_id)
                & (per_pair.method == score.method)
                & np.isclose(per_pair.alpha, score.alpha)
            ]
            assert int(counted.n_correct.iloc[0]) == score.n_correct


# -------------------------------------------------------------------------------------------- confidence


def test_confidence_is_the_kernel_softmax_peak_probability_by_hand():
    corr = torch.zeros(1, 3, 3)
    corr[0, 1, 1] = 1.0  # a single peak; G leaves the zeros zero
    conf = kernel_softmax_confidence(corr, sigma=7.0, temperature=1.0)
    assert conf.item() == pytest.approx(1.0 / (1.0 + 8.0 * np.exp(-1.0)), rel=1e-6)
    corr[0, 0, 0] = 1.0  # a tie at a corner: argmax is the first (0, 0); G there is 1, at (1, 1) exp(-2/98)
    g = np.exp(-2.0 / 98.0)
    conf = kernel_softmax_confidence(corr, sigma=7.0, temperature=1.0)
    assert conf.item() == pytest.approx(1.0 / (1.0 + np.exp(g - 1.0) + 7.0 * np.exp(-1.0)), rel=1e-6)


def test_confidence_distribution_has_the_kernel_softmax_prediction_as_mean():
    generator = torch.Generator().manual_seed(0)
    corr = torch.rand(2, 5, 8, 8, generator=generator) * 2 - 1
    prob = kernel_softmax_distribution(corr, 7.0, 0.04)
    xs = torch.arange(8.0).repeat(8)
    ys = torch.arange(8.0).repeat_interleave(8)
    mean = torch.stack([(prob * xs).sum(-1), (prob * ys).sum(-1)], dim=-1)
    torch.testing.assert_close(mean, kernel_soft_argmax(corr, 7.0, 0.04), rtol=0, atol=1e-5)
    peak = nearest_neighbour(corr).long()
    at_peak = prob.gather(-1, (peak[..., 1] * 8 + peak[..., 0])[..., None])[..., 0]
    torch.testing.assert_close(kernel_softmax_confidence(corr, 7.0, 0.04), at_peak)
    assert torch.allclose(prob.sum(-1), torch.ones(2, 5))
    assert "peak probability" in CONFIDENCE_DEFINITION


# ------------------------------------------------------------------------------------------ points, frames


def test_grid_points_are_cell_centres_row_by_row():
    np.testing.assert_array_equal(
        grid_points(2, (100, 50)), [[25.0, 12.5], [75.0, 12.5], [25.0, 37.5], [75.0, 37.5]]
    )
    with pytest.raises(MatchInputError, match="argument --grid"):
        grid_points(0, (100, 50))


def test_points_from_text_json_and_csv(tmp_path: Path):
    image = tmp_path / "a.png"
    expected = [[1.5, 2.0], [100.0, 50.0]]
    np.testing.assert_array_equal(read_points("1.5,2;100,50", "--points", (100, 50), image), expected)
    (tmp_path / "p.json").write_text(json.dumps({"points": expected}))
    np.testing.assert_array_equal(
        read_points(str(tmp_path / "p.json"), "--points", (100, 50), image), expected
    )
    (tmp_path / "p.csv").write_text("x,y\n1.5,2\n100,50\n")
    np.testing.assert_array_equal(
        read_points(str(tmp_path / "p.csv"), "--points", (100, 50), image), expected
    )
    with pytest.raises(MatchInputError, match=r"argument --points: point 1 \(100\.5, 50\) lies outside"):
        read_points("1,1;100.5,50", "--points", (100, 50), image)
    with pytest.raises(MatchInputError, match="argument --gt: points file not found"):
        read_points(str(tmp_path / "missing.json"), "--gt", (100, 50), image)
    with pytest.raises(MatchInputError, match=r"argument --points: point 0 '1' is not 'x,y'"):
        read_points("1", "--points", (100, 50), image)


def test_squashed_frame_back_to_the_original_frame():
    np.testing.assert_array_equal(from_squashed_frame([[64.0, 32.0]], 200, 100, 128), [[100.0, 25.0]])


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument(in_project: Path, tmp_path: Path):
    single = save_demo_prompt(in_project, "single", tmp_path / "single.safetensors")
    (tmp_path / "broken.jpg").write_text("not an image")
    cases = [
        (dict(source="missing.jpg"), "argument source: image not found: missing.jpg"),
        (dict(target=str(tmp_path / "broken.jpg")), "argument target: cannot read image"),
        (dict(points="10,10;5000,10"), r"argument --points: point 1 \(5000, 10\) lies outside the image"),
        (dict(points="10,10", ground_truth="1,1;2,2"), "argument --gt: 2 points for 1 source points"),
    ]
    matcher = Matcher.from_request(prompt=str(single), demo=True)
    for change, message in cases:
        args = dict(source=CAT_1, target=CAT_2, points="10,10") | change
        with pytest.raises(MatchInputError, match=message):
            matcher.match(**args)
    with pytest.raises(MatchInputError, match="arguments --prompt / --text: give exactly one"):
        match(CAT_1, CAT_2, "10,10", demo=True)
    with pytest.raises(MatchInputError, match="argument --prompt: prompt file .* does not exist"):
        match(CAT_1, CAT_2, "10,10", prompt="nope.safetensors", demo=True)
    with pytest.raises(MatchInputError, match="argument --config: config file other.yaml not found"):
        match(CAT_1, CAT_2, "10,10", text="", config=("other.yaml",))


def test_prompt_trained_with_another_sd_model_is_refused(in_project: Path, tmp_path: Path):
    other = save_demo_prompt(in_project, "single", tmp_path / "other.safetensors", sd_revision="0123abcd")
    message = (
        r"argument --prompt: prompt sidecar .*other\.safetensors\.json: the prompt was trained with Stable "
        r"Diffusion 'sd21' revision '0123abcd', but model record resources/demo/models/sd21\.json"
    )
    with pytest.raises(MatchInputError, match=message):
        match(CAT_1, CAT_2, "10,10", prompt=str(other), demo=True)
    # a local folder given for the model is checked the same way (its content hash is its revision)
    with pytest.raises(MatchInputError, match="argument --prompt: .* model record of the model folder"):
        match(CAT_1, CAT_2, "10,10", prompt=str(other), demo=True, sd_model="resources/demo/tiny_models/sd21")


def test_cpm_prompt_without_dinov2_is_refused(in_project: Path, tmp_path: Path):
    cpm = save_demo_prompt(in_project, "cpm", tmp_path / "cpm.safetensors")
    record = in_project / "resources/demo/models/dinov2.json"
    shutil.move(record, tmp_path / "dinov2.json")
    try:
        with pytest.raises(MatchInputError, match=r"argument --dinov2-model: the CPM prompt .* needs DINOv2: "
                           r"model record resources/demo/models/dinov2\.json .* does not exist"):  # fmt: skip
            match(CAT_1, CAT_2, "10,10", prompt=str(cpm), demo=True)
        with pytest.raises(MatchInputError, match="argument --dinov2-model: 'nowhere' is neither"):
            match(CAT_1, CAT_2, "10,10", prompt=str(cpm), demo=True, dinov2_model="nowhere")
        # a local DINOv2 folder works in place of the registry's record
        result = match(
            CAT_1,
            CAT_2,
            "10,10",
            prompt=str(cpm),
            demo=True,
            dinov2_model="resources/demo/tiny_models/dinov2",
        )
        assert result.target_points.shape == (1, 2)
    finally:
        shutil.move(tmp_path / "dinov2.json", record)


def test_class_prompt_needs_one_of_its_categories(in_project: Path, tmp_path: Path):
    prompt = save_demo_prompt(in_project, "class", tmp_path / "class.safetensors")
    with pytest.raises(MatchInputError, match=r"argument --category: 'horse' is not a category of the Class"):
        match(CAT_1, CAT_2, "10,10", prompt=str(prompt), demo=True, category="horse")
    assert match(CAT_1, CAT_2, "10,10", prompt=str(prompt), demo=True, category="cat").confidence.shape == (
        1,
    )


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_writes_json_csv_and_the_picture(in_project: Path, capsys: pytest.CaptureFixture):
    out = ["--json", "m.json", "--csv", "m.csv", "--out", "m.png", "--device", "cpu"]
    args = [CAT_1, CAT_2, "--text", "a photo of a {category}", "--category", "cat", "--demo"]
    assert main(["match", *args, "--grid", "2", "--gt", "1,1;2,2;3,3;4,4", "--method", "nn", *out]) == 0
    data = json.loads(Path("m.json").read_text())
    table = pd.read_csv("m.csv")
    assert data["method"] == "nn" and data["settings"]["demo"] is True
    from PIL import Image

    with Image.open(CAT_1) as image:
        assert [m["source"] for m in data["matches"]] == grid_points(2, image.size).tolist()
    np.testing.assert_array_equal(table[["target_x", "target_y"]].to_numpy(), data["predictions"]["nn"])
    np.testing.assert_allclose(table.confidence, [m["confidence"] for m in data["matches"]])
    assert list(table.columns) == [
        "point", "source_x", "source_y", "target_x", "target_y", "confidence", "method", "gt_x", "gt_y",
        "error_px",
    ]  # fmt: skip
    assert Path("m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["match", *args, "--points", "10,10", "--device", "cpu"]) == 0  # JSON on stdout by default
    assert json.loads(capsys.readouterr().out)["matches"][0]["source"] == [10.0, 10.0]
    assert main(["match", *args, "--points", "10,10;9999,1", "--device", "cpu"]) == 2
    assert (
        "sd4match match: error: argument --points: point 1 (9999, 1) lies outside" in capsys.readouterr().err
    )


def test_package_match_is_the_api_after_its_modules_are_imported(in_project: Path):
    """``sd4match.match(...)`` stays the function (no submodule named ``match`` shadows it once imported)."""
    import sd4match
    import sd4match.match_cli  # noqa: F401  (imports every match module)

    request = {"text": "a photo of a {category}", "category": "cat", "demo": True, "device": "cpu"}
    result = sd4match.match(CAT_1, CAT_2, "10,10;20,30", method="nn", **request)
    expected = Matcher.from_request(method="nn", **request).match(CAT_1, CAT_2, [[10, 10], [20, 30]])
    np.testing.assert_array_equal(result.target_points, expected.target_points)
    np.testing.assert_array_equal(result.confidence, expected.confidence)
    assert result.method == "nn" and result.source_points.tolist() == [[10.0, 10.0], [20.0, 30.0]]


def test_cli_rejects_conflicting_arguments(capsys: pytest.CaptureFixture):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["match", "a.jpg", "b.jpg", "--points", "1,1", "--grid", "2", "--text", ""])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["match", "a.jpg", "b.jpg", "--points", "1,1", "--text", "", "--out", "x.gif"])
    assert "argument --out: x.gif must end with one of" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- the README's commands


def readme_match_commands() -> list[list[str]]:
    """Every `sd4match match ...` line of the README's bash code blocks, as words."""
    text = (REPO / "README.md").read_text()
    return [
        words
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if (words := shlex.split(line, comments=True))[:2] == ["sd4match", "match"]
    ]


def test_readme_match_commands_parse():
    """Every README `sd4match match` command is valid; the demo one names files the demo writes (it runs as
    written in the slow demo test, tests/test_workflow.py)."""
    commands = readme_match_commands()
    assert len(commands) == 3 and sum("--demo" in words for words in commands) == 1
    for words in commands:
        args = build_parser().parse_args(words[1:])
        assert args.command == "match" and (args.prompt or args.text)
    demo = next(words for words in commands if "--demo" in words)
    args = build_parser().parse_args(demo[1:])
    assert args.source.startswith("resources/demo/demo_custom/shapes/images/")
    assert args.prompt == "results/demo/prompts/spair/cpm/seed0/prompt.safetensors"
    assert args.out == "match.png" and args.grid == 4
