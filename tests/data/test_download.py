"""Downloads against a local HTTP server (127.0.0.1 only) that resumes, stalls, lies or changes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mri_vqvae.core.errors import DownloadError
from mri_vqvae.data.download import fetch

PAYLOAD = os.urandom(200_000)
OTHER = os.urandom(200_000)  # same length: only the URL or the ETag tells them apart
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MODIFIED = "Tue, 01 Apr 2025 10:00:00 GMT"


class Server(ThreadingHTTPServer):
    """Serves `files` by path; behaviour switches are plain attributes."""

    daemon_threads = True
    etag: str | None = '"v1"'
    last_modified: str | None = None
    honour_range = True
    honour_if_range = True
    send_length = True
    chunked = False
    truncate_next = False  # send a third of the body, then close the connection
    stall_next = False  # send a third of the body, then go silent until released
    drip = False  # send the body in small pieces, slowly
    extra = b""  # bytes sent beyond the announced Content-Length
    files: dict[str, bytes]
    ranges: list[str | None]
    if_ranges: list[str | None]
    release: threading.Event

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up mid-body is part of these tests


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        srv = self.server
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        srv.ranges.append(rng)
        srv.if_ranges.append(if_range)
        payload = srv.files.get(self.path)
        if payload is None:
            self.send_error(404, "Not Found")
            return
        same = if_range is None or if_range in (srv.etag, srv.last_modified)
        use = rng and srv.honour_range and (same or not srv.honour_if_range)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if use else 0
        if start >= len(payload):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(payload)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = payload[start:]
        if srv.chunked:
            self.protocol_version = "HTTP/1.1"
            self.close_connection = True
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        if srv.send_length and not srv.chunked:
            self.send_header("Content-Length", str(len(body)))
        for name, value in (("ETag", srv.etag), ("Last-Modified", srv.last_modified),
                            ("Transfer-Encoding", "chunked" if srv.chunked else None)):
            if value:
                self.send_header(name, value)
        self.end_headers()
        self._send(body)

    def _send(self, body: bytes) -> None:
        srv = self.server
        if srv.chunked:
            cut = len(body) // 3 if srv.truncate_next else len(body)
            srv.truncate_next = False
            for i in range(0, cut, 50_000):
                piece = body[i:min(i + 50_000, cut)]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            if cut == len(body):
                self.wfile.write(b"0\r\n\r\n")
        elif srv.truncate_next or srv.stall_next:
            stall, srv.truncate_next, srv.stall_next = srv.stall_next, False, False
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            if stall:
                srv.release.wait(5)
        elif srv.drip:
            for i in range(0, len(body), 2_000):
                self.wfile.write(body[i:i + 2_000])
                self.wfile.flush()
                if srv.release.wait(0.02):
                    return
        else:
            self.wfile.write(body + srv.extra)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.files = {"/vol.nii.gz": PAYLOAD, "/a.nii.gz": PAYLOAD, "/b.nii.gz": OTHER}
    srv.ranges, srv.if_ranges, srv.release = [], [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def url(srv: Server, path: str = "/vol.nii.gz") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def interrupt(srv: Server, dest: Path, path: str = "/vol.nii.gz") -> int:
    """A fetch cut off mid-body; returns the size of the .part it leaves."""
    srv.truncate_next = True
    with pytest.raises(DownloadError, match="127.0.0.1.*resume"):
        fetch(url(srv, path), dest)
    assert not dest.exists()
    return dest.with_name(dest.name + ".part").stat().st_size


def test_full_fetch(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "vol.nii.gz"
    assert fetch(url(server), dest, sha256=SHA.upper()) == dest
    assert dest.read_bytes() == PAYLOAD and names(dest.parent) == ["vol.nii.gz"]
    assert server.ranges == [None]
    fetch(url(server), dest, sha256=SHA)  # already there and verified: no request
    assert server.ranges == [None]


@pytest.mark.parametrize(("etag", "modified", "if_range"), [
    ('"v1"', None, '"v1"'),
    ('W/"v1"', MODIFIED, MODIFIED),  # a weak ETag may not be used in If-Range
    (None, MODIFIED, MODIFIED),
])
def test_interrupted_fetch_resumes_from_part(server: Server, tmp_path: Path, etag: str | None,
                                             modified: str | None, if_range: str) -> None:
    server.etag, server.last_modified = etag, modified
    dest = tmp_path / "vol.nii.gz"
    kept = interrupt(server, dest)
    part = tmp_path / "vol.nii.gz.part"
    assert 0 < kept < len(PAYLOAD) and part.read_bytes() == PAYLOAD[:kept]
    assert json.loads((tmp_path / "vol.nii.gz.part.json").read_text())["url"] == url(server)
    fetch(url(server), dest, sha256=SHA)
    assert server.ranges[-1] == f"bytes={kept}-" and server.if_ranges[-1] == if_range
    assert dest.read_bytes() == PAYLOAD and names(tmp_path) == ["vol.nii.gz"]


def test_part_without_validator_or_record_restarts(server: Server, tmp_path: Path) -> None:
    server.etag = None  # nothing to prove the server still has the same file
    dest = tmp_path / "vol.nii.gz"
    interrupt(server, dest)
    fetch(url(server), dest)
    assert server.ranges[-1] is None and dest.read_bytes() == PAYLOAD
    (tmp_path / "x.part").write_bytes(b"stale bytes with no record of their source")
    fetch(url(server), tmp_path / "x")
    assert server.ranges[-1] is None and (tmp_path / "x").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    kept = interrupt(server, dest)
    server.honour_range = False
    fetch(url(server), dest, sha256=SHA)
    assert server.ranges[-1] == f"bytes={kept}-"
    assert dest.read_bytes() == PAYLOAD and names(tmp_path) == ["vol.nii.gz"]


def test_complete_part_is_finished_after_416(server: Server, tmp_path: Path) -> None:
    (tmp_path / "vol.nii.gz.part").write_bytes(PAYLOAD)
    (tmp_path / "vol.nii.gz.part.json").write_text(json.dumps(
        {"url": url(server), "etag": '"v1"', "last_modified": None, "length": len(PAYLOAD)}))
    fetch(url(server), tmp_path / "vol.nii.gz")
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert (tmp_path / "vol.nii.gz").read_bytes() == PAYLOAD and names(tmp_path) == ["vol.nii.gz"]


def test_part_of_another_url_is_not_continued(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    interrupt(server, dest, "/a.nii.gz")  # same ETag and length as /b: only the URL differs
    fetch(url(server, "/b.nii.gz"), dest)  # no sha256: nothing else would catch a splice
    assert server.ranges[-1] is None
    assert dest.read_bytes() == OTHER and names(tmp_path) == ["vol.nii.gz"]


@pytest.mark.parametrize(("change", "honour_if_range"),
                         [("etag", True), ("etag", False), ("length", False)])
def test_changed_resource_restarts(server: Server, tmp_path: Path, change: str,
                                   honour_if_range: bool) -> None:
    dest = tmp_path / "vol.nii.gz"
    kept = interrupt(server, dest)
    server.honour_if_range = honour_if_range  # False: a 206 of the new file; the client checks
    new = OTHER if change == "etag" else PAYLOAD + b"appended"
    server.files["/vol.nii.gz"] = new
    server.etag = '"v2"' if change == "etag" else server.etag
    fetch(url(server), dest)
    restart = [] if honour_if_range else [None]  # else the client refuses the 206 and restarts
    assert server.ranges == [None, f"bytes={kept}-", *restart]
    assert server.if_ranges[1] == '"v1"'
    assert dest.read_bytes() == new and names(tmp_path) == ["vol.nii.gz"]


def test_stalled_server_hits_read_timeout(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    server.stall_next = True
    start = time.monotonic()
    with pytest.raises(DownloadError,
                       match=re.escape(url(server)) + r": no data .* 0\.3 s .*kept"):
        fetch(url(server), dest, timeout=0.3)
    assert time.monotonic() - start < 2
    kept = (tmp_path / "vol.nii.gz.part").stat().st_size
    assert 0 < kept < len(PAYLOAD) and not dest.exists()
    fetch(url(server), dest, sha256=SHA, timeout=0.3)  # the .part was worth keeping
    assert server.ranges[-1] == f"bytes={kept}-" and dest.read_bytes() == PAYLOAD


def test_overall_timeout(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    server.drip = True  # never silent for long, so only the overall limit can stop it
    start = time.monotonic()
    with pytest.raises(DownloadError,
                       match=re.escape(url(server)) + r": not finished within the overall "
                       r"timeout of 0\.4 s.*kept"):
        fetch(url(server), dest, timeout=5, total_timeout=0.4)
    assert time.monotonic() - start < 1.5
    assert not dest.exists() and (tmp_path / "vol.nii.gz.part").stat().st_size > 0


@pytest.mark.parametrize("max_bytes", [None, 10**9])
def test_body_longer_than_content_length_is_refused(server: Server, tmp_path: Path,
                                                    max_bytes: int | None) -> None:
    server.extra = b"smuggled tail"
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*more than the 200000 bytes it "
                                            r"announced.*deleted"):
        fetch(url(server), tmp_path / "vol.nii.gz", max_bytes=max_bytes)
    assert names(tmp_path) == []


@pytest.mark.parametrize("send_length", [True, False])
def test_body_over_max_bytes_is_refused(server: Server, tmp_path: Path,
                                        send_length: bool) -> None:
    server.send_length = send_length  # refused from the header, or once the bytes pass the cap
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*limit of 50000 bytes"):
        fetch(url(server), tmp_path / "vol.nii.gz", sha256=SHA, max_bytes=50_000)
    assert names(tmp_path) == []


def test_unverifiable_end_without_length_or_sha256(server: Server, tmp_path: Path) -> None:
    server.send_length = False
    server.truncate_next = True  # a drop looks exactly like the end of the body
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*could not be verified complete.*"
                                            r"kept.*sha256"):
        fetch(url(server), tmp_path / "vol.nii.gz")
    assert not (tmp_path / "vol.nii.gz").exists()
    assert (tmp_path / "vol.nii.gz.part").stat().st_size == len(PAYLOAD) // 3
    server.truncate_next = True  # with a sha256 the checksum decides
    with pytest.raises(DownloadError, match="does not match"):
        fetch(url(server), tmp_path / "cut", sha256=SHA)
    assert fetch(url(server), tmp_path / "whole", sha256=SHA).read_bytes() == PAYLOAD
    assert names(tmp_path) == ["vol.nii.gz.part", "vol.nii.gz.part.json", "whole"]


def test_chunked_body_is_verified_by_its_last_chunk(server: Server, tmp_path: Path) -> None:
    server.chunked = True
    server.truncate_next = True
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*interrupted.*kept"):
        fetch(url(server), tmp_path / "vol.nii.gz")
    assert not (tmp_path / "vol.nii.gz").exists()
    server.etag = None  # no resume: a clean chunked transfer is complete without a sha256
    assert fetch(url(server), tmp_path / "vol.nii.gz").read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*sha256.*does not match"):
        fetch(url(server), dest, sha256="0" * 64)
    assert not dest.exists() and names(tmp_path) == []


def test_http_and_network_errors_name_the_url(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing: HTTP 404"):
        fetch(url(server, "/missing"), tmp_path / "x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}.*cannot connect"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", timeout=2)
    with pytest.raises(DownloadError, match="only http"):
        fetch("file:///etc/passwd", tmp_path / "x")
    with pytest.raises(DownloadError, match="64 hex"):
        fetch(url(server), tmp_path / "x", sha256="abc")
    for bad in ({"timeout": 0}, {"total_timeout": -1}, {"max_bytes": 0}):
        with pytest.raises(DownloadError, match=r"127\.0\.0\.1.* must be > 0"):
            fetch(url(server), tmp_path / "x", **bad)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()
