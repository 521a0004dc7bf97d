"""How sure each PCK is: bootstrap intervals over pairs, paired bootstrap differences between two
evaluations of the same pairs, and the spread of a summary value across training seeds (issue 12).

Method (stated in every table that prints these numbers, see ``METHOD_NOTE``):
- Resampling unit: the image pair. A replicate draws, within each category, as many pairs as the category
  has, with replacement (multinomial counts); the per-category replicate values and the ``All`` value come
  from the same draw. ``All`` is therefore a category-stratified bootstrap: the benchmarks fix the number of
  pairs per category, so a replicate keeps it fixed too (``stratified=False`` resamples ``All`` over every
  pair instead).
- Statistics per replicate are the point estimators of ``sd4match.metrics.summarise``: PCK per image is the
  mean of per-pair PCK (``All``: over all pairs, not over categories); PCK per keypoint is the ratio
  ``sum(n_correct) / sum(n_kps)`` of the resampled pairs; sd-dino's "All" (``pck_category_weighted``,
  ``sd4match.table_protocols``) is the categories' per-keypoint replicates averaged with the categories'
  pair counts as fixed weights (the same per-category draws, whatever ``stratified`` says); for a category
  it is its per-keypoint PCK.
- Interval: percentile bootstrap (the ``(1 - c) / 2`` and ``(1 + c) / 2`` quantiles of the replicates,
  numpy's linear interpolation); B = 2000 resamples and seed 0 by default.
- Every category draws from its own generator, seeded by (seed, CRC-32 of the category name): its
  replicates do not depend on the other categories, on the matching methods or alphas in the file, or on
  the chunk size, and two files with the same pairs get the same replicates (the paired bootstrap).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sd4match.metrics import ALL_CATEGORY, SUMMARY_COLUMNS, summarise

PCK_KINDS: tuple[str, ...] = ("pck_per_image", "pck_per_keypoint")
CATEGORY_WEIGHTED = "pck_category_weighted"  # sd-dino's All (sd4match.table_protocols.category_weighted_pck)
BOUND_KINDS: tuple[str, ...] = (*PCK_KINDS, CATEGORY_WEIGHTED)  # the estimators with intervals
INTERVAL_METHOD = "percentile bootstrap over pairs, stratified by category"
PathLike = str | os.PathLike[str]
_REQUIRED = ("pair_id", "category", "method", "alpha", "n_kps", "n_correct")
_KEYS = ["category", "method", "alpha"]


@dataclass(frozen=True)
class BootstrapSettings:
    """Resamples, confidence level and seed of the pair bootstrap; ``chunk`` resamples are drawn at once,
    bounding memory to ``chunk x pairs-per-category`` counts."""

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    stratified: bool = True
    chunk: int = 250

    def __post_init__(self) -> None:
        if self.resamples < 1 or self.chunk < 1:
            raise ValueError(f"BootstrapSettings: resamples and chunk must be >= 1, got {self}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"BootstrapSettings: confidence must be in (0, 1), got {self.confidence}")
        if self.seed < 0:
            raise ValueError(f"BootstrapSettings: seed must be >= 0, got {self.seed}")

    @property
    def quantiles(self) -> tuple[float, float]:
        """Lower and upper quantile of the percentile interval."""
        tail = (1.0 - self.confidence) / 2.0
        return tail, 1.0 - tail


METHOD_NOTE = (
    "Intervals: {pct:g}% percentile bootstrap over image pairs ({resamples} resamples, seed {seed}), "
    "resampling pairs within each category; per keypoint resamples pairs too (ratio estimator)."
)


def method_note(settings: BootstrapSettings = BootstrapSettings()) -> str:
    """One sentence a table prints under its numbers: how the intervals were computed."""
    return METHOD_NOTE.format(pct=100 * settings.confidence, resamples=settings.resamples, seed=settings.seed)


# ----------------------------------------------------------------------------------------------------------
# Per-pair tables in wide form
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairCounts:
    """One evaluation's per-pair counts: pairs sorted by (category, pair_id), a column per (method, alpha)."""

    pair_ids: np.ndarray  # (N,) str
    categories: np.ndarray  # (N,) str
    n_kps: np.ndarray  # (N,) float64
    n_correct: np.ndarray  # (N, M) float64
    columns: tuple[tuple[str, float], ...]  # (method, alpha) of each column

    def strata(self) -> dict[str, np.ndarray]:
        """Row indices of each category, in sorted category order."""
        return {c: np.flatnonzero(self.categories == c) for c in sorted(set(self.categories))}


