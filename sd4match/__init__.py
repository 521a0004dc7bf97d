"""sd4match: a reproducible pipeline for SD4Match (CVPR 2024) semantic matching with Stable Diffusion."""

__version__ = "0.1.0"


def match(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """``sd4match.match_points.match``: match points of a source image into a target image (see that module).

    Imported on first use, so ``import sd4match`` stays free of torch.
    """
    from sd4match.match_points import match as _match

    return _match(*args, **kwargs)
