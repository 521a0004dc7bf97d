"""Tests of sd4match.fetch against a loopback HTTP server (127.0.0.1 only) and archives built in tmp_path."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from sd4match.fetch import (
    CorruptArchiveError,
    FetchRecord,
    download,
    extract,
    fetch_archive,
    link_local_copy,
    sha256_file,
    write_fetch_record,
)
from sd4match.io import owner_tag

PAYLOAD = random.Random(20240617).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 64 * 1024
TIMEOUT = 5


# --------------------------------------------------------------------------------------------- server


@dataclass
class Served:
    """What the loopback server sends, how it treats Range, and the request headers it received.

    Modes: "range" (honours ``Range: bytes=N-`` and ``If-Range``), "ignore_range", "die" (announces the whole
    length, sends ``die_after`` bytes, closes), "missing" (404), "no_length" (a 200 without Content-Length,
    delimited by closing), "cut_no_length" (such a 200 cut after ``die_after`` bytes; Range requests are
    served), "ignore_range_no_length", "chunked" / "cut_chunked" (HTTP/1.1 chunked; cut: no last chunk),
    "ignore_if_range" (answers a Range with 206 even when If-Range names another version).
    """

    payload: bytes = PAYLOAD
    mode: str = "range"
    die_after: int = 0
    etag: str | None = None
    last_modified: str | None = None
    ranges: list[str | None] = field(default_factory=list)
    if_ranges: list[str | None] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.served.payload`` as ``Served.mode`` says."""

    timeout = TIMEOUT

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        served: Served = self.server.served  # type: ignore[attr-defined]
        self.send_response(status)
        validators = {"ETag": served.etag, "Last-Modified": served.last_modified}
        for key, value in {**{k: v for k, v in validators.items() if v}, **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_chunked(self, body: bytes, cut: bool) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        pieces = [body[i : i + 50_000] for i in range(0, len(body), 50_000)]
        for piece in pieces[: len(pieces) // 2] if cut else pieces:
            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        if not cut:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _partial(self, data: bytes, start: int) -> None:
        if start >= len(data):
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
        else:
            headers = {
                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                "Content-Length": str(len(data) - start),
            }
            self._send(206, data[start:], headers)

    def do_GET(self) -> None:
        served: Served = self.server.served  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        served.ranges.append(rng)
        served.if_ranges.append(if_range)
        data = served.payload
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else None
        current = if_range is None or if_range in (served.etag, served.last_modified)
        if served.mode == "missing":
            self.send_error(404, "Not Found")
        elif served.mode == "die":
            self._send(200, data[: served.die_after], {"Content-Length": str(len(data))})
            self.close_connection = True
        elif served.mode in ("chunked", "cut_chunked"):
            self._send_chunked(data, cut=served.mode == "cut_chunked")
        elif served.mode == "no_length" and start is None:
            self._send(200, data, {})
        elif served.mode == "cut_no_length" and start is None:
            self._send(200, data[: served.die_after], {})
        elif served.mode == "ignore_range_no_length":
            self._send(200, data, {})
        elif start is not None and served.mode == "ignore_if_range":
            self._partial(data, start)
        elif start is not None and served.mode in ("range", "no_length", "cut_no_length") and current:
            self._partial(data, start)
        else:
            self._send(200, data, {"Content-Length": str(len(data))})


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HTTPServer]:
    """A loopback HTTP server on a free port, in a background thread; proxies are bypassed."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    httpd.served = Served()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=TIMEOUT)


def _url(httpd: HTTPServer, name: str = "data.bin") -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/{name}"


def _get(url: str, dest: Path, **kwargs: object) -> str:
    return download(url, dest, progress=False, chunk_size=CHUNK, timeout=TIMEOUT, **kwargs)


# --------------------------------------------------------------------------------------------- download


def test_full_download_exact_bytes_hash_log_and_progress(
    server: HTTPServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "sub" / "data.bin"
    with caplog.at_level(logging.INFO, logger="sd4match.fetch"):
        digest = download(_url(server), dest, progress=True, chunk_size=CHUNK, timeout=TIMEOUT)
    assert digest == PAYLOAD_SHA
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert server.served.ranges == [None]
    assert any(PAYLOAD_SHA in rec.getMessage() for rec in caplog.records if rec.name == "sd4match.fetch")
    assert "data.bin" in capsys.readouterr().err


def test_pinned_sha256_accepted_in_upper_case(server: HTTPServer, tmp_path: Path) -> None:
    assert _get(_url(server), tmp_path / "d.bin", sha256=PAYLOAD_SHA.upper()) == PAYLOAD_SHA


def test_sha256_mismatch_raises_and_leaves_nothing(server: HTTPServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    url = _url(server)
    with pytest.raises(ValueError) as info:
        _get(url, dest, sha256="0" * 64)
    message = str(info.value)
    for needle in (url, str(dest), "0" * 64, PAYLOAD_SHA):
        assert needle in message
    assert not dest.exists()
    assert not (tmp_path / "data.bin.part").exists()


def test_malformed_pinned_sha256_is_rejected(server: HTTPServer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not 64 hexadecimal digits"):
        _get(_url(server), tmp_path / "d.bin", sha256="abc")
    assert server.served.ranges == []


def _interrupted(server: HTTPServer, url: str, dest: Path, k: int) -> None:
    """A first download that the server cuts after ``k`` bytes (it announced the whole length)."""
    mode = server.served.mode
    server.served.mode, server.served.die_after = "die", k
    with pytest.raises(RuntimeError, match="cut short"):
        _get(url, dest)
    server.served.mode = mode


def test_part_of_unknown_origin_is_not_resumed(server: HTTPServer, tmp_path: Path) -> None:
    """A .part without its record (an older run, a copied file) may belong to anything: start again."""
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"x" * 100_003)
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server: HTTPServer, tmp_path: Path) -> None:
    n = 100_003
    dest = tmp_path / "data.bin"
    _interrupted(server, _url(server), dest, n)
    server.served.mode = "ignore_range"
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None, f"bytes={n}-"]
    assert dest.read_bytes() == PAYLOAD


def test_416_with_complete_part_finishes_without_transfer(
    server: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "data.bin"

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # the job dies after the last byte, while hashing, before the rename

    with monkeypatch.context() as patch:
        patch.setattr("sd4match.fetch.sha256_file", killed)
        with pytest.raises(KeyboardInterrupt):
            _get(_url(server), dest)
    assert (tmp_path / "data.bin.part").read_bytes() == PAYLOAD and not dest.exists()
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None, f"bytes={len(PAYLOAD)}-"]
    assert dest.read_bytes() == PAYLOAD


def test_oversized_part_restarts_from_zero(server: HTTPServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _interrupted(server, _url(server), dest, 1000)
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD + b"junk")  # larger than the recorded 300,000 bytes
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None, None]
    assert dest.read_bytes() == PAYLOAD


def test_server_dying_mid_stream_keeps_part_and_rerun_resumes(server: HTTPServer, tmp_path: Path) -> None:
    k = 70_001
    server.served.mode = "die"
    server.served.die_after = k
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    url = _url(server)
    with pytest.raises(RuntimeError) as info:
        _get(url, dest, sha256=PAYLOAD_SHA)
    assert url in str(info.value)
    assert "kept" in str(info.value) and str(part) in str(info.value)
    assert part.read_bytes() == PAYLOAD[:k]
    assert not dest.exists()

    server.served.mode = "range"
    assert _get(url, dest, sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert server.served.ranges == [None, f"bytes={k}-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_http_404_names_url(server: HTTPServer, tmp_path: Path) -> None:
    server.served.mode = "missing"
    url = _url(server, "nothing.tar.gz")
    with pytest.raises(RuntimeError, match=re.escape(url) + r".*HTTP 404"):
        _get(url, tmp_path / "nothing.tar.gz")
    assert not (tmp_path / "nothing.tar.gz").exists()


def test_connection_refused_names_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    httpd.server_close()  # the port is now closed: connecting is refused at once
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(RuntimeError, match=re.escape(url)):
        _get(url, tmp_path / "x.bin")


def test_file_url_and_plain_path(tmp_path: Path) -> None:
    src = tmp_path / "source dir" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    assert _get(src.as_uri(), tmp_path / "a.bin", sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert _get(str(src), tmp_path / "b.bin") == PAYLOAD_SHA
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        _get((tmp_path / "missing.bin").as_uri(), tmp_path / "c.bin")


def test_unsupported_scheme_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ftp://example.invalid/x.zip"):
        _get("ftp://example.invalid/x.zip", tmp_path / "x.zip")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path, chunk_size=1000) == PAYLOAD_SHA
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------------------------- archives

FILES = {
    "root/a.txt": b"alpha\n",
    "root/sub/b.bin": bytes(range(256)),
    "root/sub/big.bin": random.Random(7).randbytes(200_000),
}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        safe = [name for name in files if not name.startswith("/") and ".." not in name.split("/")]
        dirs = sorted({name.rsplit("/", 1)[0] for name in safe if "/" in name})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _make_zip(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar"])
def test_extract_tar_exact_contents(tmp_path: Path, suffix: str) -> None:
    mode = "w" if suffix == ".tar" else "w:gz"
    archive = _make_tar(tmp_path / f"ds{suffix}", FILES, mode)
    out = extract(archive, tmp_path / "out")
    assert out == tmp_path / "out"
    assert _tree(out) == FILES
    assert (out / "root" / "sub").is_dir()
    assert _leftovers(tmp_path, "out") == []


def test_extract_zip_exact_contents_and_strip(tmp_path: Path) -> None:
    archive = _make_zip(tmp_path / "ds.zip", FILES)
    assert _tree(extract(archive, tmp_path / "out")) == FILES
    stripped = extract(archive, tmp_path / "flat", strip=1)
    assert _tree(stripped) == {name.removeprefix("root/"): data for name, data in FILES.items()}


def test_extract_tar_strip_one(tmp_path: Path) -> None:
    archive = _make_tar(tmp_path / "ds.tar.gz", FILES)
    assert _tree(extract(archive, tmp_path / "out", strip=1)) == {
        "a.txt": b"alpha\n",
        "sub/b.bin": bytes(range(256)),
        "sub/big.bin": FILES["root/sub/big.bin"],
    }


@pytest.mark.parametrize("keep", ["half", "no_trailer"])
def test_truncated_tar_gz_raises_and_leaves_nothing(tmp_path: Path, keep: str) -> None:
    data = _make_tar(tmp_path / "good.tar.gz", FILES).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2] if keep == "half" else data[:-4])
    with pytest.raises(ValueError, match=re.escape(str(cut)) + ".*corrupt or truncated"):
        extract(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_corrupt_zip_raises_and_leaves_nothing(tmp_path: Path, damage: str) -> None:
    big = FILES["root/sub/big.bin"]
    data = bytearray(_make_zip(tmp_path / "good.zip", FILES, zipfile.ZIP_STORED).read_bytes())
    if damage == "flip_byte":
        data[data.find(big[:64]) + 1000] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*corrupt or truncated"):
        extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("member", ["../evil", "root/../../evil", "/abs/evil"])
def test_path_traversal_rejected(tmp_path: Path, kind: str, member: str) -> None:
    files = {"root/ok.txt": b"ok", member: b"pwned"}
    maker = _make_tar if kind == "tar.gz" else _make_zip
    archive = maker(tmp_path / f"evil.{kind}", files)
    out = tmp_path / "a" / "out"
    with pytest.raises(ValueError, match=re.escape(repr(member))):
        extract(archive, out)
    assert not out.exists()
    assert _leftovers(tmp_path / "a", "out") == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "a" / "evil").exists()


def test_symlink_member_pointing_outside_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("root/escape")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../outside"
        tar.addfile(info)
    with pytest.raises(ValueError, match="'root/escape'"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_archive_suffix_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "data.rar"
    archive.write_bytes(b"Rar!")
    with pytest.raises(ValueError, match=re.escape(str(archive))):
        extract(archive, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="absent.zip"):
        extract(tmp_path / "absent.zip", tmp_path / "out")


def test_reextract_replaces_existing_dest_only_after_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "root").mkdir(parents=True)
    (out / "old.txt").write_bytes(b"old")
    (out / "root" / "a.txt").write_bytes(b"stale")
    good = _make_tar(tmp_path / "good.tar.gz", FILES)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        extract(cut, out)
    assert _tree(out) == {"old.txt": b"old", "root/a.txt": b"stale"}

    extract(good, out)
    assert _tree(out) == FILES
    assert _leftovers(tmp_path, "out") == []


def test_extract_over_linked_local_copy_keeps_the_local_data(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "keep.txt").write_bytes(b"precious")
    out = link_local_copy(local, tmp_path / "out")
    extract(_make_zip(tmp_path / "ds.zip", FILES), out)
    assert not out.is_symlink()
    assert _tree(out) == FILES
    assert _tree(local) == {"keep.txt": b"precious"}


# --------------------------------------------------------------------------------------------- local copies


def _local_dataset(root: Path) -> Path:
    (root / "JPEGImages" / "cat").mkdir(parents=True)
    (root / "JPEGImages" / "cat" / "1.jpg").write_bytes(b"\xff\xd8jpeg")
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    return root


def test_link_local_copy_symlinks_without_copying(tmp_path: Path) -> None:
    local = _local_dataset(tmp_path / "SPair-71k")
    dest = tmp_path / "resources" / "spair"
    got = link_local_copy(local, dest, expected=["JPEGImages/cat/1.jpg", "PairAnnotation/test"])
    assert got == dest
    assert dest.is_symlink()
    assert dest.resolve() == local.resolve()
    assert (dest / "JPEGImages" / "cat" / "1.jpg").read_bytes() == b"\xff\xd8jpeg"
    other = _local_dataset(tmp_path / "other")
    link_local_copy(other, dest)
    assert dest.resolve() == other.resolve()
    assert _leftovers(dest.parent, "spair") == []


def test_link_local_copy_missing_expected_entry(tmp_path: Path) -> None:
    local = _local_dataset(tmp_path / "SPair-71k")
    dest = tmp_path / "spair"
    with pytest.raises(FileNotFoundError, match=re.escape("'Layout/large/test.txt'")):
        link_local_copy(local, dest, expected=["JPEGImages", "Layout/large/test.txt", "Segmentation"])
    assert not dest.exists() and not dest.is_symlink()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        link_local_copy(tmp_path / "nowhere", dest)


def test_link_local_copy_refuses_to_replace_a_real_folder(tmp_path: Path) -> None:
    local = _local_dataset(tmp_path / "SPair-71k")
    dest = tmp_path / "spair"
    dest.mkdir()
    with pytest.raises(FileExistsError, match=re.escape(str(dest))):
        link_local_copy(local, dest)
    with pytest.raises(ValueError, match="relative path"):
        link_local_copy(local, tmp_path / "x", expected=["../SPair-71k"])


# --------------------------------------------------------------------------------------------- fetch_archive


def test_fetch_archive_and_record(server: HTTPServer, tmp_path: Path) -> None:
    archive_bytes = _make_tar(tmp_path / "built.tar.gz", FILES).read_bytes()
    server.served.payload = archive_bytes
    sha = hashlib.sha256(archive_bytes).hexdigest()
    url = _url(server, "SPair-71k.tar.gz")
    record = fetch_archive(url, tmp_path / "dl" / "SPair-71k.tar.gz", tmp_path / "data" / "spair", sha256=sha)
    assert record == FetchRecord(
        url=url,
        archive=tmp_path / "dl" / "SPair-71k.tar.gz",
        sha256=sha,
        bytes=len(archive_bytes),
        extracted_to=tmp_path / "data" / "spair",
    )
    assert _tree(tmp_path / "data" / "spair") == FILES

    sidecar = tmp_path / "dl" / "SPair-71k.fetch.json"
    write_fetch_record(record, sidecar)
    stored = json.loads(sidecar.read_text())
    assert datetime.fromisoformat(stored.pop("time")).utcoffset() is not None
    assert stored == {
        "url": url,
        "archive": str(tmp_path / "dl" / "SPair-71k.tar.gz"),
        "sha256": sha,
        "size": len(archive_bytes),
        "extracted_to": str(tmp_path / "data" / "spair"),
    }


# --------------------------------------------------------------------------------------------- issue 7 §5


PAYLOAD2 = random.Random(99).randbytes(250_000)


def test_body_cut_short_without_content_length_is_not_accepted(server: HTTPServer, tmp_path: Path) -> None:
    """No length announced and the connection closes early: the end is checked with a Range request."""
    k = 123_457
    server.served.mode, server.served.die_after = "cut_no_length", k
    dest = tmp_path / "data.bin"
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None, f"bytes={k}-"]  # the rest came as a 206
    assert dest.read_bytes() == PAYLOAD


def test_complete_body_without_length_is_confirmed_by_the_server(server: HTTPServer, tmp_path: Path) -> None:
    server.served.mode = "no_length"
    dest = tmp_path / "data.bin"
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None, f"bytes={len(PAYLOAD)}-"]  # 416: nothing lies beyond
    assert dest.read_bytes() == PAYLOAD


def test_unconfirmable_body_needs_a_pinned_hash(server: HTTPServer, tmp_path: Path) -> None:
    server.served.mode = "ignore_range_no_length"
    dest = tmp_path / "data.bin"
    with pytest.raises(
        RuntimeError, match="cannot tell whether the 300000 bytes received are the whole file"
    ):
        _get(_url(server), dest)
    assert not dest.exists()
    assert _get(_url(server), dest, sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert dest.read_bytes() == PAYLOAD


def test_chunked_body_complete_and_cut(server: HTTPServer, tmp_path: Path) -> None:
    server.served.mode = "chunked"
    assert _get(_url(server), tmp_path / "a.bin") == PAYLOAD_SHA
    assert server.served.ranges == [None]  # the last chunk arrived: no confirmation needed
    server.served.mode = "cut_chunked"
    with pytest.raises(RuntimeError, match="interrupted"):
        _get(_url(server), tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()


def test_part_of_another_url_is_not_spliced(server: HTTPServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _interrupted(server, _url(server, "mirror-a/data.bin"), dest, 100_000)
    server.served.payload = PAYLOAD2
    url_b = _url(server, "mirror-b/data.bin")
    assert _get(url_b, dest) == hashlib.sha256(PAYLOAD2).hexdigest()
    assert server.served.ranges == [None, None]
    assert dest.read_bytes() == PAYLOAD2


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
def test_changed_remote_file_is_not_spliced_if_range(
    server: HTTPServer, tmp_path: Path, validator: str
) -> None:
    """The .part holds version 1; the server now has version 2: If-Range makes it send all of version 2."""
    values = {
        "etag": ('"v1"', '"v2"'),
        "last_modified": ("Mon, 01 Jan 2024 00:00:00 GMT", "Tue, 02 Jan 2024 00:00:00 GMT"),
    }
    old, new = values[validator]
    setattr(server.served, validator, old)
    dest = tmp_path / "data.bin"
    _interrupted(server, _url(server), dest, 100_000)
    server.served.payload = PAYLOAD2
    setattr(server.served, validator, new)
    assert _get(_url(server), dest) == hashlib.sha256(PAYLOAD2).hexdigest()
    assert server.served.ranges == [None, "bytes=100000-"] and server.served.if_ranges == [None, old]
    assert dest.read_bytes() == PAYLOAD2


def test_changed_remote_file_is_not_spliced_when_the_server_ignores_if_range(
    server: HTTPServer, tmp_path: Path
) -> None:
    server.served.etag = '"v1"'
    dest = tmp_path / "data.bin"
    _interrupted(server, _url(server), dest, 100_000)
    server.served.mode, server.served.payload, server.served.etag = "ignore_if_range", PAYLOAD2, '"v2"'
    assert _get(_url(server), dest) == hashlib.sha256(PAYLOAD2).hexdigest()
    assert server.served.ranges == [None, "bytes=100000-", None]  # the 206 of version 2 was refused
    assert dest.read_bytes() == PAYLOAD2


def test_changed_size_without_validators_is_not_spliced(server: HTTPServer, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    _interrupted(server, _url(server), dest, 100_000)
    server.served.payload = PAYLOAD2  # no ETag / Last-Modified: the recorded length tells the versions apart
    assert _get(_url(server), dest) == hashlib.sha256(PAYLOAD2).hexdigest()
    assert server.served.ranges == [None, "bytes=100000-", None]
    assert dest.read_bytes() == PAYLOAD2


def test_finished_download_is_reused_and_a_changed_url_or_hash_is_not(
    server: HTTPServer, tmp_path: Path
) -> None:
    dest = tmp_path / "data.bin"
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert json.loads((tmp_path / "data.bin.download.json").read_text()) == {
        "url": _url(server),
        "size": len(PAYLOAD),
        "sha256": PAYLOAD_SHA,
    }
    assert _get(_url(server), dest) == PAYLOAD_SHA
    assert _get(_url(server), dest, sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert server.served.ranges == [None]  # nothing downloaded twice
    assert _get(_url(server, "other/data.bin"), dest) == PAYLOAD_SHA
    assert server.served.ranges == [None, None]  # another URL: downloaded
    dest.write_bytes(PAYLOAD[:-1] + b"\0")  # same size, other content: a pinned hash catches it
    assert _get(_url(server, "other/data.bin"), dest, sha256=PAYLOAD_SHA) == PAYLOAD_SHA
    assert server.served.ranges == [None, None, None] and dest.read_bytes() == PAYLOAD


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_archive_is_not_downloaded_again_after_the_extraction_failed(
    server: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.served.payload = _make_tar(tmp_path / "built.tar.gz", FILES).read_bytes()
    url, archive, out = _url(server, "ds.tar.gz"), tmp_path / "dl" / "ds.tar.gz", tmp_path / "data" / "ds"
    with monkeypatch.context() as patch:
        patch.setattr("sd4match.fetch.shutil.copyfileobj", _enospc)  # the disk fills up while extracting
        with pytest.raises(OSError) as info:
            fetch_archive(url, archive, out, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert "while extracting" in str(info.value) and str(out.parent) in str(info.value)
    assert archive.read_bytes() == server.served.payload and not out.exists()
    assert _leftovers(out.parent, "ds") == []
    fetch_archive(url, archive, out, progress=False)  # the rerun
    assert server.served.ranges == [None]
    assert _tree(out) == FILES


def test_corrupt_archive_is_deleted_so_the_rerun_downloads_it_again(
    server: HTTPServer, tmp_path: Path
) -> None:
    good = _make_tar(tmp_path / "built.tar.gz", FILES).read_bytes()
    server.served.payload = good[: len(good) // 2]  # the server itself holds a truncated copy
    url, archive, out = _url(server, "ds.tar.gz"), tmp_path / "dl" / "ds.tar.gz", tmp_path / "data" / "ds"
    with pytest.raises(CorruptArchiveError, match="was deleted, so a rerun downloads it again"):
        fetch_archive(url, archive, out, progress=False)
    assert not archive.exists() and not (tmp_path / "dl" / "ds.tar.gz.download.json").exists()
    server.served.payload = good
    fetch_archive(url, archive, out, progress=False)
    assert server.served.ranges == [None, None]
    assert _tree(out) == FILES


def test_extraction_on_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _make_zip(tmp_path / "ds.zip", FILES)
    monkeypatch.setattr("sd4match.fetch.shutil.copyfileobj", _enospc)
    with pytest.raises(OSError, match=r"No space left on device while extracting .*/root/a.txt"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_killed_extractions_leave_nothing_after_the_next_run(tmp_path: Path) -> None:
    tag = owner_tag().rsplit("-", 1)[0]
    dead = [
        tmp_path / f".out.extracting-{tag}-{_dead_pid()}-abc123",
        tmp_path / f".out.old-{tag}-{_dead_pid()}-ff00",
    ]
    live = tmp_path / f".out.extracting-{tag}-{os.getppid()}-def456"  # another job still extracting
    other_host = tmp_path / ".out.extracting-elsewhere-1-aaa111"  # a job on another node of the cluster
    for folder in [*dead, live, other_host]:
        (folder / "root").mkdir(parents=True)
        (folder / "root" / "big.bin").write_bytes(b"x" * 1000)
    extract(_make_zip(tmp_path / "ds.zip", FILES), tmp_path / "out")
    assert not any(folder.exists() for folder in dead)
    assert live.exists() and other_host.exists()
    assert _tree(tmp_path / "out") == FILES


@pytest.mark.parametrize(("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_extracted_dataset_follows_the_umask(tmp_path: Path, umask: int, dirs: int, files: int) -> None:
    archive = _make_tar(tmp_path / "ds.tar.gz", FILES)
    old = os.umask(umask)
    try:
        out = extract(archive, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dirs
    assert stat.S_IMODE((out / "root" / "sub").stat().st_mode) == dirs
    assert stat.S_IMODE((out / "root" / "a.txt").stat().st_mode) == files
