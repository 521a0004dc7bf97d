"""Snakemake adapter: the table of every method on one custom dataset (zero-shot baselines, tuned prompts),
each PCK with its bootstrap interval over the dataset's pairs."""

from sd4match.annotation_checks import pairs_note
from sd4match.logs import log_to
from sd4match.provenance import build_provenance
from sd4match.reporting import custom_entries_from_files, custom_table, custom_title
from sd4match.table_writing import write_table
from sd4match.uncertainty import BootstrapSettings, method_note

with log_to(snakemake.log[0]):  # noqa: F821
    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    settings = BootstrapSettings()
    entries = custom_entries_from_files(
        p.zero_shot,
        p.sd4match,
        p.variants,
        p.matching,
        p.zero_shot_matching,
        intervals=settings,
        alphas=p.alphas,
    )
    table = custom_table(entries, tuple(p.alphas), p.name)
    write_table(
        table,
        o.csv,
        o.md,
        title=custom_title(p.name, p.threshold, pairs_note([i.pairs_report])),
        prov=build_provenance(record_paths=i.models, **p.provenance),
        html_path=o.html,
        caption_path=o.caption,
        notes=[method_note(settings)],
    )
