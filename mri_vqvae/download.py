"""Resumable HTTP(S) downloads with a checksum: stdlib (plus tqdm for the progress bar).

Bytes go to ``<dest>.part``; an interrupted download keeps it, and the next call asks the server
for the rest with a ``Range`` request (starting over when the server ignores it). The finished
file is checked against its sha256 and only then renamed into place (``os.replace``, atomic), so
`dest` is either absent or complete and verified.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from mri_vqvae import __version__
from mri_vqvae.errors import DownloadError
from mri_vqvae.manifest import sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIABLE_RE = re.compile(r"^bytes \*/(\d+)$")


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` (resuming a ``.part`` file) and check its sha256; returns `dest`.

    An existing `dest` whose sha256 matches is kept without a request. Raises `DownloadError`
    naming the URL on an HTTP or network error, an interrupted transfer (the ``.part`` is kept:
    call again to resume) or a checksum mismatch (the download is deleted).
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"{url}: only http:// and https:// URLs can be fetched")
    if sha256 is not None and not _SHA_RE.match(sha256):
        raise DownloadError(f"{url}: expected sha256 must be 64 hex digits, got {sha256!r}")
    want = sha256.lower() if sha256 else None
    if want and dest.is_file() and sha256_file(dest) == want:
        log.info("%s already present with the expected sha256", dest)
        return dest
    if want is None:
        log.warning("fetching %s without a sha256: its content cannot be verified", url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download(url, part, progress, timeout)
    _finish(url, part, dest, want)
    log.info("downloaded %s -> %s", url, dest)
    return dest


def _download(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Fill `part` with the whole resource, resuming from its current size when possible."""
    offset = part.stat().st_size if part.is_file() else 0
    for _ in range(2):
        resp = _open(url, offset, timeout)
        if resp is None:  # 416: the .part already holds the whole file
            return
        if isinstance(resp, int):  # 416 and the .part does not fit: start over
            part.unlink(missing_ok=True)
            offset = 0
            continue
        with resp:
            offset = _resume_offset(url, resp, offset)
            _stream(url, resp, part, offset, progress)
        return
    raise DownloadError(f"{url}: the server refused the byte range twice; delete {part} and retry")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | int | None:
    """The response; None when a 416 says `offset` is already the full length, else 416."""
    headers = {"User-Agent": f"mri-vqvae/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            m = _UNSATISFIABLE_RE.match(exc.headers.get("Content-Range", "") or "")
            exc.close()
            return None if m and int(m.group(1)) == offset else 416
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason}); check the network") from None


def _resume_offset(url: str, resp: http.client.HTTPResponse, offset: int) -> int:
    """Where the body starts in the file: `offset` for a matching 206, 0 for a full 200."""
    if not offset:
        return 0
    if resp.status != 206:
        log.info("%s: server ignored the Range request; restarting from byte 0", url)
        return 0
    m = _RANGE_RE.match(resp.headers.get("Content-Range", "") or "")
    if not m or int(m.group(1)) != offset:
        raise DownloadError(
            f"{url}: asked for bytes from {offset} but the server sent "
            f"{resp.headers.get('Content-Range')!r}; delete the .part file and retry"
        )
    log.info("%s: resuming at byte %d", url, offset)
    return offset


def _stream(url: str, resp: http.client.HTTPResponse, part: Path, offset: int,
            progress: bool) -> None:
    """Append the body to `part` (truncating it first when `offset` is 0)."""
    length = resp.headers.get("Content-Length")
    expected = int(length) if length and length.isdigit() else None
    total = None if expected is None else offset + expected
    show = progress and sys.stderr.isatty()
    got = 0
    with open(part, "ab" if offset else "wb") as fh, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5],
        disable=not show,
    ) as bar:
        try:
            got = _copy(resp, fh, bar)
        finally:
            fh.flush()
            os.fsync(fh.fileno())
    if expected is not None and got < expected:
        raise DownloadError(
            f"{url}: connection closed after {offset + got} of {total} bytes; the partial "
            f"download {part} is kept: run the same command again to resume"
        )


def _copy(resp: http.client.HTTPResponse, fh: IO[bytes], bar: tqdm) -> int:
    got = 0
    while True:
        try:
            chunk = resp.read(CHUNK)
        except (http.client.IncompleteRead, OSError) as exc:
            raise DownloadError(
                f"{resp.geturl()}: transfer interrupted ({type(exc).__name__}); the partial "
                "download is kept: run the same command again to resume"
            ) from None
        if not chunk:
            return got
        fh.write(chunk)
        got += len(chunk)
        bar.update(len(chunk))


def _finish(url: str, part: Path, dest: Path, want: str | None) -> None:
    """Check the sha256 of `part` and rename it to `dest`; delete it on a mismatch."""
    if want is not None:
        got = sha256_file(part)
        if got != want:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url}: sha256 {got} does not match the expected {want}; the download was "
                "deleted. The file changed upstream or the checksum is wrong"
            )
    os.replace(part, dest)
