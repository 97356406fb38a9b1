"""Hostile and malformed HTTP against a real metahub process, with docker-registry as its upstream.

Raw sockets send what no well-behaved client library would (bytes that are not UTF-8, trickled
headers, bodies nobody asked for); the process's own descriptor table (/proc/PID/fd) shows what it
keeps open. Every answer must be a 4xx with an OCI error body, never a 500, never a held descriptor.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metahub.web.auth import hash_password
from tests.peers import containerd as ctr
from tests.peers import skopeo
from tests.peers.oci import Image, make_image
from tests.peers.ports import LOOPBACK
from tests.peers.registry import Registry

from .common import descriptors, request, settle
from .metahub_process import Metahub

#: One layer per range case that must meet a cold (uncached) blob, plus spares.
RANGE_CASES = ["bytes=0-", "bytes=-0", "bytes=0-99", "bytes=-10", "bytes=100-", "bytes=999999-",
               "bytes=9-5", "bytes=0-" + "9" * 5000, "items=0-1", "bytes=\xff-\xfe"]
LAYER_SIZE = 3000  # random bytes, so a layer (gzipped tar) is a little larger: use Blob.size
PASSWORD = "hostile-pw"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[tuple[Registry, Image]]:
    root = tmp_path_factory.mktemp("hostile")
    with Registry(root / "upstream") as registry:
        image = make_image(root / "layout", "v1", layers=[LAYER_SIZE] * (len(RANGE_CASES) + 4))
        skopeo.push(root / "layout", "v1", f"{registry.host}/team/app:v1")
        yield registry, image


def start_hub(tmp_path: Path, registry: Registry, **config) -> Metahub:
    return Metahub(tmp_path / "hub", {"local": {"url": registry.url}}, default_upstream="local", **config)


@pytest.fixture
def hub(tmp_path, upstream) -> Iterator[Metahub]:
    with start_hub(tmp_path, upstream[0], http={"header_timeout": "2s"}) as running:
        yield running


def raw_exchange(hub: Metahub, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection and read until metahub closes it (or ``timeout``)."""
    with socket.create_connection((LOOPBACK, hub.port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:  # closed with our unread bytes still in its buffer
        pass
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def oci_code(raw: bytes) -> tuple[int, str]:
    status, headers, body = parse(raw)
    assert headers["content-type"] == "application/json", raw[:300]
    return status, json.loads(body)["errors"][0]["code"]


def blob_path(image: Image, number: int) -> str:
    return f"/v2/team/app/blobs/{image.layers[number].digest}"


# --- item 2 --------------------------------------------------------------------------------------


def test_huge_range_numbers_are_no_500_and_leak_no_descriptor(hub, upstream) -> None:
    _, image = upstream
    cached = blob_path(image, 0)
    assert request(hub.host, "GET", cached)[0] == 200
    huge = {"Range": "bytes=0-" + "9" * 5000}
    connection = http.client.HTTPConnection(LOOPBACK, hub.port, timeout=30)
    connection.request("GET", "/v2/")
    connection.getresponse().read()  # one connection for all: the count below is the blob files'
    before = len(descriptors(hub))
    for number in range(200):
        method = "GET" if number % 2 else "HEAD"
        connection.request(method, cached, headers=huge)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body[:300]
        assert response.getheader("Content-Length") == str(image.layers[0].size)
    # A cold blob takes the same path as a cached one (the range is ignored alike).
    cold = blob_path(image, 1)
    for method in ("HEAD", "GET"):
        connection.request(method, cold, headers=huge)
        response = connection.getresponse()
        assert (response.status, len(response.read())) == (200, image.layers[1].size if method == "GET" else 0)
    connection.close()
    # The cold blob's commit (file, directory fsync) ends a moment after its response.
    assert settle(hub, before + 3) <= before + 3  # a connection to upstream may be pooled
    layers = {layer.digest.split(":")[1] for layer in image.layers}
    assert not [target for target in descriptors(hub) if os.path.basename(target) in layers]


# --- item 3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", ["%C2%B2", "9" * 5000])
def test_a_bad_tag_page_size_is_400(hub, n: str) -> None:
    status, headers, body = request(hub.host, "GET", f"/v2/team/app/tags/list?n={n}")
    assert (status, json.loads(body)["errors"][0]["code"]) == (400, "PAGINATION_NUMBER_INVALID")


def test_bytes_that_are_not_utf8_in_headers_are_4xx_with_an_oci_body(tmp_path, upstream) -> None:
    registry, image = upstream
    accounts = {"ci": {"password_hash": hash_password(PASSWORD)}}
    with start_hub(tmp_path, registry, anonymous="deny", accounts=accounts) as hub:
        for value in (b"Basic \xff\xfe==", b"Bearer \xc3\x28", b"\xff"):
            raw = raw_exchange(hub, b"GET /v2/ HTTP/1.1\r\nHost: hub.test:5000\r\nConnection: close\r\n"
                                    b"Authorization: " + value + b"\r\n\r\n")
            assert oci_code(raw) == (401, "UNAUTHORIZED")
            assert parse(raw)[1]["www-authenticate"] == 'Bearer realm="http://hub.test:5000/token",service="metahub"'
        for path in (b"/v2/", b"/token", b"/v2/team/app/manifests/v1"):
            raw = raw_exchange(hub, b"GET " + path + b" HTTP/1.1\r\nHost: \xff\xfe\r\nConnection: close\r\n\r\n")
            assert oci_code(raw) == (400, "BAD_REQUEST")
        assert "Traceback" not in hub.log() and "UnicodeDecodeError" not in hub.log()


def test_a_request_line_twisted_refuses_gets_an_oci_400(hub) -> None:
    for raw in (b"G(T / HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /\x01 HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        assert oci_code(raw_exchange(hub, raw)) == (400, "BAD_REQUEST")
    overlong = b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"
    assert oci_code(raw_exchange(hub, overlong)) == (431, "HEADERS_TOO_LARGE")


# --- item 4 --------------------------------------------------------------------------------------


def metric_series(hub: Metahub) -> set[str]:
    status, _, body = request(hub.host, "GET", "/metrics")
    assert status == 200
    return {line.rsplit(" ", 1)[0] for line in body.decode().splitlines()}


def test_random_methods_do_not_grow_the_metrics(hub) -> None:
    paths = ["/v2/", "/nothing", "/v2/team/app/manifests/v1"]
    connection = http.client.HTTPConnection(LOOPBACK, hub.port, timeout=30)

    def send(method: str, path: str) -> int:
        connection.request(method, path)
        response = connection.getresponse()
        response.read()
        return response.status

    for path in paths:
        send("WARMUP", path)
    request(hub.host, "GET", "/metrics")
    known = metric_series(hub)
    size = len(request(hub.host, "GET", "/metrics")[2])
    rng = random.Random(10)
    for _ in range(1000):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 30)))
        assert send(method, rng.choice(paths)) == 405
    connection.close()
    assert metric_series(hub) == known
    assert len(request(hub.host, "GET", "/metrics")[2]) < size + 200  # only counts grew


