"""The HTTP face against hostile input: the real site and resource, driven over a StringTransport.

Each test feeds raw bytes to the channel metahub's site builds (as a socket would) on a fake clock,
with thread work run inline, and reads the raw answer. Nothing here reaches an upstream.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from metahub.app.root import Root
from metahub.cache.routing import route
from metahub.config.file import ConfigError, HttpConfig, parse_config
from metahub.oci import errors
from metahub.web.auth import hash_password
from metahub.web.headers import header_text
from metahub.web.ranges import parse_range
from metahub.web.site import FORM_LIMIT, RegistrySite
from storage import sha256_digest
from tests.unit.fakes import FakeReactor, inline_threads, minimal

BLOB = os.urandom(1000)
DIGEST = sha256_digest(BLOB)
BLOB_PATH = f"/v2/team/app/blobs/{DIGEST}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)["errors"][0]["code"]


def parse(raw: bytes, head: bool = False) -> Answer:
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert not (head and body), "a HEAD answer has no body"
    return Answer(int(status_line.split(" ")[1]), headers, body)


class Face:
    """A metahub site on a fake clock; ``connect`` opens a connection as a socket would."""

    def __init__(self, root: Root, site: RegistrySite, reactor: FakeReactor) -> None:
        self.root, self.site, self.reactor = root, site, reactor

    def connect(self, host: str = "10.0.0.1") -> tuple[object, StringTransport]:
        address = IPv4Address("TCP", host, 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def send(self, raw: bytes, peer: str = "10.0.0.1") -> tuple[bytes, StringTransport]:
        channel, transport = self.connect(peer)
        channel.dataReceived(raw)
        return transport.value(), transport

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                peer: str = "10.0.0.1") -> Answer:
        lines = [f"{method} {path} HTTP/1.1", "Host: metahub.test", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        raw, transport = self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), peer)
        return parse(raw, head=method == "HEAD")

    def cache_blob(self) -> None:
        """Put BLOB in the store, linked to team/app, as a pull through it would."""
        storage = self.root.storage
        writer = storage.blobs.writer(DIGEST, len(BLOB))
        writer.write(BLOB)
        writer.commit()
        storage.index.link([DIGEST], route(self.root.config, "team/app").key)


def make_face(tmp_path: Path, **config: object) -> Face:
    data = minimal(tmp_path) | {"anonymous": "allow"} | config
    reactor = FakeReactor()
    root = Root(config=parse_config(data, str(tmp_path)), reactor=reactor, listen="tcp:0")
    site = root.site
    assert isinstance(site, RegistrySite)
    inline_threads(root)
    return Face(root, site, reactor)


@pytest.fixture
def face(tmp_path: Path) -> Iterator[Face]:
    built = make_face(tmp_path)
    yield built
    built.root.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- item 2: Range numbers are bounded, and a cached blob's file is closed on every path --------


@pytest.mark.parametrize("header", ["bytes=0-" + "9" * 5000, "bytes=" + "9" * 20 + "-", "bytes=-" + "9" * 20,
                                    "bytes=0-\u00b2", "bytes=\u0663-"])
def test_a_range_with_numbers_longer_than_19_ascii_digits_is_ignored(header: str) -> None:
    assert parse_range(header, 1000) is None


def test_a_range_of_19_digits_still_counts() -> None:
    assert parse_range("bytes=0-" + "9" * 19, 1000) == (0, 1000)
    with pytest.raises(errors.RegistryError):
        parse_range("bytes=" + "9" * 19 + "-", 1000)


def test_huge_range_numbers_answer_the_whole_blob_and_leak_no_descriptor(face: Face) -> None:
    face.cache_blob()
    before = open_fds()
    for method in ("GET", "HEAD") * 100:
        answer = face.request(method, BLOB_PATH, {"Range": "bytes=0-" + "9" * 5000})
        assert (answer.status, answer.headers["content-length"]) == (200, str(len(BLOB)))
        assert answer.body == (BLOB if method == "GET" else b"")
    assert open_fds() <= before + 2  # (the fake reactor keeps nothing open; a little slack for pytest)


def test_a_cached_blob_is_closed_whatever_fails_after_it_opened(face: Face, monkeypatch) -> None:
    def broken(header: str | None, size: int) -> None:
        raise RuntimeError("a bug in range handling")

    monkeypatch.setattr("metahub.web.blobs.parse_range", broken)
    face.cache_blob()
    before = open_fds()
    for _ in range(50):
        assert face.request("GET", BLOB_PATH).status == 500
    assert open_fds() <= before + 2


def test_an_unsatisfiable_range_closes_the_file_too(face: Face) -> None:
    face.cache_blob()
    before = open_fds()
    for _ in range(50):
        assert face.request("GET", BLOB_PATH, {"Range": "bytes=5000-"}).status == 416
    assert open_fds() <= before + 2


# --- item 3: bad numbers and bytes that are not UTF-8 are 4xx with an OCI body -------------------


@pytest.mark.parametrize("n", ["%C2%B2", "9" * 5000, "-1", "1e3", "", "%EF%BC%91"])
def test_a_tag_page_size_that_is_not_a_short_ascii_number_is_400(face: Face, n: str) -> None:
    answer = face.request("GET", f"/v2/team/app/tags/list?n={n}")
    assert (answer.status, answer.error_code()) == (400, "PAGINATION_NUMBER_INVALID")


def test_a_non_utf8_authorization_is_401_with_a_safe_challenge(tmp_path: Path) -> None:
    face = make_face(tmp_path, anonymous="deny")
    try:
        for value in (b"Basic \xff\xfe", b"Bearer \xc3\x28.x", b"\xff"):
            raw, _ = face.send(b"GET /v2/team/app/manifests/1 HTTP/1.1\r\nHost: hub:5000\r\nAuthorization: " + value + b"\r\n\r\n")
            answer = parse(raw)
            assert (answer.status, answer.error_code()) == (401, "UNAUTHORIZED")
            assert answer.headers["www-authenticate"] == 'Bearer realm="http://hub:5000/token",service="metahub"'
        # The token endpoint too (it answers a Basic challenge of its own).
        raw, _ = face.send(b"GET /token HTTP/1.1\r\nHost: hub\r\nAuthorization: Basic \xff\r\n\r\n")
        assert parse(raw).status == 401
    finally:
        face.root.close()


@pytest.mark.parametrize("host", [b"\xff\xfe", b'evil"host', b"a b", b"h\\x"])
def test_a_host_header_that_is_no_host_is_400(face: Face, host: bytes) -> None:
    for path in (b"/v2/", b"/v2/team/app/manifests/1", b"/token"):
        raw, _ = face.send(b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        answer = parse(raw)
        assert (answer.status, answer.error_code()) == (400, "BAD_REQUEST"), path


def test_two_host_headers_are_400(face: Face) -> None:
    raw, _ = face.send(b"GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert parse(raw).status == 400


def test_a_challenge_without_a_usable_host_names_localhost(tmp_path: Path) -> None:
    face = make_face(tmp_path, anonymous="deny")
    try:
        raw, _ = face.send(b"GET /v2/ HTTP/1.0\r\n\r\n")
        assert parse(raw).headers["www-authenticate"] == 'Bearer realm="http://localhost/token",service="metahub"'
    finally:
        face.root.close()


def test_a_non_utf8_range_is_ignored_for_get_and_head_alike(face: Face) -> None:
    face.cache_blob()
    for method in ("GET", "HEAD"):
        raw, _ = face.send(f"{method} {BLOB_PATH} HTTP/1.1\r\nHost: h\r\nRange: bytes=\xff-\xfe\r\n\r\n".encode("latin-1"))
        answer = parse(raw, head=method == "HEAD")
        assert (answer.status, answer.headers["content-length"]) == (200, str(len(BLOB)))


def test_header_text_decodes_every_byte_as_latin1() -> None:
    request = SimpleNamespace(requestHeaders=Headers({b"Range": [b"bytes=\xff"]}))
    assert header_text(request, b"range") == "bytes=\u00ff"
    assert header_text(request, b"host") is None


#: Request heads Twisted would refuse with a bare 400 of its own.
REFUSED = [
    b"G(T / HTTP/1.1\r\n\r\n",  # a method that is not a token
    b"GET /\x7f HTTP/1.1\r\n\r\n",  # a target that is not printable ASCII
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 12x\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\ncontent-LENGTH: 0\r\nTransfer-Encoding: chunked\r\n\r\n",  # names in any case
    b"GET / HTTP/1.1\r\nX: ab\x00\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",  # Twisted skips one empty line before a request, not two
]
#: Request heads too large to read.
OVERSIZED = [
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",  # one line over LineReceiver.MAX_LENGTH
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)) + b"\r\n",
]


@pytest.mark.parametrize(("raw", "status", "code"), [
    *[pytest.param(raw, 400, "BAD_REQUEST", id=f"refused-{n}") for n, raw in enumerate(REFUSED)],
    *[pytest.param(raw, 431, "HEADERS_TOO_LARGE", id=f"oversized-{n}") for n, raw in enumerate(OVERSIZED)],
])
def test_a_request_head_twisted_would_refuse_gets_an_oci_error_and_the_connection_closes(
    face: Face, raw: bytes, status: int, code: str
) -> None:
    answer, transport = face.send(raw)
    assert (parse(answer).status, parse(answer).error_code()) == (status, code)
    assert transport.disconnecting


def test_too_many_headers_get_an_oci_400(face: Face) -> None:
    answer, _ = face.send(b"GET / HTTP/1.1\r\n" + b"".join(b"X: %d\r\n" % i for i in range(501)) + b"\r\n")
    assert parse(answer).status == 400 and b"more than 500 headers" in answer


# --- item 4: metric labels come from fixed sets ---------------------------------------------------


def series(face: Face) -> set[str]:
    """The time series /metrics shows (sample lines without their values)."""
    return {line.rsplit(" ", 1)[0] for line in face.root.metrics.render().decode().splitlines()}


def test_random_methods_do_not_grow_the_metrics(face: Face) -> None:
    paths = ["/v2/", "/x", f"/v2/a/blobs/{DIGEST}"]
    for path in paths:
        face.request("BREW", path)
    known = series(face)
    rng = random.Random(4)
    for _ in range(1000):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(12))
        assert face.request(method, rng.choice(paths)).status == 405
    assert series(face) == known
    assert 'metahub_requests_total{method="other",route="blobs",status="405"}' in known
    assert not any("BREW" in line for line in known)


def test_status_and_method_labels() -> None:
    from metahub.runtime.metrics import method_label, status_label

    assert [method_label(m) for m in (b"GET", b"HEAD", b"get", b"BREW", b"\xff")] == ["GET", "HEAD", "other", "other", "other"]
    assert [status_label(c) for c in (200, 206, 429, 431, 599, 0)] == ["200", "206", "429", "431", "5xx", "other"]


# --- item 7: HEAD answers exactly what GET would ----------------------------------------------------


def comparable(answer: Answer) -> tuple[int, dict[str, str]]:
    headers = {k: v for k, v in answer.headers.items() if k != "date"}
    return answer.status, headers


@pytest.mark.parametrize("path", ["/metrics", "/token", "/v2/", "/v2", "/nothing", "/v2/team/app/tags/list?n=x",
                                  "/_metahub/v1/resolve?image=Bad%20Name", BLOB_PATH])
def test_head_agrees_with_get_on_every_route(face: Face, path: str) -> None:
    face.cache_blob()
    face.request("GET", path), face.request("HEAD", path)  # /metrics then shows the same series to both
    get = face.request("GET", path)
    head = face.request("HEAD", path)
    assert comparable(head) == comparable(get)
    assert head.body == b""
    assert "content-length" in get.headers and int(get.headers["content-length"]) == len(get.body)


def test_head_metrics_and_token_are_not_404_or_405(face: Face) -> None:
    assert face.request("HEAD", "/metrics", peer="127.0.0.1").status == 200  # /metrics is this host's
    assert face.request("HEAD", "/token").status == 200


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=-0", "bytes=0-9", "bytes=-10", "bytes=990-5000", "bytes=1000-",
                                    "bytes=9-5", "bytes=0-" + "9" * 30, "items=0-1"])
def test_head_agrees_with_get_on_ranges_of_a_cached_blob(face: Face, header: str) -> None:
    face.cache_blob()
    get = face.request("GET", BLOB_PATH, {"Range": header})
    head = face.request("HEAD", BLOB_PATH, {"Range": header})
    assert comparable(head) == comparable(get)
    if get.status == 206:
        assert get.body == BLOB[int(get.headers["content-range"].split()[1].split("-")[0]):][:int(get.headers["content-length"])]


# --- item 9: slow requests, connections per address, bodies -------------------------------------


def test_a_trickled_request_is_answered_408_at_the_deadline(face: Face) -> None:
    channel, transport = face.connect()
    for byte in b"GET /v2/ HTTP/1.1\r\nX-Slow: " + b"a" * 40:
        channel.dataReceived(bytes([byte]))  # each byte resets Twisted's idle timeout
        face.reactor.advance(1)
        if transport.disconnecting:
            break
    assert face.reactor.seconds() == 30
    answer = parse(transport.value())
    assert (answer.status, answer.error_code()) == (408, "REQUEST_TIMEOUT")


def test_a_deadline_runs_per_request_and_an_idle_keep_alive_connection_is_left_alone(face: Face) -> None:
    channel, transport = face.connect()
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert parse(transport.value()).status == 200
    transport.clear()
    face.reactor.advance(45)  # idle between requests: the deadline has not started
    assert not transport.disconnecting
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    face.reactor.advance(29)
    channel.dataReceived(b"Host: h\r\n\r\n")
    assert parse(transport.value()).status == 200 and not transport.disconnecting
    transport.clear()
    face.reactor.advance(31)  # long after that request's deadline would have been
    assert transport.value() == b""


def test_the_next_request_on_a_connection_gets_a_whole_deadline_from_its_own_first_byte(face: Face) -> None:
    channel, transport = face.connect()
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")  # its deadline would end at 30
    transport.clear()
    face.reactor.advance(20)
    channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")  # its own ends at 50
    face.reactor.advance(29)
    assert transport.value() == b"" and not transport.disconnecting
    face.reactor.advance(1)
    answer = parse(transport.value())
    assert (answer.status, answer.error_code()) == (408, "REQUEST_TIMEOUT") and transport.disconnecting


def test_the_deadline_is_a_config_key(tmp_path: Path) -> None:
    face = make_face(tmp_path, http={"header_timeout": "2s"})
    try:
        channel, transport = face.connect()
        channel.dataReceived(b"G")
        face.reactor.advance(2)
        assert parse(transport.value()).status == 408 and transport.disconnecting
    finally:
        face.root.close()


def test_connections_per_address_are_capped(tmp_path: Path) -> None:
    face = make_face(tmp_path, http={"max_connections_per_address": 2})
    try:
        first, _ = face.connect()
        face.connect()
        third, transport = face.connect()
        answer = parse(transport.value())
        assert (answer.status, answer.error_code(), transport.disconnecting) == (429, "TOOMANYREQUESTS", True)
        third.connectionLost(Failure(ConnectionDone()))
        other_channel, other = face.connect("10.0.0.2")  # another address has its own count
        other_channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n\r\n")
        assert parse(other.value()).status == 200
        first.connectionLost(Failure(ConnectionDone()))
        again, transport = face.connect()
        again.dataReceived(b"GET /v2/ HTTP/1.1\r\n\r\n")
        assert parse(transport.value()).status == 200
    finally:
        face.root.close()


def test_the_default_cap_takes_a_load_test_from_one_address(face: Face) -> None:
    channels = [face.connect("127.0.0.1") for _ in range(1000)]
    assert not any(transport.disconnecting for _, transport in channels)
    for channel, _ in channels:
        channel.connectionLost(Failure(ConnectionDone()))
    assert len(face.site.addresses) == 0


@pytest.mark.parametrize("head, status, code", [
    (b"POST /v2/team/app/blobs/uploads/ HTTP/1.1\r\nContent-Length: 419430400\r\n", 405, "UNSUPPORTED"),
    (b"PUT /v2/team/app/manifests/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 405, "UNSUPPORTED"),
    (b"POST /v2/ HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n", 405, "UNSUPPORTED"),
    (b"GET /v2/ HTTP/1.1\r\nContent-Length: 10\r\n", 413, "CONTENT_TOO_LARGE"),
    (b"HEAD /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 413, "CONTENT_TOO_LARGE"),
    (b"POST /token HTTP/1.1\r\nContent-Length: %d\r\n" % (FORM_LIMIT + 1), 413, "CONTENT_TOO_LARGE"),
    (b"POST /token?x=1 HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n", 413, "CONTENT_TOO_LARGE"),
    (b"POST /token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 411, "LENGTH_REQUIRED"),
    (b"POST /token HTTP/1.1\r\nTransfer-Encoding: gzip\r\n", 501, "UNSUPPORTED"),
    (b"POST /token HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 9\r\n", 415, "UNSUPPORTED"),
])
def test_a_body_is_refused_before_it_is_read(face: Face, head: bytes, status: int, code: str) -> None:
    channel, transport = face.connect()
    channel.dataReceived(head + b"Host: h\r\nExpect: 100-continue\r\n\r\n")
    answer = parse(transport.value())
    assert (answer.status, answer.error_code()) == (status, code)
    assert answer.headers["connection"] == "close" and transport.disconnecting
    assert b"100 Continue" not in transport.value()
    assert channel.requests[-1].content is None  # no body file was ever made
    channel.dataReceived(b"x" * 100_000)  # whatever still arrives is not read
    assert channel.requests[-1].content is None
    channel.connectionLost(Failure(ConnectionDone()))


def test_one_empty_line_before_a_request_is_still_skipped(face: Face) -> None:
    raw, _ = face.send(b"\r\nGET /v2/ HTTP/1.1\r\n\r\n")
    assert parse(raw).status == 200


def test_the_token_form_is_still_read(tmp_path: Path) -> None:
    accounts = {"ci": {"password_hash": hash_password("pw")}}
    face = make_face(tmp_path, anonymous="deny", accounts=accounts)
    try:
        for password, status in (("pw", 200), ("wrong", 401)):
            form = f"grant_type=password&username=ci&password={password}&service=metahub".encode()
            raw, _ = face.send(b"POST /token HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(form), form))
            answer = parse(raw)
            assert answer.status == status, answer.body
            assert ("access_token" in json.loads(answer.body)) == (status == 200)
        # At the limit exactly, the form is read (and here, having no grant, asks for a login).
        padding = b"x=" + b"a" * (FORM_LIMIT - 2)
        raw, _ = face.send(b"POST /token HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (len(padding), padding))
        assert parse(raw).status == 401
    finally:
        face.root.close()


# --- the http: config section -------------------------------------------------------------------


def test_http_limits_default_and_parse(tmp_path: Path) -> None:
    assert parse_config(minimal(tmp_path), str(tmp_path)).http == HttpConfig(30.0, 4096)
    config = parse_config(minimal(tmp_path) | {"http": {"header_timeout": "1m", "max_connections_per_address": 8}},
                          str(tmp_path))
    assert config.http == replace(HttpConfig(), header_timeout=60.0, max_connections_per_address=8)


@pytest.mark.parametrize("section, message", [
    ({"header_timeout": 0}, "http.header_timeout: must be greater than 0 seconds"),
    ({"header_timeout": "soon"}, "http.header_timeout: expected a duration"),
    ({"max_connections_per_address": 0}, "http.max_connections_per_address: expected a whole number of at least 1"),
    ({"max_connections_per_address": "many"}, "http.max_connections_per_address: expected a whole number"),
    ({"max_connections_per_address": True}, "http.max_connections_per_address: expected a whole number"),
    ({"header_timeot": "1s"}, "http.header_timeot: unknown key (did you mean 'header_timeout'?)"),
])
def test_bad_http_limits_are_config_errors(tmp_path: Path, section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(tmp_path) | {"http": section}, str(tmp_path))
    assert str(info.value).startswith(message)
