"""The registry's HTTP face in memory: the real RegistryResource over StubTreq, fake upstreams.

Routing and ``?ns=``, the OCI error body of every code the face gives, the login challenge with and
without ``anonymous: allow``, HEAD answering what GET answers, and Range on cached and uncached
blobs. The harness is in tests/unit/harness.py.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from metahub.web.auth import hash_password
from tests.unit.fakes import commit_blob
from tests.unit.harness import (
    Answer,
    FakeRegistry,
    Forced,
    InMemoryRegistry,
    basic,
    digest_of,
    in_memory_registry,
    oci_error,
)

LAYER = os.urandom(5000)
LAYER_DIGEST = digest_of(LAYER)
MISSING = digest_of(b"nobody has this")
CHALLENGE = 'Bearer realm="http://metahub.test/token",service="metahub"'
PASSWORD = "hunter2-but-longer"
#: A scrypt hash, computed once: each costs tens of milliseconds.
HASH = hash_password(PASSWORD)


@dataclass
class Upstreams:
    hub: FakeRegistry
    ghcr: FakeRegistry


@pytest.fixture
def upstreams() -> Upstreams:
    hub, ghcr = FakeRegistry("hub.test"), FakeRegistry("ghcr.test")
    hub.add_image("library/alpine", "3.20", LAYER)
    for tag in ("a", "b", "c"):
        hub.add_image("library/alpine", tag, LAYER)
    ghcr.add_image("org/app", "1.0", b"ghcr layer")
    return Upstreams(hub, ghcr)


MakeRegistry = Callable[..., InMemoryRegistry]


@pytest.fixture
def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstreams: Upstreams) -> Iterator[MakeRegistry]:
    """metahub with docker.io (the default) and ghcr.io upstreams; keyword arguments are config."""
    built: list[InMemoryRegistry] = []

    def build(**config: Any) -> InMemoryRegistry:
        built.append(in_memory_registry(
            tmp_path / f"metahub-{len(built)}", monkeypatch, {"docker.io": upstreams.hub, "ghcr.io": upstreams.ghcr},
            **config,
        ))
        return built[-1]

    yield build
    for registry in built:
        registry.close()


@pytest.fixture
def registry(make: MakeRegistry) -> InMemoryRegistry:
    return make(anonymous="allow")


def comparable(answer: Answer) -> tuple[int, dict[str, str]]:
    """Status and headers, without the Date that may tick between two answers."""
    return answer.status, {name: value for name, value in answer.headers.items() if name != "date"}


def assert_head_agrees(
    registry: InMemoryRegistry, path: str, get: Answer, headers: dict[str, str] | None = None
) -> None:
    head = registry.head(path, headers)
    assert head.body == b""
    assert comparable(head) == comparable(get)


# --- routing -------------------------------------------------------------------------------------


def test_the_api_root_answers_with_the_version_header(registry: InMemoryRegistry) -> None:
    for path in ("/v2/", "/v2"):
        answer = registry.get(path)
        assert (answer.status, answer.body) == (200, b"{}")
        assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
        assert_head_agrees(registry, path, answer)


def test_a_plain_name_goes_to_the_default_upstream_under_library(
    registry: InMemoryRegistry, upstreams: Upstreams
) -> None:
    answer = registry.get("/v2/alpine/manifests/3.20")
    assert answer.status == 200 and json.loads(answer.body)["layers"][0]["digest"] == LAYER_DIGEST
    assert upstreams.hub.requests == [("GET", "/v2/library/alpine/manifests/3.20")]
    assert upstreams.ghcr.requests == []


def test_a_first_segment_naming_an_upstream_picks_it(registry: InMemoryRegistry, upstreams: Upstreams) -> None:
    assert registry.get("/v2/ghcr.io/org/app/manifests/1.0").status == 200
    assert upstreams.ghcr.requests == [("GET", "/v2/org/app/manifests/1.0")]
    assert upstreams.hub.requests == []


@pytest.mark.parametrize("ns", ["ghcr.io", "ghcr.test"])
def test_ns_picks_the_upstream_by_name_or_host(registry: InMemoryRegistry, upstreams: Upstreams, ns: str) -> None:
    # containerd's mirror form: the client's name is the upstream's, the upstream is in ?ns=.
    answer = registry.get(f"/v2/org/app/manifests/1.0?ns={ns}")
    assert answer.status == 200
    assert upstreams.ghcr.requests == [("GET", "/v2/org/app/manifests/1.0")]
    assert upstreams.hub.requests == []


def test_ns_of_docker_hub_puts_an_official_image_under_library(
    registry: InMemoryRegistry, upstreams: Upstreams
) -> None:
    assert registry.get("/v2/alpine/manifests/3.20?ns=docker.io").status == 200
    assert upstreams.hub.requests == [("GET", "/v2/library/alpine/manifests/3.20")]


def test_a_blob_is_fetched_from_the_routed_repository(registry: InMemoryRegistry, upstreams: Upstreams) -> None:
    answer = registry.get(f"/v2/alpine/blobs/{LAYER_DIGEST}")
    assert (answer.status, answer.body) == (200, LAYER)
    assert answer.headers["docker-content-digest"] == LAYER_DIGEST
    assert upstreams.hub.requests == [("GET", f"/v2/library/alpine/blobs/{LAYER_DIGEST}")]


def test_a_blob_file_the_index_lacks_is_served_from_the_store_and_adopted(
    registry: InMemoryRegistry, upstreams: Upstreams
) -> None:
    storage = registry.root.storage
    commit_blob(storage.blobs, LAYER)  # another node's download, say: the file, not this node's index
    assert storage.index.get_blob(LAYER_DIGEST) is None
    answer = registry.get(f"/v2/alpine/blobs/{LAYER_DIGEST}")
    assert (answer.status, answer.body) == (200, LAYER)
    # Upstream confirmed the repository has it (a HEAD), and sent no byte of it.
    assert upstreams.hub.requests == [("HEAD", f"/v2/library/alpine/blobs/{LAYER_DIGEST}")]
    assert storage.index.get_blob(LAYER_DIGEST).size == len(LAYER)


def test_the_tag_list_is_paginated_under_the_clients_name(registry: InMemoryRegistry, upstreams: Upstreams) -> None:
    whole = registry.get("/v2/alpine/tags/list")
    assert whole.status == 200 and whole.json() == {"name": "alpine", "tags": ["3.20", "a", "b", "c"]}
    assert "link" not in whole.headers
    page = registry.get("/v2/alpine/tags/list?n=2&last=3.20")
    assert page.json() == {"name": "alpine", "tags": ["a", "b"]}
    assert page.headers["link"] == '</v2/alpine/tags/list?n=2&last=b>; rel="next"'
    assert upstreams.hub.requests[-1] == ("GET", "/v2/library/alpine/tags/list?n=2&last=3.20")
    assert_head_agrees(registry, "/v2/alpine/tags/list?n=2&last=3.20", page)


def test_an_unknown_endpoint_is_404_not_found(registry: InMemoryRegistry, upstreams: Upstreams) -> None:
    for path in ("/v2/alpine/uploads/x", "/v2/alpine/tags/everything", "/nothing-here"):
        answer = registry.get(path)
        assert answer.status == 404 and answer.error()["code"] == "NOT_FOUND", path
    assert upstreams.hub.requests == []


# --- every error code: status and OCI body ------------------------------------------------------


@dataclass(frozen=True)
class ErrorCase:
    method: str
    path: str
    status: int
    code: str
    prepare: Callable[[Upstreams], None] = lambda _upstreams: None
    config: tuple[tuple[str, Any], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    answer_headers: tuple[tuple[str, str], ...] = ()  # headers the error answer must carry


def _forced(path: str, forced: Forced) -> Callable[[Upstreams], None]:
    return lambda upstreams: upstreams.hub.forced.__setitem__(path, forced)


_ACCOUNTS = (("accounts", {"ci": {"password_hash": HASH, "repositories": ["library/*"]}}),)
_CI = (("Authorization", basic("ci", PASSWORD)["Authorization"]),)

ERROR_CASES = {
    "BAD_REQUEST host": ErrorCase("GET", "/v2/alpine/manifests/3.20", 400, "BAD_REQUEST",
                                  headers=(("Host", "not a host"),)),
    "NOT_FOUND": ErrorCase("GET", "/v2/alpine/referrers/x", 404, "NOT_FOUND"),
    "NAME_INVALID": ErrorCase("GET", "/v2/Alpine/manifests/latest", 400, "NAME_INVALID"),
    "NAME_UNKNOWN ns": ErrorCase("GET", "/v2/org/app/manifests/1.0?ns=elsewhere.test", 404, "NAME_UNKNOWN"),
    "NAME_UNKNOWN upstream": ErrorCase("GET", "/v2/nobody/here/manifests/1.0", 404, "NAME_UNKNOWN"),
    "MANIFEST_UNKNOWN": ErrorCase("GET", "/v2/alpine/manifests/no-such-tag", 404, "MANIFEST_UNKNOWN"),
    "MANIFEST_UNKNOWN bad tag": ErrorCase("GET", "/v2/alpine/manifests/-dash", 404, "MANIFEST_UNKNOWN"),
    "BLOB_UNKNOWN": ErrorCase("GET", f"/v2/alpine/blobs/{MISSING}", 404, "BLOB_UNKNOWN"),
    "DIGEST_INVALID": ErrorCase("GET", "/v2/alpine/blobs/sha256:not-hex", 400, "DIGEST_INVALID"),
    "UNAUTHORIZED": ErrorCase("GET", "/v2/alpine/manifests/3.20", 401, "UNAUTHORIZED",
                              config=(("anonymous", "deny"),), answer_headers=(("www-authenticate", CHALLENGE),)),
    "DENIED": ErrorCase("GET", "/v2/ghcr.io/org/app/manifests/1.0", 403, "DENIED", config=_ACCOUNTS, headers=_CI),
    "UNSUPPORTED": ErrorCase("DELETE", "/v2/alpine/manifests/3.20", 405, "UNSUPPORTED"),
    "RANGE_INVALID": ErrorCase("GET", f"/v2/alpine/blobs/{LAYER_DIGEST}", 416, "RANGE_INVALID",
                               headers=(("Range", "bytes=5000-"),),
                               answer_headers=(("content-range", "bytes */5000"),)),
    "PAGINATION_NUMBER_INVALID": ErrorCase("GET", "/v2/alpine/tags/list?n=%C2%B2", 400, "PAGINATION_NUMBER_INVALID"),
    "TOOMANYREQUESTS": ErrorCase(
        "GET", "/v2/alpine/manifests/3.20", 429, "TOOMANYREQUESTS",
        prepare=_forced("/v2/library/alpine/manifests/3.20",
                        Forced(429, {"Retry-After": "7"}, oci_error("TOOMANYREQUESTS"))),
        answer_headers=(("retry-after", "7"),),
    ),
    "UNAVAILABLE 502": ErrorCase(
        "GET", "/v2/alpine/manifests/3.20", 502, "UNAVAILABLE",
        prepare=_forced("/v2/library/alpine/manifests/3.20", Forced(500, {}, b"oops")),
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_each_error_is_its_status_and_an_oci_json_body(
    make: MakeRegistry, upstreams: Upstreams, case: ErrorCase
) -> None:
    case.prepare(upstreams)
    registry = make(**({"anonymous": "allow"} | dict(case.config)))
    answer = registry.request(case.method, case.path, dict(case.headers))
    assert answer.status == case.status
    error = answer.error()
    assert error["code"] == case.code and isinstance(error["message"], str) and error["message"]
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
    assert "docker-content-digest" not in answer.headers
    for name, value in case.answer_headers:
        assert answer.headers[name] == value
    if case.method == "GET":  # and HEAD gives the same status and headers, without the body
        assert_head_agrees(registry, case.path, answer, dict(case.headers))


def test_an_upstream_that_does_not_answer_in_time_is_504(registry: InMemoryRegistry, upstreams: Upstreams) -> None:
    upstreams.hub.hanging.add("/v2/library/alpine/manifests/3.20")
    pending = registry.start("GET", "/v2/alpine/manifests/3.20")
    assert registry.settle(pending) is None
    registry.reactor.advance(60)  # the default read_timeout
    answer = registry.settle(pending)
    assert answer is not None and answer.status == 504
    assert answer.error()["code"] == "UNAVAILABLE"
    assert "did not answer within 60 s" in answer.error()["message"]


def test_the_error_names_what_was_not_found(registry: InMemoryRegistry) -> None:
    assert registry.get("/v2/Alpine/manifests/latest").error()["detail"] == {"name": "Alpine"}
    assert registry.get("/v2/alpine/manifests/nope").error()["detail"] == {"reference": "nope"}
    assert registry.get(f"/v2/alpine/blobs/{MISSING}").error()["detail"] == {"digest": MISSING}
    assert registry.get("/v2/alpine/blobs/sha256:zz").error()["detail"] == {"digest": "sha256:zz"}


# --- the login challenge -------------------------------------------------------------------------


def assert_challenged(answer: Answer) -> None:
    assert answer.status == 401 and answer.error()["code"] == "UNAUTHORIZED"
    assert answer.headers["www-authenticate"] == CHALLENGE


PULL_PATHS = ["/v2/", "/v2/alpine/manifests/3.20", f"/v2/alpine/blobs/{LAYER_DIGEST}", "/v2/alpine/tags/list"]


def test_anonymous_allow_without_accounts_needs_no_login(registry: InMemoryRegistry) -> None:
    for path in PULL_PATHS:
        answer = registry.get(path)
        assert answer.status == 200 and "www-authenticate" not in answer.headers, path
    assert registry.get("/token").status == 200  # an anonymous token, for clients that ask anyway


def test_anonymous_deny_challenges_every_request_and_the_realm_wants_a_login(
    make: MakeRegistry, upstreams: Upstreams
) -> None:
    registry = make(anonymous="deny", accounts={"ci": {"password_hash": HASH}})
    for path in PULL_PATHS:
        assert_challenged(registry.get(path))
        head = registry.head(path)
        assert (head.status, head.headers["www-authenticate"]) == (401, CHALLENGE)
    assert upstreams.hub.requests == []  # nothing reaches upstream before the login
    refused = registry.get("/token")
    assert refused.status == 401 and refused.headers["www-authenticate"] == 'Basic realm="metahub"'
    wrong = registry.get("/v2/alpine/manifests/3.20", basic("ci", "wrong"))
    assert_challenged(wrong)
    assert wrong.error()["message"] == "incorrect username or password"
    token = registry.token(basic("ci", PASSWORD))
    assert registry.get("/v2/alpine/manifests/3.20", token).status == 200
    assert registry.get("/v2/alpine/manifests/3.20", basic("ci", PASSWORD)).status == 200


def test_with_accounts_anonymous_allow_still_challenges_requests_without_credentials(
    make: MakeRegistry, upstreams: Upstreams
) -> None:
    # A machine-type login must be asked for: containerd sends it only when challenged.
    registry = make(anonymous="allow", accounts={"ci": {"password_hash": HASH}})
    for path in PULL_PATHS:
        assert_challenged(registry.get(path))
    assert upstreams.hub.requests == []
    anonymous = registry.token()  # the realm hands out anonymous tokens, as Docker Hub's does
    for path in PULL_PATHS:
        assert registry.get(path, anonymous).status == 200, path


def test_without_accounts_anonymous_deny_refuses_even_a_token(make: MakeRegistry) -> None:
    registry = make(anonymous="deny")
    assert_challenged(registry.get("/v2/"))
    assert registry.get("/token").status == 401
    forged = registry.get("/v2/", {"Authorization": "Bearer not.a.token"})
    assert_challenged(forged)


def test_the_challenge_names_the_host_the_client_used(make: MakeRegistry) -> None:
    registry = make(anonymous="deny")
    answer = registry.get("/v2/", {"Host": "mirror.example:5000"})
    assert answer.headers["www-authenticate"] == 'Bearer realm="http://mirror.example:5000/token",service="metahub"'


# --- HEAD agrees with GET ------------------------------------------------------------------------


def test_head_of_a_manifest_agrees_with_get_by_tag_and_by_digest(registry: InMemoryRegistry) -> None:
    by_tag = registry.get("/v2/alpine/manifests/3.20")
    digest = by_tag.headers["docker-content-digest"]
    assert digest == digest_of(by_tag.body)
    assert by_tag.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert_head_agrees(registry, "/v2/alpine/manifests/3.20", by_tag)
    by_digest = registry.get(f"/v2/alpine/manifests/{digest}")
    assert by_digest.body == by_tag.body
    assert_head_agrees(registry, f"/v2/alpine/manifests/{digest}", by_digest)
    assert comparable(by_digest) == comparable(by_tag)


def test_head_of_an_uncached_blob_asks_upstream_and_agrees_with_the_get(
    registry: InMemoryRegistry, upstreams: Upstreams
) -> None:
    path = f"/v2/alpine/blobs/{LAYER_DIGEST}"
    head = registry.head(path)
    assert upstreams.hub.requests == [("HEAD", f"/v2/library/alpine/blobs/{LAYER_DIGEST}")]  # no download
    get = registry.get(path)
    assert get.body == LAYER
    assert comparable(head) == comparable(get)
    assert (head.status, head.headers["content-length"], head.headers["accept-ranges"]) == (200, "5000", "bytes")
    assert_head_agrees(registry, path, get)  # and once cached
    assert upstreams.hub.count("GET", f"/v2/library/alpine/blobs/{LAYER_DIGEST}") == 1


def test_head_with_a_range_agrees_with_the_get_cached_or_not(registry: InMemoryRegistry) -> None:
    path = f"/v2/alpine/blobs/{LAYER_DIGEST}"
    ranged = {"Range": "bytes=100-199"}
    head_uncached = registry.head(path, ranged)
    get = registry.get(path, ranged)
    assert get.status == 206 and get.body == LAYER[100:200]
    assert comparable(head_uncached) == comparable(get)
    assert_head_agrees(registry, path, get, ranged)


def test_a_manifest_the_accept_header_rules_out_is_manifest_unknown(registry: InMemoryRegistry) -> None:
    docker_only = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    answer = registry.get("/v2/alpine/manifests/3.20", docker_only)
    assert answer.status == 404 and answer.error()["code"] == "MANIFEST_UNKNOWN"
    assert answer.error()["detail"]["media_type"] == "application/vnd.oci.image.manifest.v1+json"
    assert_head_agrees(registry, "/v2/alpine/manifests/3.20", answer, docker_only)


# --- Range on cached and uncached blobs ----------------------------------------------------------

RANGES = [
    ("bytes=10-19", 206, "bytes 10-19/5000", LAYER[10:20]),
    ("bytes=4990-", 206, "bytes 4990-4999/5000", LAYER[4990:]),
    ("bytes=-25", 206, "bytes 4975-4999/5000", LAYER[-25:]),
    ("bytes=0-", 206, "bytes 0-4999/5000", LAYER),
    ("bytes=4000-9999", 206, "bytes 4000-4999/5000", LAYER[4000:]),
    ("bytes=20-10", 200, None, LAYER),  # last before first: ignored, the whole blob
    ("items=0-1", 200, None, LAYER),  # not a byte range: ignored
]


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize(("header", "status", "content_range", "body"), RANGES, ids=[r[0] for r in RANGES])
def test_a_range_is_served_from_a_cached_or_an_uncached_blob(
    registry: InMemoryRegistry, upstreams: Upstreams, cached: bool, header: str, status: int,
    content_range: str | None, body: bytes,
) -> None:
    path = f"/v2/alpine/blobs/{LAYER_DIGEST}"
    if cached:
        assert registry.get(path).body == LAYER
    answer = registry.get(path, {"Range": header})
    assert (answer.status, answer.body) == (status, body)
    assert answer.headers.get("content-range") == content_range
    assert answer.headers["content-length"] == str(len(body))
    assert answer.headers["docker-content-digest"] == LAYER_DIGEST
    # Either way upstream sent the blob once, whole: a range is cut from the store's copy.
    assert upstreams.hub.count("GET", f"/v2/library/alpine/blobs/{LAYER_DIGEST}") == 1
    assert registry.get(path).body == LAYER


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("header", ["bytes=5000-", "bytes=9999-10000", "bytes=-0"])
def test_an_unsatisfiable_range_is_416_with_the_size(registry: InMemoryRegistry, cached: bool, header: str) -> None:
    path = f"/v2/alpine/blobs/{LAYER_DIGEST}"
    if cached:
        registry.get(path)
    answer = registry.get(path, {"Range": header})
    assert answer.status == 416 and answer.error()["code"] == "RANGE_INVALID"
    assert answer.headers["content-range"] == "bytes */5000"
    assert answer.error()["detail"] == {"range": header}
    assert registry.get(path, {"Range": "bytes=0-0"}).body == LAYER[:1]  # the blob is still served


# --- an upstream behind a token realm ------------------------------------------------------------


def test_an_upstream_behind_a_token_realm_is_asked_once_for_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeRegistry("hub.test", token=True, credentials=("robot", "upstream-secret"))
    hub.add_image("team/app", "1", LAYER)
    (tmp_path / "hub.pw").write_text("upstream-secret\n")
    registry = in_memory_registry(tmp_path, monkeypatch, {"hub": hub}, anonymous="allow")
    try:  # configured without credentials: the realm refuses
        refused = registry.get("/v2/team/app/manifests/1")
        assert refused.status == 401 and refused.error()["message"] == "upstream hub refused anonymous access"
    finally:
        registry.close()
    hub.requests.clear()
    (tmp_path / "again").mkdir()
    registry = in_memory_registry(
        tmp_path / "again", monkeypatch, {"hub": hub}, anonymous="allow",
        upstreams={"hub": {"url": "http://hub.test", "username": "robot", "password_file": str(tmp_path / "hub.pw")}},
    )
    try:
        assert registry.get("/v2/team/app/manifests/1").status == 200
        assert registry.get(f"/v2/team/app/blobs/{LAYER_DIGEST}").body == LAYER
        assert hub.issued == ["token-1"]
        assert hub.count("GET", "/token?service=hub.test&scope=repository%3Ateam%2Fapp%3Apull") == 1
    finally:
        registry.close()