def read_per_pair(path: PathLike) -> pd.DataFrame:
    """Read a per-pair CSV (``sd4match.metrics.PER_PAIR_COLUMNS``), ids and names as strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-pair table not found: {path}")
    frame = pd.read_csv(path, dtype={"pair_id": str, "category": str, "method": str})
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"per-pair table {path}: missing columns {missing}")
    return frame


def select(
    per_pair: pd.DataFrame, methods: Sequence[str] | None = None, alphas: Sequence[float] | None = None
) -> pd.DataFrame:
    """Rows of the given matching methods and alphas (None keeps all); the pair set is unchanged."""
    keep = np.ones(len(per_pair), dtype=bool)
    if methods is not None:
        keep &= per_pair["method"].isin(list(methods)).to_numpy()
    if alphas is not None:
        alpha = per_pair["alpha"].to_numpy(dtype=np.float64)
        keep &= np.isclose(alpha[:, None], np.asarray(alphas, dtype=np.float64)[None, :]).any(axis=1)
    return per_pair.loc[keep]


def pair_counts(per_pair: pd.DataFrame, where: str) -> PairCounts:
    """Wide per-pair counts; every pair must have one category, one n_kps and every (method, alpha) row."""
    missing = [c for c in _REQUIRED if c not in per_pair.columns]
    if missing:
        raise ValueError(f"per-pair table {where}: missing columns {missing}")
    if per_pair.empty:
        raise ValueError(f"per-pair table {where}: no rows")
    frame = per_pair.astype({"pair_id": str, "category": str, "method": str, "alpha": float})
    bad = (frame["n_kps"] <= 0) | (frame["n_correct"] < 0) | (frame["n_correct"] > frame["n_kps"])
    if bad.any():
        row = frame.loc[bad].iloc[0]
        raise ValueError(
            f"per-pair table {where}: need 0 <= n_correct <= n_kps and n_kps > 0; pair {row['pair_id']!r} "
            f"has n_correct={row['n_correct']}, n_kps={row['n_kps']}"
        )
    per_pair_info = frame.groupby("pair_id", sort=False).agg(
        n_categories=("category", "nunique"), n_kps_values=("n_kps", "nunique")
    )
    inconsistent = per_pair_info[(per_pair_info["n_categories"] > 1) | (per_pair_info["n_kps_values"] > 1)]
    if len(inconsistent):
        raise ValueError(
            f"per-pair table {where}: pair {inconsistent.index[0]!r} has several categories or n_kps values"
        )
    if frame.duplicated(subset=["pair_id", "method", "alpha"]).any():
        first = frame.loc[frame.duplicated(subset=["pair_id", "method", "alpha"])].iloc[0]
        raise ValueError(
            f"per-pair table {where}: duplicated row (pair_id, method, alpha) = "
            f"{(first['pair_id'], first['method'], first['alpha'])}"
        )
    wide = frame.pivot(index="pair_id", columns=["method", "alpha"], values="n_correct")
    if wide.isna().any().any():
        absent = wide.isna().stack(level=[0, 1], future_stack=True)
        pair, method, alpha = absent[absent].index[0]
        raise ValueError(
            f"per-pair table {where}: pair {pair!r} has no row for method {method!r}, alpha {alpha:g} "
            "(every pair needs every (method, alpha))"
        )
    info = frame.drop_duplicates("pair_id").set_index("pair_id")[["category", "n_kps"]]
    info = info.loc[wide.index].reset_index().sort_values(["category", "pair_id"], kind="stable")
    wide = wide.loc[info["pair_id"]].sort_index(axis=1)
    return PairCounts(
        pair_ids=info["pair_id"].to_numpy(dtype=str),
        categories=info["category"].to_numpy(dtype=str),
        n_kps=info["n_kps"].to_numpy(dtype=np.float64),
        n_correct=wide.to_numpy(dtype=np.float64),
        columns=tuple((str(m), float(a)) for m, a in wide.columns),
    )


# ----------------------------------------------------------------------------------------------------------
# The bootstrap engine
# ----------------------------------------------------------------------------------------------------------


def stream(seed: int, stratum: str) -> np.random.Generator:
    """The generator of one stratum: seeded by the bootstrap seed and the stratum's name."""
    return np.random.default_rng([seed, zlib.crc32(stratum.encode())])


