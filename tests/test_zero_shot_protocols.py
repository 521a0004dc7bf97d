"""The peers' protocols through ``run_zero_shot`` on the tiny models (issue 10 §3): DIFT's original frame
against DIFT's own computation (full upsampled maps), sd-dino's padded square for SD+DINO and a strided
DINO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd4match import baselines as B
from sd4match.data_sources import DatasetLocation, write_location
from sd4match.datasets import write_pairs_table
from sd4match.evaluation import MatchingSettings
from sd4match.evaluation_job import JobOutputs, JobSettings, SplitInputs
from sd4match.features import SDFeaturizer
from sd4match.models import ModelRecord, load_stable_diffusion, write_model_record
from sd4match.peer_protocols import PaddedFrameScorer, dift_pixels, raw_ensemble_features
from sd4match.prompts import encode_text
from sd4match.tiny_models import (
    TEXT_HIDDEN_SIZE,
    build_tiny_clip_vision,
    build_tiny_dino_vit,
    build_tiny_dinov2,
    build_tiny_stable_diffusion,
)
from sd4match.zero_shot import Captioner, run_zero_shot

KPS = [[5.0, 7.0], [40.0, 30.0], [70.0, 50.0]]
BBOX = [0.0, 0.0, 79.0, 59.0]
MATCHING = {"methods": ["nn", "kernel_softmax"], "kernel_sigma": 7.0, "softmax_temperature": 0.04}
FEATURES = {"precision": "fp32", "max_unet_batch": 8, "up_block_index": 1, "compile": False,
            "channels_last": False}  # fmt: skip
ALPHAS = [0.05, 0.1, 0.15]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models with their records, five 80 x 60 images and a pairs table of four pairs (one flipped)."""
    root = tmp_path_factory.mktemp("zero_shot_protocols")
    folders = {
        "sd21": build_tiny_stable_diffusion(root / "sd21", variant="sd21"),
        "sd15": build_tiny_stable_diffusion(root / "sd15", variant="sd15"),
        "dinov2": build_tiny_dinov2(root / "dinov2"),
        "dino": build_tiny_dino_vit(root / "dino"),
        "clip": build_tiny_clip_vision(root / "clip"),
    }
    records = {}
    for name, folder in folders.items():
        records[name] = root / f"{name}.json"
        write_model_record(ModelRecord(name, name, "main", "x", str(folder), "local"), records[name])
    captioner = B.build_tiny_implicit_captioner_weights(
        root / "captioner.pth", root / "clip", TEXT_HIDDEN_SIZE
    )
    rng = np.random.default_rng(3)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    links = [(0, 1, "cat", False), (1, 2, "cat", False), (3, 4, "dog", False), (4, 3, "dog", True)]
    pairs = pd.DataFrame({
        "pair_id": [f"p{i}" for i in range(4)], "category": [c for _, _, c, _ in links],
        "src_image": [f"im{a}.png" for a, _, _, _ in links],
        "trg_image": [f"im{b}.png" for _, b, _, _ in links],
        "src_width": 80, "src_height": 60, "trg_width": 80, "trg_height": 60,
        "src_kps": [KPS] * 4, "trg_kps": [KPS[::-1]] * 4, "src_bbox": [BBOX] * 4, "trg_bbox": [BBOX] * 4,
        "flip": [f for _, _, _, f in links], "n_kps": 3, "threshold_kind": "bbox",
        "dataset": "spair", "split": "test",
    })  # fmt: skip
    write_pairs_table(pairs, root / "pairs.parquet")
    write_location(DatasetLocation("spair", str(root)), root / "fetch.json")
    return {"root": root, "records": records, "captioner": captioner, "pairs": pairs, "folders": folders}


def _run(world, method: dict, records: dict, tmp_path: Path, seed: int = 0, **kwargs) -> pd.DataFrame:
    root = world["root"]
    split = SplitInputs(root / "pairs.parquet", root / "fetch.json")
    settings = JobSettings(FEATURES, MATCHING, ALPHAS, None, 64, seed, "cpu")
    outputs = JobOutputs(tmp_path / "per_pair.csv", tmp_path / "summary.csv")
    run_zero_shot(method, records, split, settings, outputs, **kwargs)
    return pd.read_csv(tmp_path / "per_pair.csv")


def test_raw_ensemble_features_give_each_copy_its_own_vae_sample(world):
    featurizer = SDFeaturizer(load_stable_diffusion(world["folders"]["sd21"]))
    pixels = dift_pixels([Image.open(world["root"] / "im0.png")], 64)
    with torch.no_grad():
        hidden = encode_text(featurizer.text_encoder, featurizer.tokenizer, ["a photo of a cat"])
    raw = raw_ensemble_features(featurizer, pixels, hidden, 261, 3, torch.Generator().manual_seed(5))
    # by hand, as DIFT: 3 posterior samples (3 draws of eps), then 3 noise draws, UNet, mean; no normalisation
    generator = torch.Generator().manual_seed(5)
    mean, std = featurizer.latent_distribution(pixels)
    latents = (
        mean + std * torch.randn((3, *mean.shape[1:]), generator=generator)
    ) * featurizer.scaling_factor
    assert not torch.equal(latents[0], latents[1])
    noisy = featurizer.add_noise(latents, torch.randn(latents.shape, generator=generator), 261)
    expected = featurizer.truncated_unet(noisy, 261, hidden.expand(3, -1, -1)).mean(dim=0, keepdim=True)
    assert torch.allclose(raw, expected, atol=1e-5)
    assert raw.shape == (1, 64, 4, 4) and not torch.allclose(raw.norm(dim=1), torch.ones(1, 4, 4))


