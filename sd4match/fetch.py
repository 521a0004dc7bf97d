"""Dataset fetching: streamed, resumable, sha256-verified downloads and atomic, traversal-safe extraction.

Used by the Snakemake fetch rules. Downloads go to ``<dest>.part`` and are renamed onto ``<dest>`` only once
complete and verified; extraction happens in a hidden sibling folder that is renamed onto the target only
once every member has been written, so a killed job never leaves a half dataset behind.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import re
import secrets
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from sd4match.io import write_json_atomic

logger = logging.getLogger("sd4match.fetch")

_USER_AGENT = "sd4match-fetch/0.1 (python urllib)"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
_TAR_MODES = {".tar.gz": "r:gz", ".tgz": "r:gz", ".tar": "r:"}
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.ReadError,
    tarfile.CompressionError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    EOFError,
    zlib.error,
)


@dataclass(frozen=True)
class FetchRecord:
    """What one fetch produced: the source URL, the verified archive and where it was extracted."""

    url: str
    archive: Path
    sha256: str
    bytes: int
    extracted_to: Path


# --------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB archives never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise_sha256(sha256: str | None, url: str) -> str | None:
    """Lower-case and validate a pinned sha256 (64 hex digits); None means 'do not verify'."""
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 pinned for {url} is not 64 hexadecimal digits: {sha256!r}")
    return value


# --------------------------------------------------------------------------------------------- download


def _part_path(dest: Path) -> Path:
    """The partial-download file that sits beside ``dest`` until the download is complete."""
    return dest.with_name(dest.name + ".part")


def _is_http(url: str) -> bool:
    """True for http:// and https:// URLs."""
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


def _local_source(url: str) -> Path:
    """The local file behind a file:// URL or a plain path; other schemes are rejected."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"file URL {url} names a remote host {parts.netloc!r}; only local files are supported"
            )
        return Path(urllib.request.url2pathname(parts.path))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return Path(url).expanduser()
    raise ValueError(
        f"unsupported URL scheme {scheme!r} in {url}; use http://, https://, file:// or a local path"
    )


def _kept_note(part: Path) -> str:
    """The end of a network error message: whether a partial file was kept for a resumed rerun."""
    size = part.stat().st_size if part.exists() else 0
    if size:
        return f"; the partial file {part} ({size} bytes) is kept so a rerun resumes from there"
    return "; nothing was downloaded yet"


def _progress_bar(desc: str, total: int | None, initial: int, enabled: bool) -> tqdm:
    """A byte-counting tqdm bar on stderr (so it never mixes with machine-readable stdout)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
    )


def _copy_local(src: Path, part: Path, progress: bool, chunk_size: int) -> None:
    """Copy a local source into ``part`` from zero (local reads are cheap, so no resume is attempted)."""
    if not src.is_file():
        raise FileNotFoundError(f"download source {src} does not exist or is not a file")
    with (
        open(src, "rb") as reader,
        open(part, "wb") as writer,
        _progress_bar(part.name.removesuffix(".part"), src.stat().st_size, 0, progress) as bar,
    ):
        while chunk := reader.read(chunk_size):
            writer.write(chunk)
            bar.update(len(chunk))