def resample_counts(n: int, settings: BootstrapSettings, stratum: str) -> Iterator[np.ndarray]:
    """Blocks of at most ``settings.chunk`` rows of multinomial counts: how often each of ``n`` pairs is
    drawn in one resample of ``n`` pairs with replacement."""
    rng = stream(settings.seed, stratum)
    pvals = np.full(n, 1.0 / n)
    for start in range(0, settings.resamples, settings.chunk):
        size = min(settings.chunk, settings.resamples - start)
        yield rng.multinomial(n, pvals, size=size).astype(np.float64)


def replicate_sums(
    values: np.ndarray, strata: Mapping[str, np.ndarray], settings: BootstrapSettings
) -> dict[str, np.ndarray]:
    """Per stratum, the ``(B, P)`` sums of the ``(N, P)`` per-pair ``values`` over each resample, plus
    ``All`` (stratified: the strata's sums added; else its own resample of every pair)."""
    sums = {
        name: np.vstack([w @ values[rows] for w in resample_counts(len(rows), settings, name)])
        for name, rows in strata.items()
    }
    if settings.stratified:
        sums[ALL_CATEGORY] = np.sum(list(sums.values()), axis=0)
    else:
        sums[ALL_CATEGORY] = np.vstack(
            [w @ values for w in resample_counts(len(values), settings, ALL_CATEGORY)]
        )
    return sums


def _pck(counts: PairCounts) -> np.ndarray:
    """``(N, M)`` per-pair PCK in percent."""
    return 100.0 * counts.n_correct / counts.n_kps[:, None]


def _value_matrix(counts: PairCounts) -> np.ndarray:
    """Per-pair values whose resampled sums give both statistics: ``[pck % (M) | n_correct (M) | n_kps]``."""
    return np.hstack([_pck(counts), counts.n_correct, counts.n_kps[:, None]])


def statistics_from_sums(sums: np.ndarray, n_pairs: int, m: int) -> dict[str, np.ndarray]:
    """``(B, M)`` replicates of PCK per image (mean per-pair PCK) and per keypoint (pooled ratio)."""
    return {
        "pck_per_image": sums[:, :m] / n_pairs,
        "pck_per_keypoint": 100.0 * sums[:, m : 2 * m] / sums[:, 2 * m : 2 * m + 1],
    }


def percentile_interval(replicates: np.ndarray, settings: BootstrapSettings) -> np.ndarray:
    """``(2, M)`` lower and upper percentile bounds of ``(B, M)`` replicates."""
    return np.quantile(replicates, settings.quantiles, axis=0)


def _n_pairs(counts: PairCounts) -> dict[str, int]:
    sizes = {c: len(rows) for c, rows in counts.strata().items()}
    return sizes | {ALL_CATEGORY: len(counts.pair_ids)}


# ----------------------------------------------------------------------------------------------------------
# Intervals of one evaluation
# ----------------------------------------------------------------------------------------------------------


