"""Resumable HTTP(S) downloads with a checksum, timeouts and a size cap: stdlib (plus tqdm).

Bytes go to ``<dest>.part`` and where they came from to ``<dest>.part.json`` (URL, ETag,
Last-Modified, length). An interrupted download keeps both; the next call for the same URL asks
for the rest with ``Range`` + ``If-Range`` and appends only when the server confirms the same
resource (same validator, same length). Anything else (another URL, a changed ETag, no validator
to check, a server that ignores Range) starts over from byte 0: a file never splices two sources.

The result must be provably complete (its sha256 matches, or the server announced the length or
sent it chunked and every byte arrived) before it is renamed into place (``os.replace``, atomic),
so `dest` is either absent or complete; the sidecar is removed then.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from mri_vqvae import __version__
from mri_vqvae.core.atomic import atomic_write_text
from mri_vqvae.core.errors import DownloadError
from mri_vqvae.core.provenance import sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
READ_TIMEOUT = 60.0
"""Default seconds to wait for the connection and for each read before giving up."""
DEFAULT_MAX_BYTES = 64 << 30
"""Size cap (64 GiB) when the server announces no length and no `max_bytes` is given."""
_PROBE = 1.0  # seconds to wait, after the announced length, for bytes the server should not send
_SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_UNSATISFIABLE_RE = re.compile(r"^bytes \*/(\d+)$")


@dataclass(frozen=True)
class _Source:
    """What the sidecar remembers about the bytes in the ``.part`` file."""

    url: str
    etag: str | None
    last_modified: str | None
    length: int | None

    def validator(self) -> str | None:
        """The If-Range value: a strong ETag, else Last-Modified (weak ETags are not allowed)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


@dataclass(frozen=True)
class _Limits:
    timeout: float
    total: float | None
    deadline: float | None

    def wait(self, url: str, part: Path) -> float:
        """Seconds the next connect or read may block; raises once the overall time is up."""
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired(url, part)
        return min(self.timeout, left)

    def expired(self, url: str, part: Path) -> DownloadError:
        """The error for a timeout: the overall one when it is up, else the per-read one."""
        keep = (f"the partial download {part} is kept: run the same command again to resume"
                if part.is_file() and part.stat().st_size else "retry later")
        if self.deadline is not None and time.monotonic() >= self.deadline - 0.01:
            return DownloadError(f"{url}: not finished within the overall timeout of "
                                 f"{self.total:g} s; {keep}, or raise total_timeout "
                                 "(--total-timeout)")
        return DownloadError(f"{url}: no data from the server for {self.timeout:g} s (read "
                             f"timeout); {keep}, or raise timeout (--timeout)")