def _open_http(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """GET ``url``, asking for ``bytes=offset-`` when resuming; proxies come from the environment."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    opener = urllib.request.build_opener()
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header; None for parts that are absent or '*'."""
    match = _CONTENT_RANGE_RE.fullmatch(value.strip()) if value else None
    if match is None:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


def _content_length(response: http.client.HTTPResponse) -> int | None:
    """The response's Content-Length, or None when the server did not send a usable one."""
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _stream_response(
    url: str, response: BinaryIO, part: Path, append: bool, expected: int | None, bar: tqdm, chunk_size: int
) -> None:
    """Write the response body into ``part``; a short or broken body raises, keeping what arrived."""
    received = 0
    try:
        with open(part, "ab" if append else "wb") as writer:
            while chunk := response.read(chunk_size):
                writer.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise RuntimeError(f"download of {url} was interrupted: {err!r}{_kept_note(part)}") from err
    if expected is not None and received < expected:
        raise RuntimeError(
            f"download of {url} was cut short: the connection closed after {received} of {expected} bytes"
            f"{_kept_note(part)}"
        )


def _part_is_complete(part: Path, content_range: str | None, sha256: str | None) -> bool:
    """Judge a .part the server answered 416 for: complete if its size is the total (or its hash matches)."""
    _, total = _parse_content_range(content_range)
    size = part.stat().st_size
    if total is not None:
        return size == total
    return sha256 is not None and sha256_file(part) == sha256


def _download_http(
    url: str, part: Path, sha256: str | None, progress: bool, chunk_size: int, timeout: float
) -> None:
    """Fill ``part`` with the whole resource at ``url``, resuming an existing .part with a Range request."""
    for _attempt in range(2):
        offset = part.stat().st_size if part.exists() else 0
        try:
            response = _open_http(url, offset, timeout)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 416 and offset:
                if _part_is_complete(part, err.headers.get("Content-Range"), sha256):
                    logger.info("%s: the server reports %s (%d bytes) is already complete", url, part, offset)
                    return
                logger.warning(
                    "%s: %s (%d bytes) does not fit the remote file; restarting", url, part, offset
                )
                part.unlink()
                continue
            raise RuntimeError(
                f"download of {url} failed: HTTP {err.code} {err.reason}{_kept_note(part)}"
            ) from err
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise RuntimeError(f"download of {url} failed: {reason}{_kept_note(part)}") from err
        with response:
            append = offset > 0 and response.status == 206
            first, total = _parse_content_range(response.headers.get("Content-Range"))
            if append and first != offset:
                logger.warning("%s: server resumed at byte %s instead of %d; restarting", url, first, offset)
                part.unlink()
                continue
            if offset and not append:
                logger.info("%s: the server ignored the Range request; restarting from byte 0", url)
            start = offset if append else 0
            length = _content_length(response)
            if total is None and length is not None:
                total = start + length
            with _progress_bar(part.name.removesuffix(".part"), total, start, progress) as bar:
                _stream_response(url, response, part, append, length, bar, chunk_size)
        return
    raise RuntimeError(f"download of {url} failed: the server answered the restarted request inconsistently")


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
) -> str:
    """Download ``url`` to ``dest`` via a resumable ``dest.part``, verify it, and return its sha256.

    A pinned ``sha256`` that does not match raises ValueError and deletes the .part; network failures raise
    RuntimeError and keep the .part so a rerun resumes with an HTTP Range request.
    """
    dest = Path(dest)
    expected = _normalise_sha256(sha256, url)
    part = _part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _is_http(url):
        _download_http(url, part, expected, progress, chunk_size, timeout)
    else:
        _copy_local(_local_source(url), part, progress, chunk_size)
    actual = sha256_file(part, chunk_size)
    if expected is not None and actual != expected:
        part.unlink()
        raise ValueError(
            f"sha256 mismatch for {url} downloaded to {dest}: expected {expected}, got {actual}; "
            "the partial file was deleted so a rerun downloads it again"
        )
    os.replace(part, dest)
    logger.info(
        "downloaded %s -> %s (%d bytes), sha256 %s (pin it in config)", url, dest, dest.stat().st_size, actual
    )
    return actual


# --------------------------------------------------------------------------------------------- extraction


def _archive_tar_mode(archive: Path) -> str | None:
    """tarfile mode for a .tar.gz/.tgz/.tar archive, None for .zip; other suffixes are rejected."""
    name = archive.name.lower()
    if name.endswith(".zip"):
        return None
    for suffix, mode in _TAR_MODES.items():
        if name.endswith(suffix):
            return mode
    raise ValueError(f"archive {archive}: unsupported format (expected .tar.gz, .tgz, .tar or .zip)")


