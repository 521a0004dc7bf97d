"""Acquiring the benchmarks: demo-world archives served over loopback HTTP go through the real fetch path."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from sd4match.data_sources import acquire_dataset, read_location, write_location
from sd4match.datasets import build_pairs_table
from sd4match.demo_world import DemoWorldSpec, make_demo_world

SPEC = DemoWorldSpec()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    return make_demo_world(tmp_path_factory.mktemp("archives"), SPEC)


@pytest.fixture(scope="module")
def server(archives):
    """A loopback HTTP server over the archive folder (bounded: daemon thread, shut down after the module)."""
    folder = Path(archives["spair_archive"]).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _cfg(base: str, dataset: str) -> dict:
    return {
        "spair": {"url": f"{base}/SPair-71k.tar.gz", "sha256": None, "local_path": None, "layout": "large"},
        "pfpascal": {
            "url": f"{base}/PF-dataset-PASCAL.zip",
            "sha256": None,
            "pairs_url": f"{base}/pf-pascal_image_pairs.zip",
            "pairs_sha256": None,
            "local_path": None,
        },
        "pfwillow": {
            "url": f"{base}/PF-dataset.zip",
            "sha256": None,
            "pairs_url": f"{base}/test_pairs.csv",
            "pairs_sha256": None,
            "local_path": None,
        },
    }[dataset]


@pytest.mark.parametrize(
    ("dataset", "splits", "expected"),
    [
        ("spair", ["test"], {"test": 18 * SPEC.spair_pairs_per_split[2]}),
        ("pfpascal", ["trn", "val", "test"], {"trn": 4 * 6 * 2, "val": 4 * 2, "test": 4 * 3}),
        ("pfwillow", ["test"], {"test": 10 * 3 * 2}),
    ],
)
def test_acquire_over_http_then_parse(tmp_path, server, dataset, splits, expected):
    location = acquire_dataset(dataset, _cfg(server, dataset), tmp_path / "data", tmp_path / "downloads")
    write_location(location, tmp_path / "fetch.json")
    location = read_location(tmp_path / "fetch.json")
    assert all(source["sha256"] and len(source["sha256"]) == 64 for source in location.sources)
    for split in splits:
        table = build_pairs_table(dataset, location.root, split, pairs_csv=location.pair_lists.get(split))
        assert len(table) == expected[split]


def test_local_copy_is_linked_not_copied(tmp_path, server):
    fetched = acquire_dataset("pfwillow", _cfg(server, "pfwillow"), tmp_path / "a", tmp_path / "dl")
    cfg = _cfg(server, "pfwillow") | {"local_path": fetched.root, "url": "http://127.0.0.1:9/unused.zip"}
    location = acquire_dataset("pfwillow", cfg, tmp_path / "b", tmp_path / "dl2")
    assert Path(location.root).is_symlink()
    assert Path(location.root).resolve() == Path(fetched.root).resolve()
    assert location.pair_lists["test"].endswith("test_pairs.csv")
    assert not (tmp_path / "dl2").exists()


def test_pinned_hash_mismatch_fails_naming_the_url(tmp_path, server):
    cfg = _cfg(server, "pfwillow") | {"sha256": "0" * 64}
    with pytest.raises(ValueError, match="PF-dataset.zip"):
        acquire_dataset("pfwillow", cfg, tmp_path / "data", tmp_path / "downloads")
    assert not (tmp_path / "data" / "images").exists()


def test_truncated_archive_fails_and_leaves_nothing_extracted(tmp_path, archives):
    good = Path(archives["spair_archive"]).read_bytes()
    bad = tmp_path / "SPair-71k.tar.gz"
    bad.write_bytes(good[: len(good) // 2])
    cfg = {"url": str(bad), "sha256": None, "local_path": None, "layout": "large"}
    with pytest.raises(ValueError, match="SPair-71k.tar.gz"):
        acquire_dataset("spair", cfg, tmp_path / "data", tmp_path / "downloads")
    assert not (tmp_path / "data" / "images").exists()
    data = tmp_path / "data"
    assert not data.exists() or not any(data.iterdir())


def test_unreadable_fetch_record_names_the_file(tmp_path):
    bad = tmp_path / "fetch.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="fetch.json"):
        read_location(bad)


def test_rerun_after_a_failed_extraction_reuses_the_archive(tmp_path, server):
    """The fetch job failed after its download (say, a full disk while extracting): the rerun reuses it."""
    location = acquire_dataset("spair", _cfg(server, "spair"), tmp_path / "data", tmp_path / "downloads")
    archive = tmp_path / "downloads" / "SPair-71k.tar.gz"
    before = archive.stat()
    shutil.rmtree(tmp_path / "data")
    again = acquire_dataset("spair", _cfg(server, "spair"), tmp_path / "data", tmp_path / "downloads")
    after = archive.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.sources == location.sources and Path(again.root).is_dir()
