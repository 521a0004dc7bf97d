"""Dataset fetching: streamed, resumable, sha256-verified downloads and atomic, traversal-safe extraction.

Used by the Snakemake fetch rules. Downloads go to ``<dest>.part`` and are renamed onto ``<dest>`` only once
complete and verified:

- complete means the byte count the server announced (Content-Length / Content-Range), a chunked body that
  ended with its last chunk, or, when the server announced nothing, a follow-up Range request that the
  server answers "nothing beyond this" (416); a body that just stops is never taken as the whole file;
- ``<dest>.part.json`` records which remote file a ``.part`` holds (URL, ETag / Last-Modified, size); a
  resume sends ``If-Range`` and never appends to a ``.part`` of another URL or another version;
- ``<dest>.download.json`` records a finished download (URL, size, sha256), so a rerun after a later step
  failed (extraction, say) reuses the file instead of downloading it again.

Extraction happens in a hidden sibling folder that is renamed onto the target only once every member has
been written, so a killed job never leaves a half dataset behind; the staging folders of killed jobs are
swept by the next extraction. A corrupt archive is deleted (with its record) so the rerun downloads it again;
a full disk raises an error naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
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
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from sd4match.io import (
    dir_mode,
    disk_full_error,
    is_disk_full,
    owner_tag,
    remove_path,
    sweep_leftovers,
    write_json_atomic,
)

logger = logging.getLogger("sd4match.fetch")

_USER_AGENT = "sd4match-fetch/0.1 (python urllib)"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
_MAX_ROUNDS = 6  # requests one download may take (first GET, resumes, end-of-file probes, restarts)
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


class CorruptArchiveError(ValueError):
    """An archive that cannot be read to its end: truncated, damaged, or not the format its name says."""


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
            try:
                writer.write(chunk)
            except OSError as err:
                if is_disk_full(err):
                    raise disk_full_error(err, part, f"copying {src} to") from err
                raise
            bar.update(len(chunk))


# ------------------------------------------------------------------------------- which remote file a .part is


@dataclass(frozen=True)
class RemoteVersion:
    """What identifies the remote file a ``.part`` holds: its URL, validators and size (None when unknown)."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    total: int | None = None

    @property
    def if_range(self) -> str | None:
        """The ``If-Range`` value: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def same_file(self, other: RemoteVersion) -> bool:
        """Whether ``other`` (a later response) is the same remote file; unknown counts as different."""
        if self.url != other.url:
            return False
        if self.etag and other.etag:
            return self.etag == other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified == other.last_modified
        return self.total is not None and self.total == other.total


def _version_path(part: Path) -> Path:
    """``<dest>.part.json``: the RemoteVersion of a ``.part``."""
    return part.with_name(part.name + ".json")


def _read_version(part: Path) -> RemoteVersion | None:
    """The recorded RemoteVersion of ``part``; None when absent or unreadable."""
    try:
        return RemoteVersion(**json.loads(_version_path(part).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _forget_part(part: Path) -> None:
    """Delete a ``.part`` and its version record."""
    part.unlink(missing_ok=True)
    _version_path(part).unlink(missing_ok=True)


def _resume_refusal(part: Path, saved: RemoteVersion | None, url: str) -> str | None:
    """Why an existing ``part`` must not be resumed for ``url`` (None: resume it, or there is nothing)."""
    if not part.exists():
        return None
    if saved is None:
        return "nothing records which file it belongs to"
    if saved.url != url:
        return f"it belongs to {saved.url}"
    if saved.if_range is None and saved.total is None:
        return "the server gave no ETag, Last-Modified or length to check a resumed transfer against"
    if saved.total is not None and part.stat().st_size > saved.total:
        return f"it is larger than the {saved.total} bytes of the file"
    return None


# --------------------------------------------------------------------------------------------------- HTTP


def _open_http(url: str, offset: int, if_range: str | None, timeout: float) -> http.client.HTTPResponse:
    """GET ``url``, asking for ``bytes=offset-`` (only if still ``if_range``) when resuming."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if if_range:
            headers["If-Range"] = if_range
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


