"""Snakemake adapter: parse one dataset split into the normalised pairs table and its report."""

from sd4match.annotation_checks import write_pairs_report
from sd4match.custom_dataset import CustomDatasetSpec
from sd4match.data_sources import read_location
from sd4match.datasets import build_pairs, write_pairs_table
from sd4match.logs import log_to

with log_to(snakemake.log[0]) as log:  # noqa: F821
    location = read_location(snakemake.input[0])  # noqa: F821
    split = snakemake.wildcards.split  # noqa: F821
    custom = snakemake.params.custom  # noqa: F821
    table, report = build_pairs(
        snakemake.wildcards.dataset,  # noqa: F821
        location.root,
        split,
        pairs_csv=location.pair_lists.get(split),
        layout=snakemake.params.layout,  # noqa: F821
        custom=None if custom is None else CustomDatasetSpec(**custom),
    )
    log.info(
        "%s/%s: %d of %d pairs (%d skipped, %d PF-Pascal inline-keypoint disagreements)",
        report.dataset,
        split,
        report.kept,
        report.listed,
        len(report.skipped),
        len(report.disagreements),
    )
    write_pairs_table(table, snakemake.output.table)  # noqa: F821
    write_pairs_report(report, snakemake.output.report)  # noqa: F821
