"""Pulling from HTTPS upstreams: a real docker-registry serving TLS on certificates from a test CA.

Production upstreams all speak TLS, private ones behind a site CA. These tests prove that an
upstream's ``ca_file`` is trusted (and is the only thing trusted), that the system's roots are
used without one, that a TLS failure of any kind (unknown CA, wrong host name, expired
certificate) is a prompt 502 ``UNAVAILABLE`` that names the upstream and the reason, and that a
blob redirect to a second TLS origin (the CDN case) is verified against the same ``ca_file``.

"The system's roots" are made the test CA by ``SSL_CERT_FILE`` in metahub's environment, which
OpenSSL's default trust store honours: that is how a test can tell "trusts the system roots" and
"trusts ca_file alone" apart without touching the machine's real store.
"""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import sha256_digest
from tests.peers import skopeo
from tests.peers.cdn import CDN
from tests.peers.oci import Image, make_image
from tests.peers.ports import LOOPBACK
from tests.peers.registry import Registry
from tests.peers.tls import CA, make_ca

from .metahub_process import Metahub

# A TLS failure is known within a round trip; anything near the read timeout would be a hang.
PROMPT = 10.0


def request(host: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    address, port = host.split(":")
    connection = http.client.HTTPConnection(address, int(port), timeout=60)
    try:
        connection.request(method, path, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def error_of(body: bytes) -> tuple[str, str]:
    error = json.loads(body)["errors"][0]
    return error["code"], error["message"]


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path / "pki")


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator:
    """Start TLS docker-registries on demand, each stopped when the test ends."""
    started: list[Registry] = []

    def start(certificate: tuple[Path, Path], redirect_blobs_to: str | None = None) -> Registry:
        registry = Registry(tmp_path / f"registry-{len(started)}", tls=certificate,
                            redirect_blobs_to=redirect_blobs_to)
        started.append(registry)
        return registry

    yield start
    for registry in reversed(started):
        registry.stop()


def push_image(tmp_path: Path, registry: Registry) -> Image:
    image = make_image(tmp_path / "layout", "1", layers=[150_000], files={"hello.txt": b"over TLS\n"})
    skopeo.push(tmp_path / "layout", "1", f"{registry.host}/team/app:1")
    return image


def metahub_for(tmp_path: Path, registry: Registry, ca_file: str | None) -> Metahub:
    upstream: dict[str, str] = {"url": registry.url}
    if ca_file is not None:
        upstream["ca_file"] = ca_file
    return Metahub(tmp_path / "metahub", {"private": upstream}, default_upstream="private")


def trust(tmp_path: Path, ca: CA) -> str:
    """Put the CA next to metahub's config and name it relative to it, as docs/configuration.md says."""
    (tmp_path / "metahub" / "trust").mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.cert_path, tmp_path / "metahub" / "trust" / "ca.crt")
    return "trust/ca.crt"


def assert_pulls(tmp_path: Path, hub: Metahub, image: Image) -> None:
    """skopeo pulls the image through metahub and every byte matches what was pushed."""
    assert skopeo.inspect_raw(f"{hub.host}/team/app:1") == image.manifest
    skopeo.copy_to_dir(f"{hub.host}/team/app:1", tmp_path / "pulled")
    for blob in [image.config, *image.layers]:
        assert sha256_digest((tmp_path / "pulled" / blob.digest.split(":")[1]).read_bytes()) == blob.digest


def assert_tls_failure(hub: Metahub, path: str, expected: str) -> None:
    """A prompt 502 UNAVAILABLE with ``expected`` as the message, and a log line saying the same."""
    started = time.monotonic()
    status, body = request(hub.host, path)
    assert time.monotonic() - started < PROMPT
    assert (status, error_of(body)) == (502, ("UNAVAILABLE", expected))
    assert expected in hub.log()
    assert "Traceback" not in hub.log()


def test_pull_through_https_upstream_trusting_ca_file(tmp_path, ca, start_registry) -> None:
    registry = start_registry(ca.issue(tmp_path / "certs", "registry"))
    image = push_image(tmp_path, registry)
    with metahub_for(tmp_path, registry, trust(tmp_path, ca)) as hub:
        assert_pulls(tmp_path, hub, image)


def test_without_ca_file_the_system_roots_are_trusted(tmp_path, ca, start_registry, monkeypatch) -> None:
    registry = start_registry(ca.issue(tmp_path / "certs", "registry"))
    image = push_image(tmp_path, registry)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_path))
    with metahub_for(tmp_path, registry, None) as hub:
        assert_pulls(tmp_path, hub, image)