def _is_chunked(response: http.client.HTTPResponse) -> bool:
    """A chunked body: http.client raises IncompleteRead unless its last chunk arrives."""
    return "chunked" in response.headers.get("Transfer-Encoding", "").lower()


def _response_version(url: str, response: http.client.HTTPResponse, total: int | None) -> RemoteVersion:
    return RemoteVersion(
        url=url,
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
        total=total,
    )


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
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(err, part, f"downloading {url} to") from err
        raise RuntimeError(f"download of {url} was interrupted: {err!r}{_kept_note(part)}") from err
    except http.client.HTTPException as err:
        raise RuntimeError(f"download of {url} was interrupted: {err!r}{_kept_note(part)}") from err
    if expected is not None and received < expected:
        raise RuntimeError(
            f"download of {url} was cut short: the connection closed after {received} of {expected} bytes"
            f"{_kept_note(part)}"
        )


def _part_is_complete(
    part: Path, content_range: str | None, sha256: str | None, saved: RemoteVersion | None, probing: bool
) -> bool:
    """Judge a .part the server answered 416 for: complete if its size is the total (or its hash matches).

    Without any total, a 416 to the probe sent right after a body of unknown length says the body was all.
    """
    _, total = _parse_content_range(content_range)
    total = total if total is not None else (saved.total if saved is not None else None)
    size = part.stat().st_size
    if total is not None:
        return size == total
    if sha256 is not None:
        return sha256_file(part) == sha256
    return probing


class _Restart(Exception):
    """The .part does not fit the remote file: start again from byte 0."""


@dataclass
class _HttpDownload:
    """One download of ``url`` into ``part``: resumes, version checks and end-of-file confirmation."""

    url: str
    part: Path
    sha256: str | None
    progress: bool
    chunk_size: int
    timeout: float
    saved: RemoteVersion | None = None
    probing: bool = False  # the last body had no length: the next request only confirms its end

    def run(self) -> None:
        self.saved = _read_version(self.part)
        refusal = _resume_refusal(self.part, self.saved, self.url)
        if refusal:
            logger.warning(
                "%s: not resuming %s (%s); downloading from the start", self.url, self.part, refusal
            )
            self._restart()
        for _round in range(_MAX_ROUNDS):
            try:
                if self._round():
                    return
            except _Restart:
                self._restart()
        raise RuntimeError(
            f"download of {self.url} failed: the server answered {_MAX_ROUNDS} requests inconsistently"
            f"{_kept_note(self.part)}"
        )

    def _restart(self) -> None:
        _forget_part(self.part)
        self.saved, self.probing = None, False

    def _round(self) -> bool:
        """One request; True when ``part`` holds the whole file."""
        offset = self.part.stat().st_size if self.part.exists() else 0
        if_range = self.saved.if_range if self.saved is not None else None
        try:
            response = _open_http(self.url, offset, if_range, self.timeout)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 416 and offset:
                if _part_is_complete(
                    self.part, err.headers.get("Content-Range"), self.sha256, self.saved, self.probing
                ):
                    logger.info(
                        "%s: the server confirms %s (%d bytes) is complete", self.url, self.part, offset
                    )
                    return True
                logger.warning(
                    "%s: %s (%d bytes) does not fit the remote file; restarting", self.url, self.part, offset
                )
                raise _Restart from None
            raise RuntimeError(
                f"download of {self.url} failed: HTTP {err.code} {err.reason}{_kept_note(self.part)}"
            ) from err
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise RuntimeError(f"download of {self.url} failed: {reason}{_kept_note(self.part)}") from err
        with response:
            return self._receive(response, offset)

    def _receive(self, response: http.client.HTTPResponse, offset: int) -> bool:
        """Append a 206 / write a 200 body into ``part``; True when it provably ends the file."""
        first, total = _parse_content_range(response.headers.get("Content-Range"))
        length = _content_length(response)
        if response.status == 206:
            current = _response_version(self.url, response, total)
            if not offset or first != offset or not self._continues(current):
                logger.warning(
                    "%s: the server resumed at byte %s of another version or offset (wanted %d); restarting",
                    self.url,
                    first,
                    offset,
                )
                raise _Restart
            start = offset
        else:
            current = _response_version(self.url, response, length)
            if self.probing and not (current.if_range and self.saved and not self.saved.same_file(current)):
                return self._unconfirmable()
            if offset:
                logger.info(
                    "%s: the server sent the whole file (Range ignored or a new version); restarting",
                    self.url,
                )
            start = 0
            self.saved = current
            write_json_atomic(_version_path(self.part), asdict(current))  # before the body: a kill can resume
        if total is None and length is not None:
            total = start + length
        with _progress_bar(self.part.name.removesuffix(".part"), total, start, self.progress) as bar:
            _stream_response(self.url, response, self.part, start > 0, length, bar, self.chunk_size)
        if total is not None or _is_chunked(response):
            return True
        self.probing = True  # a body that just stopped may have been cut: ask for what lies beyond it
        return False

    def _continues(self, current: RemoteVersion) -> bool:
        """Whether a 206 continues the file in ``part``: the same version, or (within this download, for a
        server without validators or length) the rest of the body just received."""
        if self.saved is None:
            return False
        if self.saved.same_file(current):
            return True
        unidentified = self.saved.if_range is None and self.saved.total is None
        if self.probing and unidentified:
            self.saved = current
            write_json_atomic(_version_path(self.part), asdict(current))
            return True
        return False

    def _unconfirmable(self) -> bool:
        """The server ignores Range and announces no length: only a pinned sha256 can vouch for the file."""
        if self.sha256 is not None:
            return True  # download() compares the hash
        raise RuntimeError(
            f"download of {self.url}: cannot tell whether the {self.part.stat().st_size} bytes received are "
            "the whole file (the server sends no Content-Length and ignores Range requests); pin its sha256 "
            f"in the config to accept it; sha256 of what arrived: {sha256_file(self.part)}"
            f"{_kept_note(self.part)}"
        )


