"""The benchmark entry reports UNet passes exactly (timings are reported, never asserted)."""

import json

import pytest

from sd4match.bench import SD21_UNET_CONFIG, bench_features, main
from sd4match.tiny_models import build_tiny_stable_diffusion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("bench") / "sd21", seed=0)


@pytest.mark.parametrize(("ensemble", "max_batch", "passes"), [(8, 8, 1), (8, 4, 2), (3, 2, 2)])
def test_unet_passes_per_image(tiny_sd, ensemble, max_batch, passes):
    result = bench_features(tiny_sd, image_size=64, n_images=2, ensemble=ensemble, max_batch=max_batch)
    assert result.metrics["unet_passes_per_image"] == passes
    assert result.metrics["unet_samples_per_image"] == ensemble
    assert result.metrics["feature_grid"] == 64 / 16
    assert result.metrics["images_per_s"] > 0


def test_cli_appends_json(tiny_sd, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert (
        main(["features", "--model", str(tiny_sd), "--image-size", "64", "--images", "1", "--out", str(out)])
        == 0
    )
    record = json.loads(out.read_text().splitlines()[0])
    assert record["name"] == "features" and record["settings"]["image_size"] == 64
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_sd21_config_is_the_real_architecture():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(
        {
            **SD21_UNET_CONFIG,
            "block_out_channels": [32, 32, 64, 64],
            "attention_head_dim": [2, 2, 4, 4],
            "norm_num_groups": 8,
            "cross_attention_dim": 16,
        }
    )
    assert [type(b).__name__ for b in unet.up_blocks] == SD21_UNET_CONFIG["up_block_types"]


def test_evaluation_bench_counts_unet_passes_for_spair_test(tiny_sd):
    from sd4match.bench import bench_evaluation

    result = bench_evaluation(tiny_sd, image_size=64, ensemble=8, max_batch=8, pair_batch=4, repeats=1)
    assert result.metrics["single_unet_passes_spair_test"] == 481  # one call of 8 draws per distinct image
    assert (
        result.metrics["cpm_unet_passes_spair_test"] == 3059 * 8
    )  # ceil(12234 / 4) batches x 64 latents / 8
    assert result.metrics["cpm_pairs_per_s"] > 0 and result.metrics["single_pairs_per_s_spair_test"] > 0


@pytest.mark.parametrize("variant", ["single", "cpm"])
def test_training_bench_reports_per_pair_cost(tiny_sd, variant):
    from sd4match.bench import bench_training

    result = bench_training(tiny_sd, image_size=64, variant=variant, pairs_per_step=2, steps=1)
    metrics = result.metrics
    assert metrics["s_per_pair"] == pytest.approx(metrics["step_s"] / 2)
    assert metrics["peak_memory_mib_per_pair"] == pytest.approx(metrics["peak_memory_mib"] / 2)
