"""Protocol corners: the name grammar, references, routing, Range parsing, media types, error bodies."""
from __future__ import annotations

import json

import pytest

from metahub.cache.routing import route
from metahub.config.file import Config, StorageConfig, UpstreamConfig
from metahub.oci import errors, media
from metahub.oci.names import check_digest, check_name, check_reference
from metahub.web.ranges import content_range, parse_range

GOOD = "sha256:" + "ab" * 32


@pytest.mark.parametrize("name", ["a", "library/alpine", "a.b/c_d/e__f/g-h", "x--y/0", "a" * 255])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "A", "a/", "/a", "a//b", "a/../b", "..", "a.", "-a", "a_-b", "a b", "a%2fb", "a" * 256, "ä"]
)
def test_invalid_names_are_400_name_invalid(name: str) -> None:
    with pytest.raises(errors.RegistryError) as err:
        check_name(name)
    assert (err.value.status, err.value.code) == (400, "NAME_INVALID")


def test_references() -> None:
    assert check_reference("latest") == "latest"
    assert check_reference("v1.2_3-rc") == "v1.2_3-rc"
    assert check_reference(GOOD) == GOOD
    for bad_tag in ["-x", ".x", "a" * 129, "a/b"]:
        with pytest.raises(errors.RegistryError) as err:
            check_reference(bad_tag)
        assert err.value.code == "MANIFEST_UNKNOWN"
    for bad_digest in ["sha256:xyz", "sha256:" + "AB" * 32, "sha256:../../etc"]:
        with pytest.raises(errors.RegistryError) as err:
            check_reference(bad_digest)
        assert (err.value.status, err.value.code) == (400, "DIGEST_INVALID")
    with pytest.raises(errors.RegistryError) as err:
        check_digest("sha512:" + "a" * 128)
    assert "only sha256" in err.value.message


def _config() -> Config:
    return Config(
        storage=StorageConfig("/s", "/i"),
        upstreams={
            "docker.io": UpstreamConfig("docker.io", "https://registry-1.docker.io"),
            "ghcr.io": UpstreamConfig("ghcr.io", "https://ghcr.io"),
            "private": UpstreamConfig("private", "http://127.0.0.1:5001"),
        },
        default_upstream="docker.io",
    )


def test_routing() -> None:
    config = _config()
    r = route(config, "alpine")
    assert (r.upstream.name, r.repository, r.key) == ("docker.io", "library/alpine", "docker.io/library/alpine")
    assert route(config, "qnib/bench").repository == "qnib/bench"
    r = route(config, "ghcr.io/org/app")
    assert (r.upstream.name, r.repository) == ("ghcr.io", "org/app")
    assert route(config, "ghcr.io/app").repository == "app"  # no library/ rule off Docker Hub
    assert route(config, "private/team/x").upstream.name == "private"
    assert route(config, "team/x", ns="127.0.0.1:5001").upstream.name == "private"
    assert route(config, "team/x", ns="ghcr.io").upstream.name == "ghcr.io"
    assert route(config, "busybox", ns="docker.io").repository == "library/busybox"
    with pytest.raises(errors.RegistryError) as err:
        route(config, "team/x", ns="quay.io")
    assert err.value.code == "NAME_UNKNOWN"


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=10-", (10, 1000)),
        ("bytes=-100", (900, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=990-5000", (990, 1000)),
        ("bytes = 5 - 9", (5, 10)),
        ("bytes=9-5", None),  # invalid: ignored, whole blob
        ("bytes=0-1,5-6", None),  # multiple ranges: not supported, whole blob
        ("items=0-1", None),
        ("bytes=-", None),
        ("garbage", None),
    ],
)
def test_parse_range(header, expected) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range_is_416(header: str) -> None:
    with pytest.raises(errors.RegistryError) as err:
        parse_range(header, 1000)
    assert err.value.status == 416
    assert err.value.headers["Content-Range"] == "bytes */1000"


def test_content_range() -> None:
    assert content_range(0, 100, 1000) == "bytes 0-99/1000"


def test_accept_parsing() -> None:
    assert media.parse_accept([]) is None
    assert media.parse_accept(["*/*"]) is None
    accepted = media.parse_accept([f"{media.OCI_INDEX}, {media.DOCKER_MANIFEST};q=0.5", media.OCI_MANIFEST])
    assert accepted == {media.OCI_INDEX, media.DOCKER_MANIFEST, media.OCI_MANIFEST}
    assert media.acceptable(media.OCI_INDEX, accepted)
    assert not media.acceptable(media.DOCKER_LIST, accepted)


def test_manifest_inspection() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": [{"digest": GOOD, "size": 1}]}).encode()
    assert media.sniff_media_type(index) == media.OCI_INDEX
    manifest = json.dumps(
        {"mediaType": media.DOCKER_MANIFEST, "config": {"digest": "sha256:" + "1" * 64}, "layers": [{"digest": GOOD}]}
    ).encode()
    assert media.sniff_media_type(manifest) == media.DOCKER_MANIFEST
    assert media.references(manifest) == ["sha256:" + "1" * 64, GOOD]
    assert media.references(b"not json") == []


def test_error_body_is_oci_json() -> None:
    error = errors.blob_unknown(GOOD)
    assert error.status == 404
    assert json.loads(error.body()) == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry", "detail": {"digest": GOOD}}]
    }
    assert errors.too_many_requests("30").headers == {"Retry-After": "30"}
    assert errors.unauthorized(challenge='Basic realm="metahub"').headers["WWW-Authenticate"] == 'Basic realm="metahub"'
