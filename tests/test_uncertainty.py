"""Bootstrap intervals over pairs, paired differences and the seed spread against closed-form results."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sd4match.metrics import PER_PAIR_COLUMNS, summarise
from sd4match.uncertainty import (
    INTERVAL_COLUMNS,
    BootstrapSettings,
    cell_interval,
    format_interval,
    format_spread,
    interval_columns,
    intervals_from_file,
    method_note,
    pair_counts,
    paired_difference,
    paired_difference_from_files,
    paper_within,
    resample_counts,
    seed_spread,
    seed_spread_from_files,
    summary_with_intervals,
)

Z_975 = 1.959963984540054  # standard normal 97.5% quantile


def per_pair(
    correct: list[int],
    n_kps: int | list[int] = 1,
    category: str | list[str] = "cat",
    methods: tuple[str, ...] = ("nn",),
    alphas: tuple[float, ...] = (0.1,),
    prefix: str = "p",
) -> pd.DataFrame:
    """A per-pair table: pair i has ``correct[i]`` of ``n_kps`` keypoints right for every method/alpha."""
    n = len(correct)
    kps = [n_kps] * n if isinstance(n_kps, int) else n_kps
    cats = [category] * n if isinstance(category, str) else category
    rows = [
        {
            "pair_id": f"{prefix}{i:05d}",
            "category": cats[i],
            "method": m,
            "alpha": a,
            "n_kps": kps[i],
            "n_correct": correct[i],
            "threshold": 100.0,
            "pck": 100.0 * correct[i] / kps[i],
        }
        for i in range(n)
        for m in methods
        for a in alphas
    ]
    return pd.DataFrame(rows, columns=list(PER_PAIR_COLUMNS))


def bernoulli(n: int, p: float, **kwargs) -> pd.DataFrame:
    """``n`` pairs with one keypoint each, the first ``round(p * n)`` correct: per-pair PCK 100 or 0."""
    k = round(p * n)
    return per_pair([1] * k + [0] * (n - k), **kwargs)


def row(summary: pd.DataFrame, category: str, method: str = "nn", alpha: float = 0.1) -> pd.Series:
    sel = summary[
        (summary["category"] == category) & (summary["method"] == method) & (summary["alpha"] == alpha)
    ]
    assert len(sel) == 1
    return sel.iloc[0]


# --------------------------------------------------------------------------------------- one evaluation


def test_all_correct_pairs_give_a_zero_width_interval():
    frame = per_pair(
        [3, 5, 2, 4], n_kps=[3, 5, 2, 4], category=["a", "a", "b", "b"], methods=("nn", "kernel_softmax")
    )
    out = summary_with_intervals(frame)
    assert list(out.columns) == list(INTERVAL_COLUMNS)
    assert set(out["category"]) == {"a", "b", "All"} and len(out) == 6
    for kind in ("pck_per_image", "pck_per_keypoint"):
        assert (out[kind] == 100.0).all()
        assert (out[f"{kind}_lo"] == 100.0).all() and (out[f"{kind}_hi"] == 100.0).all()


def test_point_estimates_are_exactly_those_of_summarise():
    rng = np.random.default_rng(3)
    kps = rng.integers(1, 12, 60).tolist()
    correct = [int(rng.integers(0, k + 1)) for k in kps]
    cats = [f"c{i % 4}" for i in range(60)]
    frame = per_pair(correct, kps, cats, methods=("nn", "soft_argmax"), alphas=(0.05, 0.1))
    out = summary_with_intervals(frame, BootstrapSettings(resamples=200))
    pd.testing.assert_frame_equal(out[list(summarise(frame).columns)], summarise(frame))
    assert (out["pck_per_image_lo"] <= out["pck_per_image_hi"]).all()
    assert (out["pck_per_keypoint_lo"] <= out["pck_per_keypoint_hi"]).all()


def exact_mean_distribution(values: list[float]) -> dict[float, float]:
    """The bootstrap distribution of the mean, by enumerating all n^n ordered resamples."""
    n = len(values)
    dist: dict[float, float] = {}
    for draw in itertools.product(values, repeat=n):
        mean = sum(draw) / n
        dist[mean] = dist.get(mean, 0.0) + 1.0 / n**n
    return dict(sorted(dist.items()))


def exact_quantile(dist: dict[float, float], q: float) -> float:
    """Smallest value whose cumulative probability reaches q."""
    total = 0.0
    for value, p in dist.items():
        total += p
        if total >= q:
            return value
    raise AssertionError("unreachable")


def test_percentile_bounds_match_the_enumerated_bootstrap_distribution():
    # four pairs, PCK 0, 100, 100, 100: the resampled mean is 25 * Binomial(4, 3/4); cumulative probabilities
    # 1/256, 13/256, 67/256, 175/256, 1 lie far from the quantile levels used, so B = 20000 hits them exactly
    frame = per_pair([0, 4, 4, 4], n_kps=4)
    dist = exact_mean_distribution([0.0, 100.0, 100.0, 100.0])
    assert dist == pytest.approx(
        {0.0: 1 / 256, 25.0: 12 / 256, 50.0: 54 / 256, 75.0: 108 / 256, 100.0: 81 / 256}
    )
    for confidence in (0.95, 0.6):
        settings = BootstrapSettings(resamples=20_000, confidence=confidence)
        out = row(summary_with_intervals(frame, settings), "All")
        lo, hi = settings.quantiles
        assert (out["pck_per_image_lo"], out["pck_per_image_hi"]) == (
            exact_quantile(dist, lo),
            exact_quantile(dist, hi),
        )
    assert (exact_quantile(dist, 0.025), exact_quantile(dist, 0.975)) == (25.0, 100.0)
    assert (exact_quantile(dist, 0.2), exact_quantile(dist, 0.8)) == (50.0, 100.0)


def test_resample_counts_follow_the_uniform_with_replacement_bootstrap():
    # every resample draws n pairs; the counts of one pair are Binomial(n, 1/n): mean 1, variance (n-1)/n
    settings = BootstrapSettings(resamples=20_000, chunk=3000)
    counts = np.vstack(list(resample_counts(4, settings, "cat")))
    assert counts.shape == (20_000, 4) and (counts.sum(axis=1) == 4).all()
    means = (counts @ np.array([0.0, 100.0, 100.0, 100.0])) / 4
    # closed form: mean 75, variance p (1 - p) / n * 100^2 = 468.75; 5 sigma of the Monte-Carlo error
    assert abs(means.mean() - 75.0) < 5 * math.sqrt(468.75 / 20_000)
    assert means.var() == pytest.approx(468.75, rel=0.05)
    assert counts[:, 0].var() == pytest.approx(3 / 4, rel=0.05)


def test_bernoulli_pairs_match_the_normal_approximation():
    # 2000 pairs, 70% all-correct: p +- 1.96 sqrt(p (1 - p) / n) = 70 +- 2.008; default B = 2000 resamples
    out = row(summary_with_intervals(bernoulli(2000, 0.7)), "All")
    half = 100 * Z_975 * math.sqrt(0.7 * 0.3 / 2000)
    assert out["pck_per_image"] == 70.0
    assert out["pck_per_image_lo"] == pytest.approx(70.0 - half, abs=0.25)
    assert out["pck_per_image_hi"] == pytest.approx(70.0 + half, abs=0.25)


def test_per_keypoint_equals_per_image_when_every_pair_has_the_same_keypoint_count():
    rng = np.random.default_rng(5)
    correct = rng.integers(0, 5, 300).tolist()
    frame = per_pair(
        correct, n_kps=4, category=[f"c{i % 3}" for i in range(300)], methods=("nn", "kernel_softmax")
    )
    out = summary_with_intervals(frame, BootstrapSettings(resamples=500))
    for suffix in ("", "_lo", "_hi"):
        np.testing.assert_allclose(
            out[f"pck_per_keypoint{suffix}"], out[f"pck_per_image{suffix}"], rtol=1e-13
        )
    assert (out["pck_per_image_hi"] - out["pck_per_image_lo"] > 0).all()


def test_per_keypoint_is_a_ratio_over_resampled_pairs():
    # pair 0 has 1 of 1 keypoint right, pair 1 0 of 3. Resamples {0,0}, {0,1}, {1,1} (probabilities 1/4, 1/2,
    # 1/4) give 100, 25, 0 per keypoint and 100, 50, 0 per image.
    frame = per_pair([1, 0], n_kps=[1, 3])
    out = row(summary_with_intervals(frame, BootstrapSettings(resamples=20_000, confidence=0.4)), "All")
    assert (out["pck_per_keypoint"], out["pck_per_image"]) == (25.0, 50.0)
    # quantiles 0.3 and 0.7 fall inside the middle atom
    assert (out["pck_per_keypoint_lo"], out["pck_per_keypoint_hi"]) == (25.0, 25.0)
    assert (out["pck_per_image_lo"], out["pck_per_image_hi"]) == (50.0, 50.0)


def test_fixed_seed_gives_identical_output_and_another_seed_differs():
    frame = bernoulli(500, 0.6, category=[f"c{i % 5}" for i in range(500)])
    first = summary_with_intervals(frame, BootstrapSettings(seed=7))
    pd.testing.assert_frame_equal(first, summary_with_intervals(frame, BootstrapSettings(seed=7)))
    assert not first.equals(summary_with_intervals(frame, BootstrapSettings(seed=8)))


def test_replicates_do_not_depend_on_chunking_row_order_or_other_categories():
    frame = bernoulli(240, 0.55, category=[f"c{i % 3}" for i in range(240)], methods=("nn", "soft_argmax"))
    reference = summary_with_intervals(frame, BootstrapSettings(resamples=300, chunk=300))
    chunked = summary_with_intervals(frame, BootstrapSettings(resamples=300, chunk=7))
    shuffled = summary_with_intervals(
        frame.sample(frac=1.0, random_state=0), BootstrapSettings(resamples=300)
    )
    pd.testing.assert_frame_equal(reference, chunked)
    pd.testing.assert_frame_equal(reference, shuffled)
    alone = summary_with_intervals(frame[frame["category"] == "c1"], BootstrapSettings(resamples=300))
    only_nn = summary_with_intervals(frame[frame["method"] == "nn"], BootstrapSettings(resamples=300))
    pd.testing.assert_series_equal(row(alone, "c1"), row(reference, "c1"), check_names=False)
    pd.testing.assert_series_equal(row(only_nn, "All"), row(reference, "All"), check_names=False)


def test_category_weighted_all_has_the_interval_of_sd_dinos_estimator():
    from sd4match.table_protocols import category_weighted_pck

    # category a: 3 pairs of 1 keypoint, all right; b: 1 pair of 5 keypoints, all wrong. Pooled per keypoint
    # All = 3 / 8 = 37.5; sd-dino's All = (3 * 100 + 1 * 0) / 4 = 75, and no replicate can move either
    frame = per_pair([1, 1, 1, 0], n_kps=[1, 1, 1, 5], category=["a", "a", "a", "b"])
    out = summary_with_intervals(frame)
    assert category_weighted_pck(out, "nn", 0.1, "test") == 75.0
    total = row(out, "All")
    assert (total["pck_per_keypoint_lo"], total["pck_per_keypoint_hi"]) == (37.5, 37.5)
    assert (total["pck_category_weighted_lo"], total["pck_category_weighted_hi"]) == (75.0, 75.0)
    # a category's value under sd-dino's estimator is its per-keypoint PCK, and so is its interval
    spread = per_pair([1, 0, 2, 1, 0, 1], n_kps=2, category=["a", "a", "a", "b", "b", "b"])
    out = summary_with_intervals(spread, BootstrapSettings(resamples=300))
    for category in ("a", "b"):
        cell = row(out, category)
        assert (cell["pck_category_weighted_lo"], cell["pck_category_weighted_hi"]) == (
            cell["pck_per_keypoint_lo"],
            cell["pck_per_keypoint_hi"],
        )
    # All: a = 50 and b = 33.3 with equal pair counts -> the mean of the two, inside its own interval
    total = row(out, "All")
    assert total["pck_category_weighted_lo"] <= (50.0 + 100.0 / 3) / 2 <= total["pck_category_weighted_hi"]


def test_all_is_stratified_by_category_unless_asked_otherwise():
    frame = bernoulli(400, 0.7)  # one category: the stratified All is that category's bootstrap
    out = summary_with_intervals(frame)
    pd.testing.assert_series_equal(
        row(out, "All").drop("category"), row(out, "cat").drop("category"), check_names=False
    )
    # two categories with PCK 100 and 0: stratified replicates keep 50/50, so All has no spread at all;
    # resampling every pair lets the mix vary: 50 +- 1.96 * sqrt(0.25 / 400) * 100 = 50 +- 4.9
    mixed = per_pair([1] * 200 + [0] * 200, category=["a"] * 200 + ["b"] * 200)
    strat = row(summary_with_intervals(mixed), "All")
    assert (strat["pck_per_image_lo"], strat["pck_per_image_hi"]) == (50.0, 50.0)
    pooled = row(summary_with_intervals(mixed, BootstrapSettings(stratified=False)), "All")
    half = 100 * Z_975 * math.sqrt(0.25 / 400)
    assert pooled["pck_per_image_lo"] == pytest.approx(50 - half, abs=0.5)
    assert pooled["pck_per_image_hi"] == pytest.approx(50 + half, abs=0.5)


def test_bad_per_pair_tables_name_the_problem():
    frame = per_pair([1, 0, 1], methods=("nn", "soft_argmax"))
    with pytest.raises(ValueError, match=r"t\.csv: pair 'p00001' has no row for method 'soft_argmax'"):
        pair_counts(frame.drop(index=3), "t.csv")
    with pytest.raises(ValueError, match=r"t\.csv: need 0 <= n_correct <= n_kps"):
        pair_counts(frame.assign(n_correct=2), "t.csv")
    with pytest.raises(ValueError, match=r"t\.csv: pair 'p00000' has several categories"):
        pair_counts(frame.assign(category=["a"] + ["b"] * 5), "t.csv")
    with pytest.raises(ValueError, match=r"t\.csv: missing columns \['n_kps'\]"):
        pair_counts(frame.drop(columns="n_kps"), "t.csv")
    with pytest.raises(ValueError, match="confidence"):
        BootstrapSettings(confidence=95)


def test_files_round_trip_with_string_pair_ids_and_labels(tmp_path: Path):
    # PF-Pascal pair ids are row indices: they must stay strings ("007" != "7")
    a = per_pair([1, 0, 1, 1], prefix="00", methods=("nn", "kernel_softmax"), alphas=(0.05, 0.1))
    a.to_csv(tmp_path / "a.csv", index=False)
    bernoulli(10, 0.5).to_csv(tmp_path / "b.csv", index=False)
    out = intervals_from_file(tmp_path / "a.csv", methods=["kernel_softmax"], alphas=[0.1])
    assert len(out) == 2 and set(out["method"]) == {"kernel_softmax"} and set(out["alpha"]) == {0.1}
    assert row(out, "All", "kernel_softmax")["pck_per_image"] == 75.0
    table = interval_columns({"ours": tmp_path / "a.csv", "dift": tmp_path / "b.csv"}, ["nn"], [0.1])
    assert table["label"].tolist() == ["ours", "ours", "dift", "dift"] and set(table["category"]) == {
        "cat",
        "All",
    }
    point, lo, hi = cell_interval(out, "All", "kernel_softmax", 0.1)
    assert (
        point == 75.0
        and lo <= point <= hi
        and (lo, hi) == tuple(out.iloc[1][["pck_per_image_lo", "pck_per_image_hi"]])
    )
    with pytest.raises(ValueError, match="expected one row for category='dog'"):
        cell_interval(out, "dog", "kernel_softmax", 0.1)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        intervals_from_file(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"a\.csv: no rows for methods=\['dino'\]"):
        intervals_from_file(tmp_path / "a.csv", methods=["dino"])


# ---------------------------------------------------------------------------------------- paired comparison


def test_paired_difference_of_identical_evaluations_is_exactly_zero():
    frame = bernoulli(300, 0.65, category=[f"c{i % 3}" for i in range(300)], methods=("nn", "kernel_softmax"))
    out = paired_difference(frame, frame.sample(frac=1.0, random_state=1))
    assert len(out) == 4 * 2 and set(out["category"]) == {"c0", "c1", "c2", "All"}
    value_columns = [c for c in out.columns if c.startswith("diff_")]
    assert (out[value_columns] == 0.0).all().all()


def test_paired_difference_follows_the_binomial_of_the_pairs_that_differ():
    # A and B agree on 1990 of 2000 pairs; B misses 10 pairs A gets right. Each resample's difference is
    # 100 / 2000 * (draws of those 10 pairs) ~ 0.05 * Binomial(2000, 1/200): at 80%, quantiles 0.1 and 0.9
    # are the binomial's 6 and 14 (cdf 5: 0.067, 6: 0.130, 13: 0.865, 14: 0.917)
    a = bernoulli(2000, 0.7)
    b = a.assign(n_correct=np.where(a.index.isin(range(10)), 0, a["n_correct"]))
    settings = BootstrapSettings(resamples=20_000, confidence=0.8)
    diff = row_of(paired_difference(a, b, settings, names=("a.csv", "b.csv")), "All")
    assert diff["diff_per_image"] == pytest.approx(0.5, abs=1e-12)
    assert (diff["diff_per_image_lo"], diff["diff_per_image_hi"]) == pytest.approx((0.3, 0.7), abs=1e-12)
    # unpaired, each evaluation alone is uncertain by about +-1.5 at 80%: the pairing is what makes it tight
    alone = row(summary_with_intervals(a, BootstrapSettings(confidence=0.8)), "All")
    assert alone["pck_per_image_hi"] - alone["pck_per_image_lo"] > 2.0


def row_of(diff: pd.DataFrame, category: str) -> pd.Series:
    sel = diff[diff["category"] == category]
    assert len(sel) == 1
    return sel.iloc[0]


def test_paired_difference_uses_the_same_resamples_as_each_interval():
    # A all correct, B a Bernoulli set: the difference's replicates are 100 minus B's; its bounds mirror B's
    a = per_pair([1] * 500)
    b = bernoulli(500, 0.8)
    diff = row_of(paired_difference(a, b), "All")
    alone = row(summary_with_intervals(b), "All")
    assert diff["diff_per_image"] == pytest.approx(20.0)
    assert diff["diff_per_image_lo"] == pytest.approx(100.0 - alone["pck_per_image_hi"], abs=1e-9)
    assert diff["diff_per_image_hi"] == pytest.approx(100.0 - alone["pck_per_image_lo"], abs=1e-9)


def test_paired_difference_across_matching_methods(tmp_path: Path):
    ours = per_pair([1, 1, 1, 0], methods=("nn", "kernel_softmax"))
    dift = per_pair([1, 0, 0, 0], methods=("nn", "kernel_softmax"))
    ours.to_csv(tmp_path / "ours.csv", index=False)
    dift.to_csv(tmp_path / "dift.csv", index=False)
    out = paired_difference_from_files(
        tmp_path / "ours.csv", tmp_path / "dift.csv", methods=("kernel_softmax", "nn")
    )
    assert out[["method_a", "method_b"]].drop_duplicates().values.tolist() == [["kernel_softmax", "nn"]]
    assert row_of(out, "All")["diff_per_image"] == 50.0


def test_paired_difference_of_different_pair_sets_names_both_files(tmp_path: Path):
    bernoulli(20, 0.5).to_csv(tmp_path / "spair_cpm.csv", index=False)
    bernoulli(21, 0.5).to_csv(tmp_path / "spair_dift.csv", index=False)
    with pytest.raises(
        ValueError, match=r"spair_cpm\.csv and .*spair_dift\.csv hold different pairs \(0 only"
    ):
        paired_difference_from_files(tmp_path / "spair_cpm.csv", tmp_path / "spair_dift.csv")
    other_kps = bernoulli(20, 0.5).assign(n_kps=2)
    with pytest.raises(ValueError, match="pair 'p00000' has a different number of keypoints in x and y"):
        paired_difference(bernoulli(20, 0.5), other_kps, names=("x", "y"))
    with pytest.raises(ValueError, match="x and y share no"):
        paired_difference(bernoulli(20, 0.5), bernoulli(20, 0.5, methods=("dino",)), names=("x", "y"))


# -------------------------------------------------------------------------------------------------- seeds


def summary(pck_image: float, pck_kp: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "category": ["cat", "All"],
            "method": ["kernel_softmax"] * 2,
            "alpha": [0.1] * 2,
            "n_pairs": [4, 4],
            "n_kps": [10, 10],
            "pck_per_image": [pck_image] * 2,
            "pck_per_keypoint": [pck_kp] * 2,
        }
    )


def test_seed_spread_is_mean_sample_std_min_and_max(tmp_path: Path):
    spread = seed_spread({0: summary(70.0, 60.0), 1: summary(72.0, 61.0), 2: summary(77.0, 65.0)})
    got = spread[spread["category"] == "All"].iloc[0]
    assert got["n_seeds"] == 3
    # mean 73; deviations -3, -1, 4: sample variance 26 / 2 = 13
    assert (got["pck_per_image_mean"], got["pck_per_image_min"], got["pck_per_image_max"]) == (
        73.0,
        70.0,
        77.0,
    )
    assert got["pck_per_image_std"] == pytest.approx(math.sqrt(13.0), abs=1e-12)
    assert got["pck_per_keypoint_mean"] == pytest.approx(62.0) and got[
        "pck_per_keypoint_std"
    ] == pytest.approx(math.sqrt(7.0))
    one = seed_spread({0: summary(70.0, 60.0)}).iloc[0]
    assert one["n_seeds"] == 1 and one["pck_per_image_mean"] == 70.0 and math.isnan(one["pck_per_image_std"])
    summary(70.0, 60.0).to_csv(tmp_path / "s0.csv", index=False)
    summary(72.0, 61.0).to_csv(tmp_path / "s1.csv", index=False)
    from_files = seed_spread_from_files({0: tmp_path / "s0.csv", 1: tmp_path / "s1.csv"})
    assert from_files["pck_per_image_std"].tolist() == pytest.approx([math.sqrt(2.0)] * 2)
    with pytest.raises(FileNotFoundError, match="seed 5 not found"):
        seed_spread_from_files({5: tmp_path / "s5.csv"})


def test_seed_spread_refuses_summaries_of_different_cells():
    other = summary(72.0, 61.0).assign(alpha=0.05)
    with pytest.raises(ValueError, match="seed 0 and seed 1 have different"):
        seed_spread({0: summary(70.0, 60.0), 1: other})


# --------------------------------------------------------------------------------------------- formatting


def test_compact_formatting_and_paper_number_inside():
    assert format_interval(75.3, 74.6, 76.0) == "75.3 [74.6, 76.0]"
    assert format_interval(75.25, 74.649, 76.0, digits=2) == "75.25 [74.65, 76.00]"
    assert format_interval(1.2, -0.3, 2.6, signed=True) == "+1.2 [-0.3, +2.6]"
    assert format_spread(73.0, math.sqrt(13.0), 3) == "73.0 ± 3.6 (3 seeds)"
    assert format_spread(73.0, float("nan"), 1) == "73.0 (1 seed)"
    assert paper_within(75.3, 74.6, 76.0) is True
    assert paper_within(76.05, 74.6, 76.0) is True  # 76.05 printed means [76.0, 76.1]: touches the interval
    assert paper_within(76.2, 74.6, 76.0) is False and paper_within(74.4, 74.6, 76.0) is False
    assert paper_within(None, 74.6, 76.0) is None and paper_within(float("nan"), 1.0, 2.0) is None
    assert method_note() == (
        "Intervals: 95% percentile bootstrap over image pairs (2000 resamples, seed 0), resampling pairs "
        "within each category; per keypoint resamples pairs too (ratio estimator)."
    )


def test_bounds_and_seed_spread_parts_compose_the_compact_forms():
    from sd4match.uncertainty import format_bounds, format_sd

    assert format_bounds(74.6, 76.0) == "[74.6, 76.0]"
    assert format_bounds(-0.3, 2.6, signed=True) == "[-0.3, +2.6]"
    assert format_sd(math.sqrt(13.0), 3) == "± 3.6 (3 seeds)"
    assert format_sd(float("nan"), 1) == "(1 seed)"
    assert f"75.3 {format_bounds(74.6, 76.0)}" == format_interval(75.3, 74.6, 76.0)
    assert f"73.0 {format_sd(math.sqrt(13.0), 3)}" == format_spread(73.0, math.sqrt(13.0), 3)
