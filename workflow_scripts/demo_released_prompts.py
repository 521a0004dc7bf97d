"""Snakemake adapter: the demo world's pretrained_prompts.zip, in the authors' format at tiny width."""

from sd4match.logs import log_to
from sd4match.released_demo import write_release_archive
from sd4match.released_prompts import dinov2_token_shape, load_text_encoder

with log_to(snakemake.log[0]):  # noqa: F821
    i = snakemake.input  # noqa: F821
    text_encoder, tokenizer = load_text_encoder(i.sd)
    shape = dinov2_token_shape(i.dinov2)
    write_release_archive(snakemake.output[0], text_encoder, tokenizer, shape, seed=snakemake.params.seed)  # noqa: F821