def bootstrap_bounds(
    counts: PairCounts, settings: BootstrapSettings = BootstrapSettings()
) -> dict[str, dict[str, np.ndarray]]:
    """Per category and ``All``, per PCK kind: the ``(2, M)`` interval bounds of each (method, alpha)."""
    m = len(counts.columns)
    sums = replicate_sums(_value_matrix(counts), counts.strata(), settings)
    n_pairs = _n_pairs(counts)
    stats = {name: statistics_from_sums(s, n_pairs[name], m) for name, s in sums.items()}
    _add_category_weighted(stats, n_pairs)
    return {
        name: {kind: percentile_interval(reps, settings) for kind, reps in kinds.items()}
        for name, kinds in stats.items()
    }


def _add_category_weighted(stats: dict[str, dict[str, np.ndarray]], n_pairs: Mapping[str, int]) -> None:
    """Add the ``(B, M)`` replicates of sd-dino's estimator: a category's per-keypoint PCK, and for ``All``
    the categories' per-keypoint replicates weighted by their (fixed) pair counts."""
    categories = [name for name in stats if name != ALL_CATEGORY]
    for name in categories:
        stats[name][CATEGORY_WEIGHTED] = stats[name]["pck_per_keypoint"]
    weights = np.array([n_pairs[name] for name in categories], dtype=np.float64)
    per_category = np.stack([stats[name]["pck_per_keypoint"] for name in categories])  # (C, B, M)
    stats[ALL_CATEGORY][CATEGORY_WEIGHTED] = np.tensordot(weights / weights.sum(), per_category, axes=1)


def summary_with_intervals(
    per_pair: pd.DataFrame, settings: BootstrapSettings = BootstrapSettings(), where: str = "per-pair table"
) -> pd.DataFrame:
    """``sd4match.metrics.summarise`` (same rows, same point estimates) plus ``<kind>_lo`` / ``<kind>_hi``
    for ``pck_per_image``, ``pck_per_keypoint`` and ``pck_category_weighted``: the percentile interval of each
    cell."""
    summary = summarise(per_pair)
    counts = pair_counts(per_pair, where)
    bounds = bootstrap_bounds(counts, settings)
    column = {key: j for j, key in enumerate(counts.columns)}
    j = [column[(m, float(a))] for m, a in zip(summary["method"], summary["alpha"], strict=True)]
    for kind in BOUND_KINDS:
        lo = [bounds[c][kind][0, k] for c, k in zip(summary["category"], j, strict=True)]
        hi = [bounds[c][kind][1, k] for c, k in zip(summary["category"], j, strict=True)]
        summary[f"{kind}_lo"], summary[f"{kind}_hi"] = lo, hi
    return summary[list(INTERVAL_COLUMNS)]


INTERVAL_COLUMNS: tuple[str, ...] = (
    *SUMMARY_COLUMNS,
    "pck_per_image_lo",
    "pck_per_image_hi",
    "pck_per_keypoint_lo",
    "pck_per_keypoint_hi",
    "pck_category_weighted_lo",
    "pck_category_weighted_hi",
)


def intervals_from_file(
    path: PathLike,
    settings: BootstrapSettings = BootstrapSettings(),
    methods: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
) -> pd.DataFrame:
    """``summary_with_intervals`` of one per-pair CSV, restricted to ``methods`` and ``alphas``."""
    frame = select(read_per_pair(path), methods, alphas)
    if frame.empty:
        raise ValueError(f"per-pair table {path}: no rows for methods={methods}, alphas={alphas}")
    return summary_with_intervals(frame, settings, where=str(path))