@pytest.mark.parametrize("ca_file", ["none", "another CA"])
def test_untrusted_ca_is_bad_gateway(tmp_path, ca, start_registry, monkeypatch, ca_file) -> None:
    """Without ca_file the system roots do not know the CA. With another CA's file, the system roots
    (made to know the CA here) are not asked: the file is the whole of the trust."""
    registry = start_registry(ca.issue(tmp_path / "certs", "registry"))
    push_image(tmp_path, registry)
    other = None
    if ca_file == "another CA":
        other = trust(tmp_path, make_ca(tmp_path / "other-pki", "another CA"))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_path))
    with metahub_for(tmp_path, registry, other) as hub:
        assert_tls_failure(hub, "/v2/team/app/manifests/1",
                           f"upstream private: TLS handshake with https://{registry.host} failed: "
                           "certificate verify failed (unable to get issuer cert locally)")


def test_certificate_for_another_host_is_bad_gateway(tmp_path, ca, start_registry) -> None:
    registry = start_registry(ca.issue(tmp_path / "certs", "registry", hosts=["registry.other.test"]))
    push_image(tmp_path, registry)
    with metahub_for(tmp_path, registry, trust(tmp_path, ca)) as hub:
        assert_tls_failure(hub, "/v2/team/app/manifests/1",
                           f"upstream private: TLS handshake with https://{registry.host} failed: "
                           "certificate is not valid for 127.0.0.1")


def test_expired_certificate_is_bad_gateway(tmp_path, ca, start_registry) -> None:
    registry = start_registry(ca.issue(tmp_path / "certs", "registry", expired=True))
    push_image(tmp_path, registry)
    with metahub_for(tmp_path, registry, trust(tmp_path, ca)) as hub:
        assert_tls_failure(hub, "/v2/team/app/manifests/1",
                           f"upstream private: TLS handshake with https://{registry.host} failed: "
                           "certificate verify failed (cert has expired)")


def test_blob_redirect_to_a_second_tls_origin_is_verified_with_ca_file(tmp_path, ca, start_registry) -> None:
    """The CDN case: blob downloads are 307s to another https origin, whose certificate the same
    private CA signed; only ca_file can make it trusted, so the pull proves it was used there too."""
    workdir = tmp_path / "registry-0"  # where start_registry puts the first registry's storage
    with CDN(workdir / "storage", *ca.issue(tmp_path / "certs", "cdn")) as cdn:
        registry = start_registry(ca.issue(tmp_path / "certs", "registry"), redirect_blobs_to=cdn.url)
        image = push_image(tmp_path, registry)
        served_before = len(cdn.requests)
        with metahub_for(tmp_path, registry, trust(tmp_path, ca)) as hub:
            assert_pulls(tmp_path, hub, image)
        blob_paths = [r for r in cdn.requests[served_before:] if r.startswith("GET ")]
        for blob in [image.config, *image.layers]:
            assert any(blob.digest.split(":")[1] in path for path in blob_paths), (blob, blob_paths)


def test_blob_redirect_to_an_untrusted_origin_is_bad_gateway(tmp_path, ca, start_registry) -> None:
    """A CDN whose certificate ca_file does not vouch for is refused, by its own origin's name."""
    other = make_ca(tmp_path / "other-pki", "another CA")
    workdir = tmp_path / "registry-0"
    with CDN(workdir / "storage", *other.issue(tmp_path / "certs", "cdn")) as cdn:
        registry = start_registry(ca.issue(tmp_path / "certs", "registry"), redirect_blobs_to=cdn.url)
        image = push_image(tmp_path, registry)
        with metahub_for(tmp_path, registry, trust(tmp_path, ca)) as hub:
            status, body = request(hub.host, "/v2/team/app/manifests/1")
            assert (status, body) == (200, image.manifest)  # the registry itself is trusted
            assert_tls_failure(hub, f"/v2/team/app/blobs/{image.layers[0].digest}",
                               f"upstream private: TLS handshake with {cdn.url} failed: "
                               "certificate verify failed (unable to get issuer cert locally)")


def test_plain_http_server_on_an_https_url_is_bad_gateway(tmp_path) -> None:
    with Registry(tmp_path / "plain") as registry:
        with Metahub(tmp_path / "metahub", {"private": {"url": f"https://{registry.host}"}}) as hub:
            assert_tls_failure(hub, "/v2/team/app/manifests/1",
                               f"upstream private: TLS handshake with https://{registry.host} failed: "
                               "wrong version number")


def test_server_silent_during_the_handshake_is_gateway_timeout(tmp_path) -> None:
    """The kernel accepts the connection, nobody ever answers the ClientHello: 504 at read_timeout."""
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        url = f"https://{LOOPBACK}:{silent.getsockname()[1]}"
        with Metahub(tmp_path / "metahub", {"private": {"url": url, "read_timeout": "2s"}}) as hub:
            started = time.monotonic()
            status, body = request(hub.host, "/v2/team/app/manifests/1")
            assert time.monotonic() - started < PROMPT
            assert (status, error_of(body)) == (504, ("UNAVAILABLE", "upstream private did not answer within 2 s"))