def _download_http(
    url: str, part: Path, sha256: str | None, progress: bool, chunk_size: int, timeout: float
) -> None:
    """Fill ``part`` with the whole resource at ``url``, resuming an existing .part of the same file."""
    _HttpDownload(url, part, sha256, progress, chunk_size, timeout).run()


# --------------------------------------------------------------------------------------- finished downloads


def _record_path(dest: Path) -> Path:
    """``<dest>.download.json``: where a finished download came from, its size and sha256."""
    return dest.with_name(dest.name + ".download.json")


def _reusable(dest: Path, url: str, expected: str | None) -> str | None:
    """The sha256 of an earlier complete download of ``url`` at ``dest`` (None: download it).

    The record must name the same URL and size; a pinned sha256 is checked against the file itself.
    """
    if not dest.is_file():
        return None
    try:
        record = json.loads(_record_path(dest).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("url") != url or record.get("size") != dest.stat().st_size:
        logger.info("%s exists but no record says it is the complete download of %s; downloading", dest, url)
        return None
    digest = str(record.get("sha256"))
    if expected is not None and (digest != expected or sha256_file(dest) != expected):
        logger.info("%s does not have the pinned sha256 %s; downloading %s again", dest, expected, url)
        return None
    logger.info("%s: already downloaded from %s (sha256 %s); not downloading it again", dest, url, digest)
    return digest


def forget_download(dest: str | os.PathLike[str]) -> None:
    """Delete a finished download and its record (a corrupt archive), so the next fetch downloads it again."""
    dest = Path(dest)
    dest.unlink(missing_ok=True)
    _record_path(dest).unlink(missing_ok=True)


def download(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
) -> str:
    """Download ``url`` to ``dest`` via a resumable ``dest.part``, verify it, and return its sha256.

    An earlier complete download of the same URL at ``dest`` is reused. A pinned ``sha256`` that does not
    match raises ValueError and deletes the .part; network failures raise RuntimeError and keep the .part so a
    rerun resumes it (with an HTTP Range request, if the server still has the same file).
    """
    dest = Path(dest)
    expected = _normalise_sha256(sha256, url)
    reused = _reusable(dest, url, expected)
    if reused is not None:
        return reused
    part = _part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _is_http(url):
        _download_http(url, part, expected, progress, chunk_size, timeout)
    else:
        _forget_part(part)
        _copy_local(_local_source(url), part, progress, chunk_size)
    actual = sha256_file(part, chunk_size)
    if expected is not None and actual != expected:
        _forget_part(part)
        raise ValueError(
            f"sha256 mismatch for {url} downloaded to {dest}: expected {expected}, got {actual}; "
            "the partial file was deleted so a rerun downloads it again"
        )
    _record_path(dest).unlink(missing_ok=True)
    os.replace(part, dest)
    write_json_atomic(_record_path(dest), {"url": url, "size": dest.stat().st_size, "sha256": actual})
    _version_path(part).unlink(missing_ok=True)
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
    """Copy a member's data stream into ``target``; a full disk raises naming ``target``."""
    _prepare_file_target(target)
    try:
        with open(target, "wb") as writer:
            shutil.copyfileobj(source, writer, 1 << 20)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(err, target, "extracting") from err
        raise


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


def _replace_dir(staging: Path, dest_dir: Path) -> None:
    """Move the finished ``staging`` folder onto ``dest_dir``; an old one is moved aside, then deleted."""
    if not (dest_dir.exists() or dest_dir.is_symlink()):
        os.replace(staging, dest_dir)
        return
    old = dest_dir.parent / f".{dest_dir.name}.old-{owner_tag()}-{secrets.token_hex(4)}"
    os.replace(dest_dir, old)
    try:
        os.replace(staging, dest_dir)
    except BaseException:
        os.replace(old, dest_dir)
        raise
    remove_path(old)


def sweep_extraction_leftovers(dest_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the staging / set-aside folders of ``dest_dir`` that killed extractions on this host left."""
    dest_dir = Path(dest_dir)
    return [
        *sweep_leftovers(dest_dir.parent, f".{dest_dir.name}.extracting-"),
        *sweep_leftovers(dest_dir.parent, f".{dest_dir.name}.old-"),
    ]


def extract(
    archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str], strip: int | None = None
) -> Path:
    """Extract a .tar.gz/.tgz/.tar/.zip archive onto ``dest_dir`` atomically, refusing path traversal.

    ``strip`` drops that many leading path components from every member. A corrupt or truncated archive
    raises CorruptArchiveError (a ValueError) and leaves nothing behind; an existing ``dest_dir`` is replaced
    only after success. Folders get the umask's permissions; what killed extractions left is swept first.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    tar_mode = _archive_tar_mode(archive)
    n_strip = _check_strip(strip)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_extraction_leftovers(dest_dir)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{dest_dir.name}.extracting-{owner_tag()}-", dir=dest_dir.parent)
    )
    try:
        staging.chmod(dir_mode())  # mkdtemp makes 0700; the dataset folder is the user's usual folder
        try:
            if tar_mode is None:
                _extract_zip(archive, staging, n_strip)
            else:
                _extract_tar(archive, staging, n_strip, tar_mode)
        except _CORRUPT_ERRORS as err:
            raise CorruptArchiveError(
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
    """Download a dataset archive (verified, resumable, reused when complete) and extract it atomically.

    A corrupt archive is deleted with its record, so the rerun downloads it again; any other failure of the
    extraction (a full disk, a kill) keeps the verified archive for the rerun.
    """
    archive = Path(archive_path)
    digest = download(url, archive, sha256=sha256, progress=progress)
    try:
        extracted = extract(archive, extract_to, strip=strip)
    except CorruptArchiveError as err:
        forget_download(archive)
        raise CorruptArchiveError(
            f"{err}; the archive downloaded from {url} was deleted, so a rerun downloads it again"
        ) from err
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
    sweep_leftovers(dest.parent, f".{dest.name}.link-")
    tmp = dest.parent / f".{dest.name}.link-{owner_tag()}-{secrets.token_hex(4)}"
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