def cell_interval(
    intervals: pd.DataFrame, category: str, method: str, alpha: float, kind: str = "pck_per_image"
) -> tuple[float, float, float]:
    """(point, lo, hi) of one table cell from a ``summary_with_intervals`` / ``interval_columns`` frame."""
    if kind not in PCK_KINDS:
        raise ValueError(f"cell_interval: unknown PCK kind {kind!r}; expected one of {PCK_KINDS}")
    sel = intervals[
        (intervals["category"] == category)
        & (intervals["method"] == method)
        & np.isclose(intervals["alpha"].astype(float), alpha)
    ]
    if len(sel) != 1:
        raise ValueError(
            f"cell_interval: expected one row for category={category!r}, method={method!r}, alpha={alpha:g}; "
            f"found {len(sel)}"
        )
    row = sel.iloc[0]
    return float(row[kind]), float(row[f"{kind}_lo"]), float(row[f"{kind}_hi"])


def interval_columns(
    per_pair_paths: Mapping[str, PathLike],
    methods: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    settings: BootstrapSettings = BootstrapSettings(),
) -> pd.DataFrame:
    """Point, lower and upper bound of every cell of several evaluations, one row per (label, category,
    method, alpha); ``label`` is the key of ``per_pair_paths`` (e.g. ``"spair/cpm/seed0/spair"``)."""
    frames = [
        intervals_from_file(path, settings, methods, alphas).assign(label=label)
        for label, path in per_pair_paths.items()
    ]
    if not frames:
        raise ValueError("interval_columns: no per-pair tables given")
    out = pd.concat(frames, ignore_index=True)
    return out[["label", *INTERVAL_COLUMNS]]


# ----------------------------------------------------------------------------------------------------------
# Paired comparison of two evaluations on the same pairs
# ----------------------------------------------------------------------------------------------------------

DIFFERENCE_COLUMNS: tuple[str, ...] = (
    "category",
    "method_a",
    "method_b",
    "alpha",
    "n_pairs",
    "diff_per_image",
    "diff_per_image_lo",
    "diff_per_image_hi",
    "diff_per_keypoint",
    "diff_per_keypoint_lo",
    "diff_per_keypoint_hi",
)


def _match_pairs(a: PairCounts, b: PairCounts, names: tuple[str, str]) -> np.ndarray:
    """Row order of ``b`` that lines its pairs up with ``a``'s; the pair sets, categories and n_kps must
    agree, else a ValueError naming both tables."""
    ids_a, ids_b = a.pair_ids.tolist(), b.pair_ids.tolist()
    only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
    if only_a or only_b:
        raise ValueError(
            f"paired comparison: {names[0]} and {names[1]} hold different pairs "
            f"({len(only_a)} only in the first, e.g. {only_a[:3]}; {len(only_b)} only in the second, "
            f"e.g. {only_b[:3]}); a paired bootstrap needs the same pairs"
        )
    position = {pid: i for i, pid in enumerate(ids_b)}
    order = np.array([position[pid] for pid in ids_a], dtype=np.int64)
    for field, label in (("categories", "category"), ("n_kps", "number of keypoints")):
        differs = np.flatnonzero(getattr(a, field) != getattr(b, field)[order])
        if len(differs):
            raise ValueError(
                f"paired comparison: pair {ids_a[differs[0]]!r} has a different {label} in {names[0]} and "
                f"{names[1]}; they are not evaluations of the same pairs"
            )
    return order


def _compared_columns(
    a: PairCounts, b: PairCounts, methods: tuple[str, str] | None, names: tuple[str, str]
) -> list[tuple[int, int]]:
    """Column pairs compared: the same (method, alpha) in both, or ``methods[0]`` of a vs ``methods[1]``
    of b at each alpha both hold."""
    index_a = {key: j for j, key in enumerate(a.columns)}
    index_b = {key: j for j, key in enumerate(b.columns)}
    if methods is None:
        keys = [(key, key) for key in a.columns if key in index_b]
    else:
        keys = [
            ((methods[0], alpha), (methods[1], alpha))
            for m, alpha in a.columns
            if m == methods[0] and (methods[1], alpha) in index_b
        ]
    if not keys:
        raise ValueError(
            f"paired comparison: {names[0]} and {names[1]} share no (method, alpha) to compare "
            f"(methods={methods}; first has {sorted(set(a.columns))}, second {sorted(set(b.columns))})"
        )
    return [(index_a[ka], index_b[kb]) for ka, kb in keys]


