"""Resumable downloads against a local HTTP server that supports (or ignores) Range requests."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mri_vqvae.download import fetch
from mri_vqvae.errors import DownloadError

PAYLOAD = os.urandom(200_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server(ThreadingHTTPServer):
    """Serves PAYLOAD at any path; behaviour switches are plain attributes."""

    honour_range = True
    truncate_next = False
    ranges: list[str | None]


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        if self.path == "/missing":
            self.send_error(404, "Not Found")
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng and srv.honour_range else 0
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.truncate_next:  # send part of the body, then drop the connection
            srv.truncate_next = False
            self.wfile.write(body[: len(body) // 3])
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.ranges = []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def url(srv: Server, path: str = "/vol.nii.gz") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_full_fetch(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "vol.nii.gz"
    assert fetch(url(server), dest, sha256=SHA.upper()) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("vol.nii.gz.part").exists()
    assert server.ranges == [None]
    fetch(url(server), dest, sha256=SHA)  # already there and verified: no request
    assert server.ranges == [None]


def test_interrupted_fetch_resumes_from_part(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    part = tmp_path / "vol.nii.gz.part"
    server.truncate_next = True
    with pytest.raises(DownloadError, match="127.0.0.1.*resume"):
        fetch(url(server), dest, sha256=SHA)
    assert not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(PAYLOAD) and part.read_bytes() == PAYLOAD[:kept]
    fetch(url(server), dest, sha256=SHA)
    assert server.ranges[-1] == f"bytes={kept}-"
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_server_ignoring_range_restarts(server: Server, tmp_path: Path) -> None:
    server.honour_range = False
    dest = tmp_path / "vol.nii.gz"
    (tmp_path / "vol.nii.gz.part").write_bytes(b"stale bytes that must not survive")
    fetch(url(server), dest, sha256=SHA)
    assert server.ranges == ["bytes=33-"]
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_finished_after_416(server: Server, tmp_path: Path) -> None:
    (tmp_path / "vol.nii.gz.part").write_bytes(PAYLOAD)
    fetch(url(server), tmp_path / "vol.nii.gz", sha256=SHA)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert (tmp_path / "vol.nii.gz").read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vol.nii.gz"
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1.*sha256.*does not match"):
        fetch(url(server), dest, sha256="0" * 64)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


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
    assert not (tmp_path / "x").exists()
