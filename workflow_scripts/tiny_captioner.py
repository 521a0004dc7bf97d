"""Snakemake adapter: the demo world's tiny stand-in for the ODISE implicit-captioner weights."""

from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig

from sd4match.baselines import build_tiny_implicit_captioner_weights
from sd4match.logs import log_to

with log_to(snakemake.log[0]):  # noqa: F821
    sd = snakemake.input.sd  # noqa: F821
    text_hidden = CLIPTextConfig.from_pretrained(sd, subfolder="text_encoder").hidden_size
    unet_config = UNet2DConditionModel.load_config(sd, subfolder="unet")
    build_tiny_implicit_captioner_weights(
        snakemake.output[0],  # noqa: F821
        snakemake.input.clip,  # noqa: F821
        text_hidden,
        seed=snakemake.params.seed,  # noqa: F821
        time_embed_dim=unet_config["block_out_channels"][0] * 4,
        prefix=snakemake.params.prefix,  # noqa: F821
    )