# --- item 7 --------------------------------------------------------------------------------------


def comparable(status: int, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    return status, {name: value for name, value in headers.items() if name != "date"}


def head_and_get(hub: Metahub, path: str, headers: dict[str, str] | None = None) -> None:
    """HEAD, then GET: the same status and headers, Content-Length included; no body on HEAD."""
    head_status, head_headers, head_body = raw_request(hub, "HEAD", path, headers)
    get_status, get_headers, get_body = raw_request(hub, "GET", path, headers)
    assert head_body == b""
    assert comparable(head_status, head_headers) == comparable(get_status, get_headers), (path, headers)
    assert int(get_headers["content-length"]) == len(get_body)
    assert get_status != 500


def raw_request(hub: Metahub, method: str, path: str, headers: dict[str, str] | None) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: hub.test", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    raw = raw_exchange(hub, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), timeout=30)
    return parse(raw)


def test_head_answers_what_get_would_on_every_route(hub, upstream) -> None:
    _, image = upstream
    for path in ["/v2/", "/v2", "/token", "/nothing", "/v2/team/app/manifests/v1", "/v2/team/app/manifests/nope",
                 "/v2/team/app/tags/list", "/v2/team/app/tags/list?n=x", "/_metahub/v1/resolve?image=team/app:v1",
                 f"/v2/team/app/blobs/sha256:{'0' * 64}", "/v2/Bad/manifests/v1"]:
        head_and_get(hub, path)
    # /metrics counts these requests: after one round each, a second shows both the same series.
    for _ in range(2):
        raw_request(hub, "HEAD", "/metrics", None), raw_request(hub, "GET", "/metrics", None)
    head_and_get(hub, "/metrics")


def test_head_answers_what_get_would_for_ranges_cold_and_cached(hub, upstream) -> None:
    _, image = upstream
    for number, range_header in enumerate(RANGE_CASES):
        path = blob_path(image, number)
        head_and_get(hub, path, {"Range": range_header})  # HEAD first: the blob is still cold for GET
    for number in range(len(RANGE_CASES)):  # all cached now
        assert request(hub.host, "GET", blob_path(image, number))[0] == 200
    for range_header in RANGE_CASES:
        head_and_get(hub, blob_path(image, 0), {"Range": range_header})
    status, headers, body = raw_request(hub, "GET", blob_path(image, 0), {"Range": "bytes=0-"})
    size = image.layers[0].size
    assert (status, headers["content-range"], len(body)) == (206, f"bytes 0-{size - 1}/{size}", size)
    assert raw_request(hub, "GET", blob_path(image, 1), {"Range": "bytes=-0"})[0] == 416


# --- item 9 --------------------------------------------------------------------------------------


def test_trickled_requests_are_cut_off_at_the_header_deadline(hub) -> None:
    before = len(descriptors(hub))
    sockets = [socket.create_connection((LOOPBACK, hub.port), timeout=10) for _ in range(200)]
    answers: dict[int, bytes] = {}
    started = time.monotonic()

    def trickle() -> None:
        request_bytes = b"GET /v2/ HTTP/1.1\r\nX-Slow: " + b"a" * 1000
        for byte in request_bytes:
            for sock in sockets:
                try:
                    sock.send(bytes([byte]))
                except OSError:  # closed by metahub: this one is done
                    pass
            if time.monotonic() - started > 15:
                return
            time.sleep(0.25)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        for number, sock in enumerate(sockets):
            answers[number] = read_all(sock)
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    trickler.join()
    assert elapsed < 10, "the deadline (2s) did not end the trickled requests"
    assert all(oci_code(answer) == (408, "REQUEST_TIMEOUT") for answer in answers.values())
    assert settle(hub, before + 2) <= before + 2


def test_connections_per_address_are_capped_and_the_default_takes_a_load_test(tmp_path, upstream) -> None:
    registry, _ = upstream
    with start_hub(tmp_path / "capped", registry, http={"max_connections_per_address": 20}) as hub:
        held = [socket.create_connection((LOOPBACK, hub.port), timeout=10) for _ in range(20)]
        try:
            held[0].sendall(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
            assert parse(held[0].recv(65536))[0] == 200
            with socket.create_connection((LOOPBACK, hub.port), timeout=10) as extra:
                assert oci_code(read_all(extra)) == (429, "TOOMANYREQUESTS")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)
        assert raw_exchange(hub, b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    with start_hub(tmp_path / "default", registry) as hub:
        load = [socket.create_connection((LOOPBACK, hub.port), timeout=30) for _ in range(500)]
        try:
            for sock in load:
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert all(read_all(sock).startswith(b"HTTP/1.1 200") for sock in load)
        finally:
            for sock in load:
                sock.close()


@pytest.mark.parametrize("head, expected", [
    (b"POST /v2/team/app/blobs/uploads/ HTTP/1.1\r\nContent-Length: 419430400\r\n", (405, "UNSUPPORTED")),
    (b"PUT /v2/team/app/manifests/v1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", (405, "UNSUPPORTED")),
    (b"GET /v2/ HTTP/1.1\r\nContent-Length: 1048576\r\n", (413, "CONTENT_TOO_LARGE")),
    (b"POST /token HTTP/1.1\r\nContent-Length: 419430400\r\n", (413, "CONTENT_TOO_LARGE")),
])
def test_a_body_is_refused_at_once_and_never_spooled(hub, head: bytes, expected: tuple[int, str]) -> None:
    files_before = {target for target in descriptors(hub) if target.startswith("/")}
    with socket.create_connection((LOOPBACK, hub.port), timeout=3) as sock:
        sock.sendall(head + b"Host: h\r\n\r\n")
        sock.sendall(b"x" * 65536)  # the start of the body; metahub must not wait for the rest
        started = time.monotonic()
        answer = read_all(sock)
        assert time.monotonic() - started < 2
    assert oci_code(answer) == expected
    assert parse(answer)[1]["connection"] == "close"
    # Twisted spools a body of 100 kB or more to an unlinked temporary file ("/tmp/#N (deleted)").
    assert {target for target in descriptors(hub) if target.startswith("/")} <= files_before


def test_containerd_still_logs_in_with_its_token_form(tmp_path, upstream, containerd) -> None:
    """containerd's OAuth2 password grant is the one body the registry reads."""
    registry, image = upstream
    accounts = {"ci": {"password_hash": hash_password(PASSWORD)}}
    with start_hub(tmp_path, registry, anonymous="deny", accounts=accounts, http={"header_timeout": "2s"}) as hub:
        ref = f"{hub.host}/team/app:v1"
        ctr.ctr_pull(containerd.address, ref, user=f"ci:{PASSWORD}")
        assert ctr.image_digest(containerd.address, ref) == image.digest
        assert '"POST /token HTTP/1.1" 200' in hub.log()
