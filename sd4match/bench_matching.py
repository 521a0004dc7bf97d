"""Benchmark (not a test) of evaluation matching: pairs/s of the per-pair CPU path before issue 9 against the
batched on-device path, in one run, on the real 1280-channel features at a chosen grid (S = 16 x grid).

Before: the feature bank moved to the CPU as fp32, every pair scored alone with one correlation per
matching method (``match_keypoints`` per method, then ``score_predictions``). After: ``evaluate_pairs`` with
the features on ``device``, one correlation per pair for all methods, ``pair_batch`` pairs per call. Both
produce the per-pair table; the run checks the tables are equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from sd4match.bench import BenchResult, machine_description, peak_memory_mb
from sd4match.evaluation import (
    DEFAULT_PAIR_BATCH,
    ImageKey,
    MatchingSettings,
    _pair_keys,
    _squashed_targets,
    evaluate_pairs,
    score_predictions,
)
from sd4match.matching import MATCHING_METHODS, match_keypoints
from sd4match.metrics import PairScore, per_pair_frame

SPAIR_TEST_PAIRS = 12_234
CELLS_PER_GRID_STEP = 16  # S = 16 x feature grid side (up_blocks[1] of SD at S px)


def synthetic_pairs(
    n_images: int, n_pairs: int, image_size: int, kps_range: tuple[int, int], seed: int = 0
) -> pd.DataFrame:
    """A pairs table (docs/ARCHITECTURE.md) of random same-category pairs among ``n_images`` images in two
    categories, K keypoints drawn from ``kps_range`` per pair, SPair-style bbox thresholds."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pairs):
        category = f"c{i % 2}"
        members = [j for j in range(n_images) if j % 2 == i % 2]
        src, trg = rng.choice(members, size=2, replace=False)
        k = int(rng.integers(kps_range[0], kps_range[1] + 1))
        src_kps, trg_kps = (rng.uniform(0, image_size - 1, size=(k, 2)).tolist() for _ in range(2))
        x1, y1 = rng.uniform(0, image_size / 3, size=2)
        rows.append(
            {
                "pair_id": str(i),
                "category": category,
                "src_image": f"{category}/{src}.jpg",
                "trg_image": f"{category}/{trg}.jpg",
                "src_width": image_size,
                "src_height": image_size,
                "trg_width": image_size,
                "trg_height": image_size,
                "src_kps": src_kps,
                "trg_kps": trg_kps,
                "src_bbox": [x1, y1, x1 + image_size / 2, y1 + image_size / 2],
                "trg_bbox": [x1, y1, x1 + image_size / 2, y1 + image_size / 2],
                "flip": False,
                "n_kps": k,
                "threshold_kind": "bbox",
            }
        )
    return pd.DataFrame(rows)


def feature_bank(
    pairs: pd.DataFrame, channels: int, grid: int, device: str, seed: int = 0
) -> dict[ImageKey, torch.Tensor]:
    """L2-normalised random (C, grid, grid) features per distinct image, on ``device`` (as a featurizer
    leaves them)."""
    keys = sorted({k for row in pairs.itertuples() for k in _pair_keys(row)}, key=str)
    gen = torch.Generator().manual_seed(seed)
    return {
        key: F.normalize(torch.randn(channels, grid, grid, generator=gen), dim=0).to(device) for key in keys
    }