def _dift_reference(world, pair: pd.Series, seed: int) -> list[int]:
    """DIFT's eval_spair.py on one pair, literally: upsample both raw maps to the image, index the source at
    the keypoint, normalise the whole target, argmax, count ``dist / threshold <= alpha``."""
    from sd4match.datasets import load_image
    from sd4match.evaluation import ImageKey, image_seed

    featurizer = SDFeaturizer(load_stable_diffusion(world["folders"]["sd21"]))
    with torch.no_grad():
        hidden = encode_text(featurizer.text_encoder, featurizer.tokenizer, [f"a photo of a {pair.category}"])
    maps = []
    for name in (pair.src_image, pair.trg_image):
        key = ImageKey(name, bool(pair.flip), pair.category)
        pixels = dift_pixels([load_image(world["root"], name, flip=key.flip)], 64)
        generator = torch.Generator().manual_seed(image_seed(seed, key))
        raw = raw_ensemble_features(featurizer, pixels, hidden, 261, 2, generator)
        maps.append(torch.nn.Upsample(size=(60, 80), mode="bilinear")(raw))
    src_ft, trg_ft = maps
    trg_vec = F.normalize(trg_ft.view(trg_ft.shape[1], -1).transpose(0, 1))
    correct = [0, 0, 0]
    for (x, y), (tx, ty) in zip(pair.src_kps, pair.trg_kps, strict=True):
        src_vec = F.normalize(src_ft[0, :, int(y), int(x)].view(1, -1)).transpose(0, 1)
        cos_map = torch.mm(trg_vec, src_vec).view(60, 80).numpy()
        my, mx = np.unravel_index(cos_map.argmax(), cos_map.shape)
        dist = ((mx - tx) ** 2 + (my - ty) ** 2) ** 0.5
        correct = [c + int(dist / 79.0 <= a) for c, a in zip(correct, ALPHAS, strict=True)]
    return correct


def test_dift_original_frame_protocol_is_difts_own_evaluation(world, tmp_path):
    method = {"kind": "sd", "model": "sd21", "prompt": "a photo of a {category}", "timestep": 261,
              "ensemble": 2, "protocol": "original", "family": "stable_diffusion"}  # fmt: skip
    per_pair = _run(world, method, {"model": world["records"]["sd21"]}, tmp_path, seed=4)
    assert set(per_pair["method"]) == {"nn"}  # DIFT matches by nearest neighbour only
    assert set(per_pair["threshold"]) == {79.0}  # the original box's max side
    for pair in (world["pairs"].iloc[0], world["pairs"].iloc[3]):  # a plain and a flipped pair
        rows = per_pair[per_pair["pair_id"] == pair.pair_id].sort_values("alpha")
        assert rows["n_correct"].tolist() == _dift_reference(world, pair, seed=4), pair.pair_id


def test_sd_dino_padded_protocol_scores_in_the_padded_square(world, tmp_path):
    records = {"model": world["records"]["sd15"], "dino_model": world["records"]["dinov2"],
               "clip_model": world["records"]["clip"]}  # fmt: skip
    method = {"kind": "sd_dino", "model": "sd15", "dino_model": "dinov2", "prompt": "implicit",
              "image_size": 128, "dino_image_size": 112, "timestep": 100, "ensemble": 1,
              "protocol": "padded", "noise_seed": 42}  # fmt: skip
    captioner = Captioner(world["captioner"], {"prefix": B.ODISE_PREFIX})
    per_pair = _run(world, method, records, tmp_path, captioner=captioner)
    assert set(per_pair["method"]) == {"nn"}
    assert per_pair["threshold"].unique() == pytest.approx([79.0 * 112 / 80])  # box side x the target's scale
    # the same features (padded inputs, noise seeded 42, not the run's seed 0) through sd-dino's scorer
    from sd4match.zero_shot import _sd_dino_featurizer

    featurizer = _sd_dino_featurizer(
        method, records, captioner, JobSettings(FEATURES, MATCHING, ALPHAS, None, 64, 0)
    )
    assert (featurizer.settings.seed, featurizer.settings.preprocess) == (42, "pad")
    reference = B.evaluate_sd_dino(world["pairs"], featurizer, MatchingSettings(64, ("nn",), tuple(ALPHAS)),
                                   world["root"], scorer=PaddedFrameScorer(112, tuple(ALPHAS)))  # fmt: skip
    assert per_pair["n_correct"].tolist() == reference["n_correct"].tolist()


def test_vit_key_facet_with_stride_in_the_padded_square(world, tmp_path):
    method = {"kind": "vit", "model": "dino", "family": "dino", "image_size": 64, "facet": "key", "layer": 1,
              "stride": 4, "protocol": "padded"}  # fmt: skip
    per_pair = _run(world, method, {"model": world["records"]["dino"]}, tmp_path)
    assert set(per_pair["method"]) == {"nn"}
    assert per_pair["threshold"].unique() == pytest.approx([79.0 * 64 / 80])
    squashed = _run(world, method | {"protocol": "squashed"}, {"model": world["records"]["dino"]}, tmp_path)
    assert set(squashed["method"]) == {"nn", "kernel_softmax"}  # our protocol: every matching method
    assert squashed["threshold"].unique() == pytest.approx([79.0 * 64 / 80])  # the 64 px squashed box width
    with pytest.raises(ValueError, match="protocol 'original' is not one of \\('squashed', 'padded'\\)"):
        _run(world, method | {"protocol": "original"}, {"model": world["records"]["dino"]}, tmp_path)
