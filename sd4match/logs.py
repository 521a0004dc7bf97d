"""Route a job's logging, warnings and stderr into its Snakemake `log:` file."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def log_to(path: str | Path | None, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send the root logger (and stderr, e.g. progress bars and tracebacks) to ``path`` for the block."""
    logger = logging.getLogger("sd4match")
    if path is None:
        logging.basicConfig(level=level)
        yield logger
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(True)
        try:
            with contextlib.redirect_stderr(stream):
                try:
                    yield logger
                except BaseException:
                    logger.exception("job failed")
                    raise
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
