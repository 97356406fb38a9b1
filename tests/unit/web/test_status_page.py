"""The status page: rendering from plain data (escaping, content), the bounded pull counter, and
the route served in-process through twisted.web's HTTP channel (login, methods, escaping)."""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from metahub.app.root import Root
from metahub.config.file import UpstreamConfig, parse_config
from metahub.oci.errors import RegistryError
from metahub.upstream.client import UpstreamClient
from metahub.web.auth import hash_password
from metahub.web.status import (
    FIGURES_TTL,
    MachineTypeRow,
    PullCounts,
    StatusData,
    UpstreamRow,
    render_page,
)
from storage.nodes import NodeRecord
from tests.unit.fakes import inline, inline_threads, minimal

successResultOf = SynchronousTestCase().successResultOf
failureResultOf = SynchronousTestCase().failureResultOf
HOSTILE = '<script>alert("x")</script>'
NOW = 1_800_000_000.0


def data(**changes: Any) -> StatusData:
    values: dict[str, Any] = dict(
        version="0.1.0", node="node-a", now=NOW, uptime=3725, listen="tcp:5000 (127.0.0.1:5000)",
        store_path="/srv/store", other_nodes=(NodeRecord("node-b", NOW - 20, 7, 3),),
        blob_count=42, total_bytes=750 * 2**20, max_size=2**30, hits=30, misses=10,
        bytes_from_cache=5 * 2**20, bytes_from_upstream=2**20,
        top_repositories=(("local/team/app", 9), ("docker.io/library/alpine", 4)),
        upstreams=(UpstreamRow("local", "http://127.0.0.1:5001", True, NOW - 5, (NOW - 60, "upstream local answered HTTP 500")),),
        machine_types=(MachineTypeRow("skylake", "linux/amd64", ("avx512",), "subset", ("ci",)),),
    )
    values.update(changes)
    return StatusData(**values)


def text_of(page: str, element_id: str) -> str:
    """The text inside the element with ``id``, tags stripped."""
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</(td|span|p)>', page, re.S)
    assert match, element_id
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


def test_the_page_shows_the_figures_it_is_given() -> None:
    page = render_page(data())
    assert page.startswith("<!DOCTYPE html>")
    assert text_of(page, "version") == "0.1.0"
    assert text_of(page, "uptime") == "1h2m5s"
    assert text_of(page, "blob-count") == "42"
    assert (text_of(page, "hits"), text_of(page, "misses"), text_of(page, "hit-ratio")) == ("30", "10", "75.0%")
    assert "yes: 1 other live node" in text_of(page, "shared")
    assert "node-b" in page and "local/team/app" in page and "avx512" in page and ">ci<" in page
    assert 'style="width:73.2%"' in page  # 750 MiB of 1 GiB
    assert "750MiB" in page and "1GiB" in page and "5MiB" in page
    assert "upstream local answered HTTP 500" in page and "(default)" in page
    assert "<script" not in page  # no script of its own, ever
    assert "http://" not in page.replace("http://127.0.0.1:5001", "")  # no external asset


def test_an_unbounded_lone_store_says_so() -> None:
    page = render_page(data(max_size=None, other_nodes=(), top_repositories=(), hits=0, misses=0))
    assert "unbounded" in page and 'class="bar"' not in page
    assert text_of(page, "shared") == "no other live node"
    assert "n/a" in text_of(page, "hit-ratio")
    assert "Nothing pulled since this node started." in page


def test_every_value_is_escaped() -> None:
    report = {
        "image": HOSTILE, "digest": "sha256:" + "a" * 64, "media_type": HOSTILE,
        "entries": [{"position": 0, "digest": HOSTILE, "media_type": "m", "platform": HOSTILE, "features": [HOSTILE]}],
        "machine_types": {HOSTILE: {"digest": None, "position": None, "why": HOSTILE}},
    }
    page = render_page(data(
        node=HOSTILE, listen=HOSTILE, store_path=HOSTILE, version=HOSTILE,
        other_nodes=(NodeRecord(HOSTILE, NOW, 1, 1),), top_repositories=((HOSTILE, 1),),
        upstreams=(UpstreamRow(HOSTILE, HOSTILE, False, None, (NOW, HOSTILE)),),
        machine_types=(MachineTypeRow(HOSTILE, HOSTILE, (HOSTILE,), HOSTILE, (HOSTILE,)),),
        image=HOSTILE, resolved=report,
    ))
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 15
    error_page = render_page(data(image='"><script>', resolve_error=HOSTILE))
    assert "<script" not in error_page and 'value="&quot;&gt;&lt;script&gt;"' in error_page


def test_a_resolve_report_becomes_a_table() -> None:
    report = {
        "image": "team/bench:1.0", "digest": "sha256:" + "1" * 64, "media_type": "application/vnd.oci.image.index.v1+json",
        "entries": [{"position": 0, "digest": "sha256:" + "2" * 64, "media_type": "m",
                     "platform": "linux/amd64", "features": ["avx2"]}],
        "machine_types": {"skylake": {"digest": "sha256:" + "2" * 64, "position": 0, "why": "entry 0: linux/amd64"}},
    }
    page = render_page(data(image="team/bench:1.0", resolved=report))
    assert 'value="team/bench:1.0"' in page
    assert "<td>skylake</td><td><code>sha256:" + "2" * 64 + "</code></td><td>entry 0: linux/amd64</td>" in page