def per_pair_path(pairs: pd.DataFrame, features_for: Callable, settings: MatchingSettings) -> pd.DataFrame:
    """The evaluation loop before issue 9: CPU fp32 features, each pair alone, one correlation per method."""
    scores: list[PairScore] = []
    for _, group in pairs.groupby("category", sort=False):
        keys = sorted({k for row in group.itertuples() for k in _pair_keys(row)}, key=str)
        feats = dict(zip(keys, features_for(keys).cpu(), strict=True))
        for row in group.itertuples():
            src_key, trg_key = _pair_keys(row)
            kps = _squashed_targets(row, settings.image_size)[0]
            predictions = {
                method: match_keypoints(
                    feats[src_key][None].float(),
                    feats[trg_key][None].float(),
                    kps[None],
                    settings.image_size,
                    method,
                    temperature=settings.temperature,
                    sigma=settings.kernel_sigma,
                )[0]
                for method in settings.methods
            }
            scores.extend(score_predictions(row, predictions, settings))
    return per_pair_frame(scores)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], pd.DataFrame], device: str) -> tuple[float, pd.DataFrame]:
    """Wall time of one call of ``fn`` (device synchronised) and its result."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def bench_matching(
    grid: int = 24,
    channels: int = 1280,
    n_images: int = 40,
    n_pairs: int = 200,
    kps_range: tuple[int, int] = (3, 20),
    pair_batch: int = DEFAULT_PAIR_BATCH,
    methods: Sequence[str] = MATCHING_METHODS,
    device: str = "cpu",
    repeats: int = 1,
) -> BenchResult:
    """Evaluation pairs/s before (per-pair CPU path) vs after (batched on ``device``), in one run: the
    median over ``repeats`` interleaved timings of each."""
    image_size = CELLS_PER_GRID_STEP * grid
    pairs = synthetic_pairs(n_images, n_pairs, image_size, kps_range)
    bank = feature_bank(pairs, channels, grid, device)

    def features_for(keys: Sequence[ImageKey]) -> torch.Tensor:
        return torch.stack([bank[k] for k in keys])

    settings = MatchingSettings(image_size, tuple(methods), (0.05, 0.1, 0.15), pair_batch=pair_batch)
    evaluate_pairs(pairs.head(4), features_for, settings, device=device)  # warm-up (kernels, allocator)
    after_times, before_times = [], []
    for _ in range(repeats):  # interleaved, so a change of machine load hits both paths alike
        seconds, after = _timed(lambda: evaluate_pairs(pairs, features_for, settings, device=device), device)
        after_times.append(seconds)
        seconds, before = _timed(lambda: per_pair_path(pairs, features_for, settings), device)
        before_times.append(seconds)
    after_s, before_s = float(np.median(after_times)), float(np.median(before_times))
    equal = before.equals(after)
    metrics = {
        "before_pairs_per_s": n_pairs / before_s,
        "after_pairs_per_s": n_pairs / after_s,
        "speedup": before_s / after_s,
        "before_s_spair_test": SPAIR_TEST_PAIRS * before_s / n_pairs,
        "after_s_spair_test": SPAIR_TEST_PAIRS * after_s / n_pairs,
        "tables_equal": float(equal),
        "peak_memory_mib": peak_memory_mb(device),
    }
    settings_out = {
        "grid": grid,
        "image_size": image_size,
        "channels": channels,
        "images": n_images,
        "pairs": n_pairs,
        "kps_range": list(kps_range),
        "mean_kps": float(pairs["n_kps"].mean()),
        "pair_batch": pair_batch,
        "methods": list(methods),
        "repeats": repeats,
    }
    if not equal:
        raise RuntimeError(f"bench_matching: the batched path changed the per-pair table ({settings_out})")
    return BenchResult("matching", device, settings_out, metrics, machine_description(device))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the matching benchmark (for ``sd4match-bench matching`` or this module's ``main``)."""
    parser.add_argument("--grid", type=int, default=24, help="feature grid side (48 at the paper's 768 px)")
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--min-kps", type=int, default=3)
    parser.add_argument("--max-kps", type=int, default=20)
    parser.add_argument("--pair-batch", type=int, default=DEFAULT_PAIR_BATCH)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timings per path (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def from_args(args: argparse.Namespace) -> BenchResult:
    """Run ``bench_matching`` with parsed ``add_arguments`` options."""
    return bench_matching(
        grid=args.grid,
        channels=args.channels,
        n_images=args.images,
        n_pairs=args.pairs,
        kps_range=(args.min_kps, args.max_kps),
        pair_batch=args.pair_batch,
        device=args.device,
        repeats=args.repeats,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m sd4match.bench_matching [--grid 48 ...] [--out file]``: prints one JSON line."""
    parser = argparse.ArgumentParser(prog="sd4match-bench matching", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help="append the JSON result as one line to this file")
    args = parser.parse_args(argv)
    line = json.dumps(asdict(from_args(args)), sort_keys=True)
    print(line)
    if args.out:
        with open(args.out, "a") as stream:
            stream.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
