"""The Docker engine (dockerd 20.10) pulling through metahub: as Docker Hub's mirror, and by name
with a machine-type login, the seed's own story with the real engine."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from metahub.web.auth import hash_password
from storage import sha256_digest
from tests.peers import skopeo
from tests.peers.dockerd import Dockerd
from tests.peers.oci import ImageIndex, make_bench_index, make_image
from tests.peers.process import PeerError
from tests.peers.registry import Registry

from .common import BROADWELL, MACHINE_TYPES, PASSWORD, SKYLAKE
from .metahub_process import Metahub

ACCOUNT = "qnib"
Upstream = tuple[Registry, ImageIndex, Path]


def store_holds(hub: Metahub, digest: str) -> bool:
    hex_ = digest.split(":")[1]
    return (hub.workdir / "store" / "blobs" / "sha256" / hex_[:2] / hex_).is_file()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A plain upstream holding the bench index (team/bench:1.0) and a Docker Hub style
    single-platform image (library/hello:1.0)."""
    root = tmp_path_factory.mktemp("dockerd")
    with Registry(root / "upstream") as registry:
        index = make_bench_index(root / "bench", "1.0", layers=[20_000])
        skopeo.push(root / "bench", "1.0", f"{registry.host}/team/bench:1.0")
        make_image(root / "hello", "1.0", [b"hello from upstream\n"])
        skopeo.push(root / "hello", "1.0", f"{registry.host}/library/hello:1.0")
        yield registry, index, root


@pytest.fixture(scope="module")
def hub(upstream: Upstream) -> Iterator[Metahub]:
    """metahub with accounts and anonymous pulls denied, as a site with machine types runs it."""
    registry, _, root = upstream
    accounts = {ACCOUNT: {"password_hash": hash_password(PASSWORD), "machine_types": list(MACHINE_TYPES)}}
    with Metahub(root / "hub", {"local": {"url": registry.url}}, default_upstream="local",
                 anonymous="deny", machine_types=MACHINE_TYPES, accounts=accounts) as running:
        yield running


def test_dockerd_uses_metahub_as_its_docker_hub_mirror(tmp_path: Path, upstream: Upstream) -> None:
    """The image exists only upstream of metahub (Docker Hub, dockerd's fallback, has no such image
    and is out of reach here anyway); metahub's store and access log show the pull came through."""
    registry, _, _ = upstream
    hello = sha256_digest(skopeo.inspect_raw(f"{registry.host}/library/hello:1.0"))
    with Metahub(tmp_path / "mirror", {"local": {"url": registry.url}}, default_upstream="local") as mirror, \
            Dockerd(tmp_path / "dockerd", registry_mirrors=[mirror.url],
                    insecure_registries=[mirror.host]) as engine:
        image = engine.pull("hello:1.0")  # docker.io/library/hello: only the mirror can have it
        assert image.digests() == {hello}
        manifest = skopeo.inspect_raw(f"{registry.host}/library/hello@{hello}")
        assert store_holds(mirror, hello)
        for layer in json.loads(manifest)["layers"]:
            assert store_holds(mirror, layer["digest"])
        assert "/v2/library/hello/manifests/1.0" in mirror.log()


def test_dockerd_logged_in_as_two_machine_types_in_a_row(tmp_path: Path, upstream: Upstream, hub: Metahub) -> None:
    _, index, _ = upstream
    ref = f"{hub.host}/team/bench:1.0"
    with Dockerd(tmp_path / "dockerd") as engine:
        for machine_type, build in [("type1", BROADWELL), ("type2", SKYLAKE)]:
            engine.login(hub.host, f"{ACCOUNT}-{machine_type}", PASSWORD)
            image = engine.pull(ref)
            assert image.digests() == {index.images[build].digest}, machine_type


def test_dockerd_login_with_a_wrong_password_fails(tmp_path: Path, hub: Metahub) -> None:
    with Dockerd(tmp_path / "dockerd") as engine:
        # The daemon passes on metahub's own OCI error message.
        with pytest.raises(PeerError, match="unauthorized: incorrect username or password"):
            engine.login(hub.host, f"{ACCOUNT}-type1", "not the password")
    assert "not the password" not in hub.log()


def test_dockerd_after_logout_is_denied_with_metahub_s_message(tmp_path: Path, upstream: Upstream, hub: Metahub) -> None:
    _, index, _ = upstream
    ref = f"{hub.host}/team/bench:1.0"
    with Dockerd(tmp_path / "dockerd") as engine:
        engine.login(hub.host, f"{ACCOUNT}-type2", PASSWORD)
        assert engine.pull(ref).digests() == {index.images[SKYLAKE].digest}
        engine.logout(hub.host)
        # dockerd asks with HEAD, so all it can repeat of metahub's answer is the 401 itself.
        with pytest.raises(PeerError, match="/v2/team/bench/manifests/1.0\": unauthorized"):
            engine.pull(ref)
