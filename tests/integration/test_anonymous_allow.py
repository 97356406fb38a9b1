"""``anonymous: allow`` beside accounts: every client, logged in or not, gets what its login says.

containerd never pings ``/v2/``: it sends its first HEAD without credentials and sends the login it
holds only when challenged. So when accounts exist, every request without credentials is challenged
(as Docker Hub does) and anonymous clients fetch an anonymous token from the realm; were a request
without credentials answered directly, a machine-type login would silently get the whole index.
"""
from __future__ import annotations

import json

import pytest

from metahub.web.auth import hash_password
from tests.peers import containerd, podman, skopeo
from tests.peers.dockerd import Dockerd
from tests.peers.oci import build_text, make_bench_index
from tests.peers.process import PeerError
from tests.peers.registry import Registry

from .common import ACCEPT_ALL, request
from .metahub_process import Metahub

PASSWORD = "correct horse"
MACHINE_TYPES = {
    "type2": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:skylake"]},
    "gpu": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:broadwell", "nvcap:5.2"]},
}
# Index entries of make_bench_index, in order.
GENERIC, SKYLAKE, BROADWELL, BROADWELL_NVCAP, ARM64 = range(5)
EXPECTED = {"type2": SKYLAKE, "gpu": BROADWELL_NVCAP}


@pytest.fixture(scope="module", params=["allow", "deny"])
def world(request, tmp_path_factory):
    """An upstream holding the bench index; metahub in front with an account, anonymous allowed or not."""
    anonymous = request.param
    root = tmp_path_factory.mktemp(f"anonymous-{anonymous}")
    with Registry(root / "upstream") as upstream:
        index = make_bench_index(root / "layout", "1.0", layers=[30_000])
        skopeo.push(root / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
        accounts = {"qnib": {"password_hash": hash_password(PASSWORD), "machine_types": list(MACHINE_TYPES)}}
        with Metahub(root / "hub", {"local": {"url": upstream.url}}, anonymous=anonymous,
                     machine_types=MACHINE_TYPES, accounts=accounts) as hub:
            yield anonymous, hub, index, root


def creds(login: str) -> str:
    return f"{login}:{PASSWORD}"


def test_a_request_without_credentials_is_challenged_with_the_token_realm(world) -> None:
    anonymous, hub, index, _ = world
    for method in ("GET", "HEAD"):
        status, headers, _ = request(hub.host, method, "/v2/team/bench/manifests/1.0", {"Accept": ACCEPT_ALL})
        assert status == 401, method
        assert headers["www-authenticate"].startswith('Bearer realm="http://'), method
    status, _, body = request(hub.host, "GET", "/token?service=metahub&scope=repository:team/bench:pull")
    if anonymous == "deny":
        assert status == 401
        return
    # Allowed: the realm hands out an anonymous token, which sees the index untouched.
    assert status == 200
    bearer = {"Authorization": "Bearer " + json.loads(body)["token"], "Accept": ACCEPT_ALL}
    status, _, body = request(hub.host, "GET", "/v2/team/bench/manifests/1.0", bearer)
    assert (status, body) == (200, index.manifest)


def test_containerd_with_a_login_gets_its_build_and_without_one_the_index(world) -> None:
    anonymous, hub, index, root = world
    ref = f"{hub.host}/team/bench:1.0"
    with containerd.Containerd(root / f"containerd-{anonymous}") as daemon:
        containerd.ctr_pull(daemon.address, ref, user=creds("qnib-gpu"))
        assert containerd.image_digest(daemon.address, ref) == index.images[BROADWELL_NVCAP].digest
        containerd.ctr(daemon.address, "images", "rm", ref)
        if anonymous == "deny":
            with pytest.raises(PeerError, match="401|nauthorized"):
                containerd.ctr_pull(daemon.address, ref)
        else:
            containerd.ctr_pull(daemon.address, ref)
            assert containerd.image_digest(daemon.address, ref) == index.digest


def test_skopeo_with_and_without_a_login(world) -> None:
    anonymous, hub, index, _ = world
    ref = f"{hub.host}/team/bench:1.0"
    for machine_type, build in EXPECTED.items():
        assert skopeo.inspect_raw(ref, creds=creds(f"qnib-{machine_type}")) == index.images[build].manifest
    if anonymous == "deny":
        with pytest.raises(PeerError, match="401|nauthorized|authentication required"):
            skopeo.inspect_raw(ref)
    else:
        assert skopeo.inspect_raw(ref) == index.manifest


def test_podman_with_and_without_a_login(world) -> None:
    anonymous, hub, index, root = world
    ref = f"{hub.host}/team/bench:1.0"
    store = root / f"podman-{anonymous}-gpu"
    podman.pull(ref, store, creds=creds("qnib-gpu"))
    assert podman.read_file(ref, store, "build.txt") == build_text(index.images[BROADWELL_NVCAP].platform)
    store = root / f"podman-{anonymous}-none"
    if anonymous == "deny":
        with pytest.raises(PeerError, match="401|nauthorized|authentication required"):
            podman.pull(ref, store)
    else:
        # Without a login podman picks from the untouched index by platform, as from any registry.
        pulled = podman.pull(ref, store)
        assert pulled.digest == index.digest


def test_dockerd_with_and_without_a_login(world) -> None:
    anonymous, hub, index, root = world
    ref = f"{hub.host}/team/bench:1.0"
    with Dockerd(root / f"dockerd-{anonymous}") as engine:
        engine.login(hub.host, "qnib-gpu", PASSWORD)
        assert engine.pull(ref).digests() == {index.images[BROADWELL_NVCAP].digest}
        engine.logout(hub.host)
        engine.docker("image", "rm", ref)
        if anonymous == "deny":
            with pytest.raises(PeerError, match="unauthorized"):
                engine.pull(ref)
        else:
            assert engine.pull(ref).digests() == {index.digest}
