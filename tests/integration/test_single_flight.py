"""Single flight across upstreams: one hanging upstream must not reach a healthy one's clients.

A real docker-registry holds the blob; a stand-in upstream accepts the same requests and hangs
(before its headers, or in the middle of the body). The same cold digest is asked through the
hanging upstream, and 0.3 s later through the healthy one: the healthy route's client gets the
right bytes at once, not the hanging route's timeout.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from storage import sha256_digest
from tests.peers import skopeo
from tests.peers.loopback import LoopbackServer
from tests.peers.oci import make_image
from tests.peers.registry import Registry
from tests.peers.relay import Relay

from .common import request
from .metahub_process import Metahub

READ_TIMEOUT = 8.0


class HangingUpstream(LoopbackServer):
    """Answers ``/v2/``; a blob request gets nothing (``where="headers"``) or its headers and a
    few bytes of a body announced as ``size`` bytes (``where="body"``), then silence until stopped."""

    def __init__(self, where: str, size: int) -> None:
        self.released = threading.Event()
        self.blob_requests = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v2":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream.blob_requests += 1
                if where == "body":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    self.wfile.write(b"\0" * 100)
                    self.wfile.flush()
                upstream.released.wait(60)
                self.close_connection = True

            do_HEAD = do_GET

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

        super().__init__(Handler, "hanging-upstream")

    def stop(self) -> None:
        self.released.set()
        super().stop()


@pytest.fixture
def layer(tmp_path) -> Iterator[tuple[str, bytes, Registry]]:
    """A 3 MB layer pushed to a real docker-registry as team/app:1."""
    registry = Registry(tmp_path / "upstream")
    try:
        image = make_image(tmp_path / "layout", "1", layers=[3_000_000])
        skopeo.push(tmp_path / "layout", "1", f"{registry.host}/team/app:1")
        digest = image.layers[0].digest
        yield digest, (tmp_path / "layout" / "blobs" / "sha256" / digest[7:]).read_bytes(), registry
    finally:
        registry.stop()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_hanging_upstream_does_not_hold_up_a_healthy_ones_clients(tmp_path: Path, layer, where: str) -> None:
    digest, data, registry = layer
    with HangingUpstream(where, len(data)) as hanging, Relay(registry.url) as relay, Metahub(
        tmp_path / "metahub",
        {"hang": {"url": hanging.url, "read_timeout": READ_TIMEOUT}, "good": {"url": relay.url}},
        default_upstream="good",
    ) as hub, ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(request, hub.host, "GET", f"/v2/hang/team/app/blobs/{digest}")
        deadline = time.monotonic() + 5
        while hanging.blob_requests == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hanging.blob_requests == 1
        time.sleep(0.3)
        started = time.monotonic()
        status, headers, body = request(hub.host, "GET", f"/v2/good/team/app/blobs/{digest}")
        took = time.monotonic() - started
        assert status == 200 and sha256_digest(body) == digest and body == data
        assert took < READ_TIMEOUT / 2, f"the healthy route waited {took:.1f} s for the hanging one"
        assert relay.blob_gets("team/app", digest) == 1
        hanging.released.set()
        try:
            stuck.result(timeout=READ_TIMEOUT + 30)
        except Exception:  # a body cut short ends in an aborted connection
            pass
        # Now cached: the hanging route's next client is served from the store (after its own HEAD).
        status, _, body = request(hub.host, "GET", f"/v2/good/team/app/blobs/{digest}")
        assert status == 200 and body == data and relay.blob_gets("team/app", digest) == 1
