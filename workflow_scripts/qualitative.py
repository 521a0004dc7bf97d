"""Snakemake adapter: predicted vs ground-truth matches of SD4Match-CPM on a few SPair-71k test pairs."""

from sd4match.gpu import allocate_gpus, device_for
from sd4match.logs import log_to

with log_to(snakemake.log[0]), allocate_gpus(snakemake.resources.gpu) as lease:  # noqa: F821
    from sd4match.paper_figures import PairFigureInputs, QualitativeSettings, make_qualitative
    from sd4match.provenance import build_provenance
    from sd4match.table_writing import write_caption

    i, o, p = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
    prov = build_provenance(record_paths=[i.sd_model, i.dinov2_model], **p.provenance)
    settings = QualitativeSettings(p.evaluation, p.matching, p.image_size, p.seed)
    make_qualitative(PairFigureInputs.from_rule(i, p), settings, o.png, o.pdf, prov, device_for(lease))
    write_caption(o.caption, prov)
