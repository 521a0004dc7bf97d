"""What each benchmark consists of on disk and how it is acquired (download + extract, or a local copy)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sd4match.custom_dataset import CUSTOM_SPLIT, CustomDatasetSpec, is_custom
from sd4match.fetch import download, fetch_archive, link_local_copy
from sd4match.io import write_json_atomic

log = logging.getLogger(__name__)

# Paths that must exist under a dataset's root folder (relative to it).
EXPECTED_LAYOUT: dict[str, list[str]] = {
    "spair": ["JPEGImages", "ImageAnnotation", "PairAnnotation", "Layout"],
    "pfpascal": ["PF-dataset-PASCAL/JPEGImages", "PF-dataset-PASCAL/Annotations"],
    "pfwillow": ["PF-dataset"],
}
# The folder inside an extracted archive that is (or contains) the root.
ARCHIVE_TOP: dict[str, str] = {
    "spair": "SPair-71k",
    "pfpascal": "PF-dataset-PASCAL",
    "pfwillow": "PF-dataset",
}
PAIR_LIST_NAMES: dict[str, list[str]] = {
    "trn": ["trn_pairs.csv", "train_pairs.csv"],
    "val": ["val_pairs.csv"],
    "test": ["test_pairs.csv"],
}


@dataclass
class DatasetLocation:
    """Where a fetched benchmark lives: image paths in pairs tables are relative to ``root``."""

    dataset: str
    root: str
    pair_lists: dict[str, str] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)


def _file_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _find_top(extracted: Path, name: str, dataset: str) -> Path:
    """Locate the archive's top folder ``name`` within two levels (archives differ in nesting)."""
    for candidate in [extracted / name, *extracted.glob(f"*/{name}")]:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{dataset}: archive extracted to {extracted} has no folder named {name!r}")


def _find_pair_lists(folder: Path, splits: list[str]) -> dict[str, str]:
    """Find the official pair-list CSVs under ``folder`` (either naming convention)."""
    found: dict[str, str] = {}
    for split in splits:
        for name in PAIR_LIST_NAMES[split]:
            hits = sorted(folder.rglob(name))
            if hits:
                found[split] = str(hits[0])
                break
        else:
            raise FileNotFoundError(
                f"no pair list for split {split!r} (looked for {PAIR_LIST_NAMES[split]}) under {folder}"
            )
    return found


def _check_layout(dataset: str, root: Path) -> None:
    for rel in EXPECTED_LAYOUT[dataset]:
        if not (root / rel).exists():
            raise FileNotFoundError(f"{dataset}: expected {rel!r} under {root} (official layout), not found")


def _download_extract(url: str, sha256: str | None, downloads: Path, dest: Path) -> dict[str, Any]:
    """Download (or reuse the complete earlier download of) an archive and extract it onto ``dest``."""
    record = fetch_archive(url, downloads / _file_name(url), dest, sha256=sha256)
    log.info(
        "%s sha256=%s (pin it in config.yaml to verify future downloads)", record.archive.name, record.sha256
    )
    return {"url": url, "file": str(record.archive), "sha256": record.sha256}


def acquire_dataset(
    dataset: str, cfg: dict[str, Any], data_dir: str | Path, downloads: str | Path
) -> DatasetLocation:
    """Download + extract (or link the configured local copy of) ``dataset``; return where it lives.

    A custom dataset (``kind: custom``, ``sd4match.custom_dataset``) is always a local folder: it is linked
    after checking that its pairs file is there, and its only split is ``test``.
    """
    data_dir, downloads = Path(data_dir), Path(downloads)
    if is_custom(cfg):
        spec = CustomDatasetSpec.from_config(dataset, cfg)
        root = link_local_copy(cfg["local_path"], data_dir / "local", expected=[spec.pairs_file])
        pairs = {CUSTOM_SPLIT: str(root / spec.pairs_file)}
        return DatasetLocation(dataset, str(root), pairs, [{"local_path": cfg["local_path"]}])
    splits = ["trn", "val", "test"] if dataset == "pfpascal" else ["test"]
    if cfg.get("local_path"):
        root = link_local_copy(cfg["local_path"], data_dir / "local", expected=EXPECTED_LAYOUT[dataset])
        pairs = {} if dataset == "spair" else _find_pair_lists(root, splits)
        return DatasetLocation(dataset, str(root), pairs, [{"local_path": cfg["local_path"]}])
    sources = [_download_extract(cfg["url"], cfg.get("sha256"), downloads, data_dir / "images")]
    top = _find_top(data_dir / "images", ARCHIVE_TOP[dataset], dataset)
    root = top if dataset == "spair" else top.parent
    _check_layout(dataset, root)
    pairs: dict[str, str] = {}
    if dataset == "pfpascal":
        sources.append(
            _download_extract(cfg["pairs_url"], cfg.get("pairs_sha256"), downloads, data_dir / "pairs")
        )
        pairs = _find_pair_lists(data_dir / "pairs", splits)
    elif dataset == "pfwillow":
        csv = root / "test_pairs.csv"  # beside PF-dataset/, the same layout as a local copy
        digest = download(cfg["pairs_url"], csv, sha256=cfg.get("pairs_sha256"))
        sources.append({"url": cfg["pairs_url"], "file": str(csv), "sha256": digest})
        pairs = {"test": str(csv)}
    return DatasetLocation(dataset, str(root), pairs, sources)


def write_location(location: DatasetLocation, path: str | Path) -> None:
    """Record where a dataset lives (the fetch rule's output)."""
    write_json_atomic(path, asdict(location))


def read_location(path: str | Path) -> DatasetLocation:
    """Read a fetch record written by :func:`write_location`."""
    try:
        data = json.loads(Path(path).read_text())
        return DatasetLocation(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"fetch record {path} is unreadable or malformed: {exc}") from exc