def test_the_pull_counter_stays_bounded_and_keeps_the_popular() -> None:
    counts = PullCounts(size=10)
    for _ in range(50):
        counts.add("popular/app")
    for i in range(10_000):  # a flood of distinct names
        counts.add(f"flood/{i}")
        assert len(counts) <= 10
    assert counts.top(1) == [("popular/app", 50)]
    counts.add("popular/app")
    assert counts.top(1) == [("popular/app", 51)]


# --- the route, in-process ---------------------------------------------------------------------


class _Reactor(Clock):
    """A Clock with the thread pool the root asks for; work runs inline (see ``site``)."""

    def getThreadPool(self) -> None:
        return None


def site(tmp_path: Path, **config: Any):
    parsed = parse_config({**minimal(tmp_path), **config}, str(tmp_path))
    root = Root(config=parsed, reactor=_Reactor(), listen="tcp:5000")
    inline_threads(root)
    built = root.site
    built.resource.registry.in_thread = inline  # the logins' KDF runner
    return root, built


def get(built, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    channel = built.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1", "Host: metahub.test", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(": ")
        parsed[name.lower()] = value
    return int(status_line.split()[1]), parsed, body.decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def public(tmp_path):
    root, built = site(tmp_path, anonymous="allow")
    yield built
    root.close()


def test_both_paths_serve_the_page_with_a_strict_policy(public) -> None:
    for path in ("/", "/_metahub/"):
        status, headers, body = get(public, path)
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert "tcp:5000" in text_of(body, "listen") and text_of(body, "blob-count") == "0"
        assert "registry-1.docker.io" in body
    status, headers, body = get(public, "/", "HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 1000
    assert get(public, "/", "POST")[0] == 405


def test_an_image_name_with_a_script_shows_as_text(public) -> None:
    status, _, body = get(public, "/_metahub/?image=%3Cscript%3Ealert(1)%3C/script%3E")
    assert status == 400
    assert "<script" not in body
    assert text_of(body, "resolve-error").startswith("NAME_INVALID: &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;")


def test_anonymous_deny_asks_a_browser_for_basic_credentials(tmp_path) -> None:
    hashed = hash_password("secret")
    root, built = site(
        tmp_path, anonymous="deny",
        machine_types={"skylake": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["avx512"]}},
        accounts={"ci": {"password_hash": hashed, "machine_types": ["skylake"]}},
    )
    try:
        status, headers, body = get(built, "/")
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="metahub"'
        assert '"UNAUTHORIZED"' in body
        status, headers, _ = get(built, "/", headers=basic("ci", "wrong"))
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="metahub"'
        status, _, body = get(built, "/", headers=basic("ci-skylake", "secret"))
        assert status == 200
        assert "<td>skylake</td>" in body and "<td>ci</td>" in body and hashed not in body
        assert "scrypt$" not in body
    finally:
        root.close()


def test_with_accounts_the_page_is_public_but_resolving_needs_a_login(tmp_path) -> None:
    root, built = site(tmp_path, anonymous="allow", accounts={"ci": {"password_hash": hash_password("pw")}})
    try:
        assert get(built, "/")[0] == 200
        status, headers, _ = get(built, "/?image=team/app:1")
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="metahub"'
    finally:
        root.close()


# --- upstreams' last success and last error ----------------------------------------------------


class _Upstream(Resource):
    """``ok`` has every blob, ``gone`` has none (404), ``broken`` fails (500)."""

    isLeaf = True

    def render(self, request) -> bytes:
        repository = request.path.decode().split("/")[2]
        request.setResponseCode({"ok": 200, "gone": 404}.get(repository, 500))
        request.setHeader("Content-Length", "0")
        return b""


class _Unreachable:
    def request(self, method: str, url: str, **kwargs: Any):
        return fail(ConnectionRefusedError())  # twisted.internet.error's, as the network raises it


def test_an_upstream_client_remembers_its_last_success_and_error() -> None:
    clock = Clock()
    config = UpstreamConfig("local", "http://upstream.test")
    client = UpstreamClient(config, StubTreq(_Upstream()), clock)
    assert (client.last_success, client.last_error) == (None, None)
    digest = "sha256:" + "a" * 64
    clock.advance(10)
    assert successResultOf(ensureDeferred(client.head_blob("ok", digest))) == 0
    assert client.last_success == 10 and client.last_error is None
    clock.advance(10)
    failureResultOf(ensureDeferred(client.head_blob("gone", digest)), RegistryError)
    assert client.last_success == 20 and client.last_error is None  # a 404 is an answer, not a failure
    clock.advance(10)
    failureResultOf(ensureDeferred(client.head_blob("broken", digest)), RegistryError)
    assert client.last_success == 20 and client.last_error == (30, "upstream local answered HTTP 500")
    down = UpstreamClient(config, _Unreachable(), clock)
    failureResultOf(ensureDeferred(down.head_blob("ok", digest)), RegistryError)
    assert down.last_success is None and "unreachable" in down.last_error[1]


def test_the_store_is_scanned_in_a_thread_at_most_every_few_seconds(tmp_path) -> None:
    root, built = site(tmp_path, anonymous="allow")
    registry = built.resource.registry
    scans: list[str] = []

    def in_thread(function, *args):
        scans.append(function.__name__)
        return succeed(function(*args))

    registry.in_thread = in_thread
    try:
        for _ in range(3):
            assert get(built, "/")[0] == 200
        assert scans == ["_scan"]
        root.reactor.advance(FIGURES_TTL)
        assert get(built, "/")[0] == 200
        assert scans == ["_scan", "_scan"]
    finally:
        root.close()