def _check_strip(strip: int | None) -> int:
    """Validate ``strip`` (leading path components dropped from every member, like tar --strip-components)."""
    if strip is None:
        return 0
    if isinstance(strip, bool) or not isinstance(strip, int) or strip < 0:
        raise ValueError(f"extract: strip must be a non-negative integer or None, got {strip!r}")
    return strip


def _safe_parts(archive: Path, name: str) -> list[str]:
    """Path components of a member name; absolute names and '..' components raise ValueError."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"archive {archive}: member {name!r} has an absolute path; refusing to extract it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(
            f"archive {archive}: member {name!r} contains '..' (path traversal); refusing to extract it"
        )
    return parts


def _member_target(archive: Path, name: str, root: Path, n_strip: int) -> Path | None:
    """Where member ``name`` lands under ``root`` after stripping; None when stripping consumes it."""
    parts = _safe_parts(archive, name)[n_strip:]
    if not parts:
        return None
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"archive {archive}: member {name!r} would be written outside the extraction folder")
    return target


def _prepare_file_target(target: Path) -> None:
    """Create the parent folders and remove a previous entry so a file is never written through a link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_file():
        target.unlink()


def _write_stream(source: BinaryIO, target: Path) -> None:
    """Copy a member's data stream into ``target``."""
    _prepare_file_target(target)
    with open(target, "wb") as writer:
        shutil.copyfileobj(source, writer, 1 << 20)


def _extract_tar_symlink(archive: Path, member: tarfile.TarInfo, target: Path, root: Path) -> None:
    """Create a symbolic link member, provided it is relative and points inside the extraction folder."""
    link = member.linkname
    if os.path.isabs(link) or not (target.parent / link).resolve().is_relative_to(root.resolve()):
        raise ValueError(
            f"archive {archive}: symlink member {member.name!r} -> {link!r} points outside the archive"
        )
    _prepare_file_target(target)
    os.symlink(link, target)


def _extract_tar_member(
    archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, n: int
) -> None:
    """Extract one tar member (folder, file, symlink or hard link) under ``root``."""
    target = _member_target(archive, member.name, root, n)
    if target is None:
        return
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
    elif member.isreg():
        source = tar.extractfile(member)
        if source is None:
            raise ValueError(f"archive {archive}: member {member.name!r} has no data (corrupt or truncated)")
        with source:
            _write_stream(source, target)
    elif member.issym():
        _extract_tar_symlink(archive, member, target, root)
    elif member.islnk():
        linked = _member_target(archive, member.linkname, root, n)
        if linked is None or not linked.is_file():
            raise ValueError(
                f"archive {archive}: hard link {member.name!r} -> {member.linkname!r} has no file"
            )
        _prepare_file_target(target)
        shutil.copyfile(linked, target)
    else:
        raise ValueError(
            f"archive {archive}: member {member.name!r} is a device or fifo; refusing to extract it"
        )


def _drain(stream: BinaryIO) -> None:
    """Read a stream to its end so a gzip trailer (CRC, length) is checked even after the tar end marker."""
    while stream.read(1 << 20):
        pass


def _extract_tar(archive: Path, root: Path, n_strip: int, mode: str) -> None:
    """Extract every member of a tar / tar.gz archive under ``root``."""
    with tarfile.open(archive, mode) as tar:
        for member in tar:
            _extract_tar_member(archive, tar, member, root, n_strip)
        if tar.fileobj is not None:
            _drain(tar.fileobj)