def paired_difference(
    per_pair_a: pd.DataFrame,
    per_pair_b: pd.DataFrame,
    settings: BootstrapSettings = BootstrapSettings(),
    names: tuple[str, str] = ("A", "B"),
    methods: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """PCK of A minus PCK of B per category and ``All`` with the paired-bootstrap interval: both are
    resampled with the same pair counts, so what the two share (hard pairs) cancels out.

    Pairs are matched by ``pair_id``. ``methods=None`` compares each matching method with itself;
    ``methods=("kernel_softmax", "nn")`` compares A's kernel-softmax with B's nearest neighbour."""
    a, b = pair_counts(per_pair_a, names[0]), pair_counts(per_pair_b, names[1])
    order = _match_pairs(a, b, names)
    columns = _compared_columns(a, b, methods, names)
    ja, jb = [j for j, _ in columns], [j for _, j in columns]
    m = len(columns)
    pck_b, correct_b = _pck(b)[order][:, jb], b.n_correct[order][:, jb]
    values = np.hstack([_pck(a)[:, ja], a.n_correct[:, ja], pck_b, correct_b, a.n_kps[:, None]])
    sums = replicate_sums(values, a.strata(), settings)
    n_pairs = _n_pairs(a)
    point_a = summarise(per_pair_a).set_index(_KEYS)
    point_b = summarise(per_pair_b).set_index(_KEYS)
    rows = []
    for name, s in sums.items():
        side_a = statistics_from_sums(np.hstack([s[:, : 2 * m], s[:, 4 * m :]]), n_pairs[name], m)
        side_b = statistics_from_sums(s[:, 2 * m :], n_pairs[name], m)  # [pck_b | n_correct_b | n_kps]
        bounds = {kind: percentile_interval(side_a[kind] - side_b[kind], settings) for kind in PCK_KINDS}
        for k, (j_a, j_b) in enumerate(columns):
            (method_a, alpha), (method_b, _) = a.columns[j_a], b.columns[j_b]
            row = {"category": name, "method_a": method_a, "method_b": method_b, "alpha": alpha}
            row["n_pairs"] = n_pairs[name]
            for kind, short in zip(PCK_KINDS, ("diff_per_image", "diff_per_keypoint"), strict=True):
                row[short] = float(
                    point_a.loc[(name, method_a, alpha), kind] - point_b.loc[(name, method_b, alpha), kind]
                )
                row[f"{short}_lo"], row[f"{short}_hi"] = bounds[kind][:, k]
            rows.append(row)
    out = pd.DataFrame(rows, columns=list(DIFFERENCE_COLUMNS))
    out["_is_all"] = out["category"] == ALL_CATEGORY
    out = out.sort_values(["_is_all", "category", "method_a", "alpha"], kind="stable")
    return out.drop(columns="_is_all").reset_index(drop=True)


def paired_difference_from_files(
    path_a: PathLike,
    path_b: PathLike,
    settings: BootstrapSettings = BootstrapSettings(),
    methods: tuple[str, str] | None = None,
    alphas: Sequence[float] | None = None,
) -> pd.DataFrame:
    """``paired_difference`` of two per-pair CSVs (errors name both files)."""
    a = select(read_per_pair(path_a), None if methods is None else [methods[0]], alphas)
    b = select(read_per_pair(path_b), None if methods is None else [methods[1]], alphas)
    return paired_difference(a, b, settings, names=(str(path_a), str(path_b)), methods=methods)


# ----------------------------------------------------------------------------------------------------------
# Spread across training seeds
# ----------------------------------------------------------------------------------------------------------


def seed_spread(summaries: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """Per (category, method, alpha) of the runs' summaries: number of seeds, and for each PCK kind the
    mean, sample standard deviation (ddof=1; NaN for one seed), minimum and maximum across seeds."""
    if not summaries:
        raise ValueError("seed_spread: no summaries given")
    frames = []
    for seed, summary in summaries.items():
        missing = [c for c in (*_KEYS, *PCK_KINDS) if c not in summary.columns]
        if missing:
            raise ValueError(f"seed_spread: the summary of seed {seed} lacks columns {missing}")
        frames.append(summary[[*_KEYS, *PCK_KINDS]].assign(seed=seed))
    keys = [set(map(tuple, f[_KEYS].itertuples(index=False))) for f in frames]
    seeds = list(summaries)
    for seed, k in zip(seeds[1:], keys[1:], strict=True):
        if k != keys[0]:
            raise ValueError(
                f"seed_spread: the summaries of seed {seeds[0]} and seed {seed} have different "
                f"(category, method, alpha) rows ({len(keys[0] ^ k)} differ)"
            )
    long = pd.concat(frames, ignore_index=True)
    grouped = long.groupby(_KEYS, sort=False)
    out = grouped.size().rename("n_seeds").reset_index()
    for kind in PCK_KINDS:
        stats = grouped[kind].agg(["mean", "std", "min", "max"]).reset_index(drop=True)
        for stat in ("mean", "std", "min", "max"):
            out[f"{kind}_{stat}"] = stats[stat].to_numpy()
    return out


def seed_spread_from_files(summary_paths: Mapping[int, PathLike]) -> pd.DataFrame:
    """``seed_spread`` of the ``summary.csv`` files of one run's seeds (seed -> path)."""
    summaries = {}
    for seed, path in summary_paths.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"summary of seed {seed} not found: {path}")
        summaries[seed] = pd.read_csv(path, dtype={"category": str, "method": str})
    return seed_spread(summaries)


# ----------------------------------------------------------------------------------------------------------
# Compact text for tables
# ----------------------------------------------------------------------------------------------------------


def _number(value: float, digits: int, signed: bool) -> str:
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def format_bounds(lo: float, hi: float, digits: int = 1, signed: bool = False) -> str:
    """The bracket of an interval, ``[74.6, 76.0]`` (``signed``: ``[-0.3, +2.6]``)."""
    return f"[{_number(lo, digits, signed)}, {_number(hi, digits, signed)}]"


def format_interval(point: float, lo: float, hi: float, digits: int = 1, signed: bool = False) -> str:
    """``75.3 [74.6, 76.0]`` (``signed``: ``+1.2 [-0.3, +2.6]``, for differences)."""
    return f"{_number(point, digits, signed)} {format_bounds(lo, hi, digits, signed)}"


def format_sd(std: float, n_seeds: int, digits: int = 1) -> str:
    """What follows a mean across seeds: ``± 3.6 (3 seeds)``; one seed has no spread: ``(1 seed)``."""
    if n_seeds == 1 or math.isnan(std):
        return f"({n_seeds} seed{'s' if n_seeds != 1 else ''})"
    return f"± {std:.{digits}f} ({n_seeds} seeds)"


def format_spread(mean: float, std: float, n_seeds: int, digits: int = 1) -> str:
    """``73.0 ± 3.6 (3 seeds)``; one seed has no spread: ``73.0 (1 seed)``."""
    return f"{mean:.{digits}f} {format_sd(std, n_seeds, digits)}"


def paper_within(paper: float | None, lo: float, hi: float, resolution: float = 0.1) -> bool | None:
    """Whether a paper number lies in our interval, allowing for its printed rounding: the paper's
    ``75.3`` stands for ``[75.25, 75.35]``, inside when that overlaps ``[lo, hi]``. None: no paper number."""
    if paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return None
    half = resolution / 2.0
    return bool(lo - half <= paper <= hi + half)