class _Unsatisfiable(Exception):
    """A 416 answer to a Range request; carries its headers."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__("416")
        self.headers = headers


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = READ_TIMEOUT,
    total_timeout: float | None = None,
    max_bytes: int | None = None,
) -> Path:
    """Download `url` to `dest` (resuming a ``.part`` file) and check its sha256; returns `dest`.

    `timeout` (default 60 s) bounds connecting and every wait for data, so a stalled server fails
    fast. `total_timeout` bounds the whole call; the default None means no overall limit, since a
    live transfer of a large file may take hours and a stall is already caught by `timeout`.
    `max_bytes` caps the size: by default the length the server announces, or 64 GiB when it
    announces none. A body longer than announced or over the cap is refused and deleted.

    An existing `dest` whose sha256 matches is kept without a request. Raises `DownloadError`
    naming the URL on an HTTP or network error, a timeout or an interrupted transfer (the
    ``.part`` is kept: call again to resume), a checksum mismatch (the download is deleted), or
    when without `sha256` the server sent no length, so completeness cannot be proven (kept).
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"{url}: only http:// and https:// URLs can be fetched")
    if sha256 is not None and not _SHA_RE.match(sha256):
        raise DownloadError(f"{url}: expected sha256 must be 64 hex digits, got {sha256!r}")
    for name, value in (("timeout", timeout), ("total_timeout", total_timeout),
                        ("max_bytes", max_bytes)):
        if value is not None and not value > 0:
            raise DownloadError(f"{url}: {name} must be > 0, got {value!r}")
    want = sha256.lower() if sha256 else None
    if want and dest.is_file() and sha256_file(dest) == want:
        log.info("%s already present with the expected sha256", dest)
        return dest
    if want is None:
        log.warning("fetching %s without a sha256: its content cannot be verified", url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    deadline = None if total_timeout is None else time.monotonic() + total_timeout
    lim = _Limits(timeout, total_timeout, deadline)
    complete = _download(url, part, meta, lim, max_bytes, progress)
    _finish(url, part, meta, dest, want, complete)
    log.info("downloaded %s -> %s", url, dest)
    return dest


def _download(url: str, part: Path, meta: Path, lim: _Limits, max_bytes: int | None,
              progress: bool) -> bool:
    """Fill `part` with the resource; True when the transfer is known to be complete."""
    saved = _resumable(url, part, meta)
    if saved is not None:
        offset = part.stat().st_size
        headers = {"Range": f"bytes={offset}-", "If-Range": saved.validator() or ""}
        try:
            resp = _open(url, part, lim, headers)
        except _Unsatisfiable as exc:
            if _already_whole(saved, exc.headers, offset):
                return True
            log.info("%s: the server refused the byte range; restarting from byte 0", url)
        else:
            with resp:
                if resp.status != 206:
                    log.info("%s changed or ignores Range requests; restarting from byte 0", url)
                    return _receive(url, resp, part, meta, lim, max_bytes, progress)
                total = _continues(url, resp, saved, offset)
                if total is not None:
                    log.info("%s: resuming at byte %d", url, offset)
                    return _receive(url, resp, part, meta, lim, max_bytes, progress, offset,
                                    total)
    with _open(url, part, lim, {}) as resp:
        if resp.status == 206:
            raise DownloadError(f"{url}: the server sent part of the file (HTTP 206) to a request "
                                "for all of it; retry later or use another mirror")
        return _receive(url, resp, part, meta, lim, max_bytes, progress)


def _resumable(url: str, part: Path, meta: Path) -> _Source | None:
    """The sidecar of `part` when its bytes may be continued from `url`, else None."""
    if not part.is_file() or not part.stat().st_size:
        return None
    saved = _load_source(meta)
    if saved is None:
        why = "no readable record of its source"
    elif saved.url != url:
        why = f"it came from {saved.url}"
    elif saved.validator() is None:
        why = "the server gave no ETag or Last-Modified to check it against"
    elif saved.length is not None and part.stat().st_size > saved.length:
        why = "it is longer than the file"
    else:
        return saved
    log.info("%s: not resuming %s (%s); starting from byte 0", url, part, why)
    return None


def _load_source(meta: Path) -> _Source | None:
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
        source = _Source(doc["url"], doc["etag"], doc["last_modified"], doc["length"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    ok = (isinstance(source.url, str) and isinstance(source.etag, str | None)
          and isinstance(source.last_modified, str | None)
          and (source.length is None or type(source.length) is int))
    return source if ok else None


def _open(url: str, part: Path, lim: _Limits,
          headers: Mapping[str, str]) -> http.client.HTTPResponse:
    """The response to a GET; raises `_Unsatisfiable` for a 416 to a Range request."""
    request = urllib.request.Request(
        url, headers={"User-Agent": f"mri-vqvae/{__version__}", **headers})
    try:
        return urllib.request.urlopen(request, timeout=lim.wait(url, part))
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and "Range" in headers:
            raise _Unsatisfiable(exc.headers) from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL") from None
    except TimeoutError:
        raise lim.expired(url, part) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise lim.expired(url, part) from None
        raise DownloadError(f"{url}: cannot connect ({reason}); check the network") from None


def _already_whole(saved: _Source, headers: Mapping[str, str], offset: int) -> bool:
    """Whether a 416 says the ``.part`` (of `offset` bytes) already is the whole, same file."""
    m = _UNSATISFIABLE_RE.match(headers.get("Content-Range", "") or "")
    etag = headers.get("ETag")
    return (m is not None and int(m.group(1)) == offset
            and saved.length in (None, offset) and (etag is None or etag == saved.etag))


def _continues(url: str, resp: http.client.HTTPResponse, saved: _Source,
               offset: int) -> int | None:
    """The total length when a 206 continues the saved bytes of the same resource, else None."""
    m = _RANGE_RE.match(resp.headers.get("Content-Range", "") or "")
    etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
    if not m or int(m.group(1)) != offset or int(m.group(2)) != int(m.group(3)) - 1:
        why = f"it sent Content-Range {resp.headers.get('Content-Range')!r}"
    elif saved.etag is not None and etag != saved.etag:
        why = f"its ETag changed from {saved.etag} to {etag}"
    elif saved.etag is None and modified != saved.last_modified:
        why = f"its Last-Modified changed from {saved.last_modified} to {modified}"
    elif saved.length is not None and int(m.group(3)) != saved.length:
        why = f"its length changed from {saved.length} to {m.group(3)}"
    else:
        return int(m.group(3))
    log.info("%s: cannot resume (%s); restarting from byte 0", url, why)
    return None


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    if resp.chunked:
        return None
    length = (resp.headers.get("Content-Length") or "").strip()
    return int(length) if length.isdigit() else None


def _receive(url: str, resp: http.client.HTTPResponse, part: Path, meta: Path, lim: _Limits,
             max_bytes: int | None, progress: bool, offset: int = 0,
             total: int | None = None) -> bool:
    """Write the body to `part` (appending after `offset` bytes, or from scratch when 0).

    Returns True when the body is known complete (announced length reached, or chunked).
    """
    if not offset:
        total = _content_length(resp)
    cap = max_bytes if max_bytes is not None else total if total is not None else DEFAULT_MAX_BYTES
    if total is not None and total > cap:
        _discard(part, meta)
        raise DownloadError(f"{url}: the server announces {total} bytes, over the limit of {cap} "
                            "bytes; nothing was kept. Raise max_bytes (--max-bytes) if that size "
                            "is expected")
    if not offset:
        atomic_write_text(meta, json.dumps(asdict(_Source(
            url, resp.headers.get("ETag"), resp.headers.get("Last-Modified"), total))) + "\n")
    body = None if total is None else total - offset
    show = progress and sys.stderr.isatty()
    with open(part, "ab" if offset else "wb") as fh, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-5],
        disable=not show,
    ) as bar:
        try:
            got = _copy(url, resp, fh, bar, part, lim, body, cap - offset)
        finally:
            fh.flush()
            os.fsync(fh.fileno())
    if body is not None and got > body:
        _discard(part, meta)
        raise DownloadError(f"{url}: the server sent more than the {total} bytes it announced; "
                            "the download was deleted. Retry later or use another mirror")
    if offset + got > cap:
        _discard(part, meta)
        raise DownloadError(f"{url}: the download exceeds the limit of {cap} bytes and was "
                            "deleted; raise max_bytes (--max-bytes) if that size is expected")
    if body is not None and got < body:
        raise DownloadError(
            f"{url}: connection closed after {offset + got} of {total} bytes; the partial "
            f"download {part} is kept: run the same command again to resume"
        )
    return body is not None or bool(resp.chunked)


def _copy(url: str, resp: http.client.HTTPResponse, fh: IO[bytes], bar: tqdm, part: Path,
          lim: _Limits, body: int | None, room: int) -> int:
    """Copy the body into `fh`; returns the byte count, stopping once it exceeds `body` or `room`.

    With a known length the socket is read past it, so a longer body is caught, not cut.
    """
    raw = body is not None and resp.fp is not None
    sock = _socket(resp)
    got = 0
    while True:
        probe = raw and got == body
        limit = min(lim.timeout, _PROBE) if probe else lim.wait(url, part)
        if sock is not None:
            sock.settimeout(limit)
        try:
            chunk = resp.fp.read1(CHUNK) if raw else resp.read1(CHUNK)
        except TimeoutError:
            if probe:
                return got  # the server kept the connection open after the whole body
            raise lim.expired(url, part) from None
        except (http.client.HTTPException, OSError) as exc:
            raise DownloadError(
                f"{url}: transfer interrupted ({type(exc).__name__}); the partial download "
                f"{part} is kept: run the same command again to resume"
            ) from None
        if not chunk:
            return got
        got += len(chunk)
        if (body is not None and got > body) or got > room:
            return got
        fh.write(chunk)
        bar.update(len(chunk))


def _socket(resp: http.client.HTTPResponse) -> socket.socket | None:
    """The response's socket (to shorten its timeout per read), when it can be reached."""
    sock = getattr(getattr(resp.fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _discard(part: Path, meta: Path) -> None:
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def _finish(url: str, part: Path, meta: Path, dest: Path, want: str | None,
            complete: bool) -> None:
    """Check `part` (sha256, or a proven length) and rename it to `dest`; drop the sidecar."""
    if want is not None:
        got = sha256_file(part)
        if got != want:
            _discard(part, meta)
            raise DownloadError(
                f"{url}: sha256 {got} does not match the expected {want}; the download was "
                "deleted. The file changed upstream or the checksum is wrong"
            )
    elif not complete:
        raise DownloadError(
            f"{url}: the server sent no length, so the transfer could not be verified complete "
            f"(the connection may have dropped); the partial download {part} is kept. Pass the "
            "expected sha256 (--sha256) to let the checksum decide"
        )
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