def _extract_zip(archive: Path, root: Path, n_strip: int) -> None:
    """Extract every member of a zip archive under ``root``; reading each member to its end checks its CRC."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _member_target(archive, info.filename, root, n_strip)
            if target is None:
                continue
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _write_stream(source, target)


def _remove_path(path: Path) -> None:
    """Delete a folder tree, or just the link/file itself (never the data a symlink points at)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _replace_dir(staging: Path, dest_dir: Path) -> None:
    """Move the finished ``staging`` folder onto ``dest_dir``; an old one is moved aside, then deleted."""
    if not (dest_dir.exists() or dest_dir.is_symlink()):
        os.replace(staging, dest_dir)
        return
    old = dest_dir.parent / f".{dest_dir.name}.old-{secrets.token_hex(4)}"
    os.replace(dest_dir, old)
    try:
        os.replace(staging, dest_dir)
    except BaseException:
        os.replace(old, dest_dir)
        raise
    _remove_path(old)


def extract(
    archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str], strip: int | None = None
) -> Path:
    """Extract a .tar.gz/.tgz/.tar/.zip archive onto ``dest_dir`` atomically, refusing path traversal.

    ``strip`` drops that many leading path components from every member. A corrupt or truncated archive
    raises ValueError and leaves nothing behind; an existing ``dest_dir`` is replaced only after success.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    tar_mode = _archive_tar_mode(archive)
    n_strip = _check_strip(strip)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.extracting-", dir=dest_dir.parent))
    try:
        try:
            if tar_mode is None:
                _extract_zip(archive, staging, n_strip)
            else:
                _extract_tar(archive, staging, n_strip, tar_mode)
        except _CORRUPT_ERRORS as err:
            raise ValueError(
                f"archive {archive} is corrupt or truncated ({err}); delete it and download it again"
            ) from err
        _replace_dir(staging, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("extracted %s -> %s", archive, dest_dir)
    return dest_dir


# --------------------------------------------------------------------------------------------- high level


def fetch_archive(
    url: str,
    archive_path: str | os.PathLike[str],
    extract_to: str | os.PathLike[str],
    sha256: str | None = None,
    strip: int | None = None,
    progress: bool = True,
) -> FetchRecord:
    """Download a dataset archive (verified, resumable) and extract it atomically; return what was fetched."""
    archive = Path(archive_path)
    digest = download(url, archive, sha256=sha256, progress=progress)
    extracted = extract(archive, extract_to, strip=strip)
    return FetchRecord(
        url=url, archive=archive, sha256=digest, bytes=archive.stat().st_size, extracted_to=extracted
    )


def _check_relative(local: Path, rel: str | os.PathLike[str]) -> Path:
    """An expected entry as a path inside ``local``; absolute or '..' entries are configuration errors."""
    rel_path = Path(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts:
        raise ValueError(
            f"expected entry {str(rel)!r} for local copy {local} must be a relative path inside it"
        )
    return local / rel_path


def link_local_copy(
    local_path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    expected: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Point ``dest`` at an existing local copy of a dataset (a symlink, never a copy) after checking it.

    Raises FileNotFoundError naming the first missing expected entry; ``dest`` may be absent or a symlink.
    """
    local = Path(local_path).expanduser()
    if not local.is_dir():
        raise FileNotFoundError(f"local dataset copy {local} does not exist or is not a folder")
    local = local.resolve()
    for rel in expected:
        if not _check_relative(local, rel).exists():
            raise FileNotFoundError(f"local dataset copy {local} lacks the expected entry {str(rel)!r}")
    dest = Path(dest)
    if dest.exists() and not dest.is_symlink():
        raise FileExistsError(f"{dest} exists and is not a symlink; remove it before linking {local} there")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.link-{secrets.token_hex(4)}"
    os.symlink(local, tmp, target_is_directory=True)
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink()
        raise
    logger.info("linked %s -> local copy %s", dest, local)
    return dest


def write_fetch_record(record: FetchRecord, path: str | os.PathLike[str]) -> None:
    """Write the JSON sidecar of a fetch (url, sha256, size, time) atomically, for provenance."""
    write_json_atomic(
        path,
        {
            "url": record.url,
            "archive": str(record.archive),
            "sha256": record.sha256,
            "size": record.bytes,
            "extracted_to": str(record.extracted_to),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
