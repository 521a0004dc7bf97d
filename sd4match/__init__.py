"""sd4match: a reproducible pipeline for SD4Match (CVPR 2024) semantic matching with Stable Diffusion."""

__version__ = "0.1.0"
