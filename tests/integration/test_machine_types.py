"""Machine-type logins against real clients: one image name, the right build for each login."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from metahub.web.auth import hash_password
from storage import sha256_digest
from tests.peers import containerd, podman, skopeo
from tests.peers.oci import build_text, make_bench_index, make_image
from tests.peers.registry import Registry

from .common import (
    ACCEPT_ALL,
    ARM64,
    BROADWELL,
    BROADWELL_NVCAP,
    EXPECTED,
    GENERIC,
    MACHINE_TYPES,
    PASSWORD,
    SKYLAKE,
    SOURCE_TAGS,
    request,
)
from .metahub_process import Metahub


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An upstream holding the seed's bench index, and metahub in front with accounts."""
    root = tmp_path_factory.mktemp("machine-types")
    with Registry(root / "upstream") as upstream:
        index = make_bench_index(root / "layout", "1.0", layers=[50_000])
        skopeo.push(root / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
        skopeo.push(root / "layout", "1.0", f"{upstream.host}/other/bench:1.0")
        # The seed's way: four separately pushed tags, listed by a virtual image.
        for tag, image in zip(SOURCE_TAGS, index.images):
            make_image(root / tag, tag, [50_000], image.platform, {"build.txt": build_text(image.platform)})
            skopeo.push(root / tag, tag, f"{upstream.host}/team/featuretest:{tag}")
        virtual = [{"image": "team/vbench", "manifests": [
            {"image": f"team/featuretest:{tag}", "platform": dict(image.platform)}
            for tag, image in zip(SOURCE_TAGS, index.images)]}]
        accounts = {
            "qnib": {"password_hash": hash_password(PASSWORD), "machine_types": list(MACHINE_TYPES)},
            "limited": {"password_hash": hash_password(PASSWORD), "machine_types": ["type1"],
                        "repositories": ["team/**"]},
        }
        with Metahub(root / "hub", {"local": {"url": upstream.url}}, anonymous="deny",
                     machine_types=MACHINE_TYPES, accounts=accounts, virtual_images=virtual) as hub:
            yield upstream, hub, index, root


def creds(login: str) -> str:
    return f"{login}:{PASSWORD}"


def basic(login: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}


@pytest.mark.parametrize("machine_type", sorted(EXPECTED))
def test_skopeo_gets_the_build_for_its_machine_type(world, machine_type: str) -> None:
    upstream, hub, index, _ = world
    chosen = index.images[EXPECTED[machine_type]]
    raw = skopeo.inspect_raw(f"{hub.host}/team/bench:1.0", creds=creds(f"qnib-{machine_type}"))
    assert raw == chosen.manifest
    # The digest it got pulls by digest through metahub and straight from upstream.
    assert skopeo.inspect_raw(f"{hub.host}/team/bench@{chosen.digest}", creds=creds(f"qnib-{machine_type}")) == raw
    assert skopeo.inspect_raw(f"{upstream.host}/team/bench@{sha256_digest(raw)}") == raw


def test_a_login_without_machine_type_sees_the_index(world) -> None:
    _, hub, index, _ = world
    assert skopeo.inspect_raw(f"{hub.host}/team/bench:1.0", creds=creds("qnib")) == index.manifest


def test_head_agrees_with_get_for_a_resolved_tag(world) -> None:
    _, hub, index, _ = world
    path = "/v2/team/bench/manifests/1.0"
    status, got, body = request(hub.host, "GET", path, {"Accept": ACCEPT_ALL, **basic("qnib-type2")})
    assert status == 200 and body == index.images[SKYLAKE].manifest
    assert got["docker-content-digest"] == index.images[SKYLAKE].digest
    status, head, head_body = request(hub.host, "HEAD", path, {"Accept": ACCEPT_ALL, **basic("qnib-type2")})
    assert (status, head_body) == (200, b"")
    for header in ("content-type", "content-length", "docker-content-digest"):
        assert head[header] == got[header]


def test_a_pull_by_digest_is_never_rewritten(world) -> None:
    _, hub, index, _ = world
    status, headers, body = request(hub.host, "GET", f"/v2/team/bench/manifests/{index.digest}",
                                    {"Accept": ACCEPT_ALL, **basic("qnib-type1")})
    assert status == 200 and body == index.manifest


def test_podman_logged_in_per_machine_type(world) -> None:
    _, hub, index, root = world
    ref = f"{hub.host}/team/bench:1.0"
    for machine_type in ("type1", "type2"):
        store = root / f"podman-{machine_type}"
        podman.pull(ref, store, creds=creds(f"qnib-{machine_type}"))
        platform = index.images[EXPECTED[machine_type]].platform
        assert podman.read_file(ref, store, "build.txt") == build_text(platform)


def test_containerd_logged_in_per_machine_type(world) -> None:
    _, hub, index, root = world
    with containerd.Containerd(root / "containerd") as daemon:
        ref = f"{hub.host}/team/bench:1.0"
        containerd.ctr_pull(daemon.address, ref, user=creds("qnib-gpu"))
        assert containerd.image_digest(daemon.address, ref) == index.images[BROADWELL_NVCAP].digest


@pytest.mark.parametrize(
    "login, password, status, code",
    [
        ("qnib-type1", "wrong", 401, "UNAUTHORIZED"),
        ("nobody-type1", PASSWORD, 401, "UNAUTHORIZED"),
        ("qnib-nosuchtype", PASSWORD, 401, "UNAUTHORIZED"),
        ("limited-type2", PASSWORD, 401, "UNAUTHORIZED"),  # type not allowed for the account
    ],
)
def test_bad_logins(world, login: str, password: str, status: int, code: str) -> None:
    _, hub, _, _ = world
    for path in ("/token?service=metahub&scope=repository:team/bench:pull", "/v2/team/bench/manifests/1.0"):
        got_status, headers, body = request(hub.host, "GET", path, basic(login, password))
        assert got_status == status, (path, body)
        assert json.loads(body)["errors"][0]["code"] == code
        assert PASSWORD not in body.decode()
    assert PASSWORD not in hub.log()


def test_anonymous_is_denied_with_a_challenge(world) -> None:
    _, hub, _, _ = world
    for path in ("/v2/", "/v2/team/bench/manifests/1.0", "/token?service=metahub"):
        status, headers, body = request(hub.host, "GET", path)
        assert status == 401, path
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        assert "www-authenticate" in headers
    assert request(hub.host, "GET", "/v2/")[1]["www-authenticate"].startswith('Bearer realm="http://')


def test_token_flow_and_repository_patterns(world) -> None:
    _, hub, index, _ = world
    status, _, body = request(hub.host, "GET", "/token?service=metahub", basic("limited-type1"))
    assert status == 200
    token = json.loads(body)["token"]
    assert PASSWORD not in token
    bearer = {"Authorization": f"Bearer {token}", "Accept": ACCEPT_ALL}
    status, _, body = request(hub.host, "GET", "/v2/team/bench/manifests/1.0", bearer)
    assert status == 200 and body == index.images[BROADWELL].manifest
    status, _, body = request(hub.host, "GET", "/v2/other/bench/manifests/1.0", bearer)
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    status, _, _ = request(hub.host, "GET", "/v2/team/bench/manifests/1.0", {"Authorization": "Bearer x.y"})
    assert status == 401
    # containerd's OAuth2 password grant.
    form = f"grant_type=password&username=qnib-type2&password={PASSWORD.replace(' ', '+')}&service=metahub"
    status, _, body = request(hub.host, "POST", "/token", {"Content-Type": "application/x-www-form-urlencoded"},
                              form.encode())
    assert status == 200 and json.loads(body)["access_token"]


def test_no_matching_build_is_manifest_unknown_naming_the_type(world) -> None:
    _, hub, _, _ = world
    status, _, body = request(hub.host, "GET", "/v2/team/bench/manifests/1.0", basic("qnib-power"))
    assert status == 404
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "power" in error["message"] and "cpu:skylake" in error["message"]


def test_virtual_image_resolves_like_an_upstream_index(world) -> None:
    upstream, hub, _, root = world
    for machine_type, build in [("type1", BROADWELL), ("type2", SKYLAKE), ("gpu", BROADWELL_NVCAP), ("zen", GENERIC)]:
        source = skopeo.inspect_raw(f"{upstream.host}/team/featuretest:{SOURCE_TAGS[build]}")
        got = skopeo.inspect_raw(f"{hub.host}/team/vbench", creds=creds(f"qnib-{machine_type}"))
        assert got == source, machine_type
        # Its digest pulls through metahub under the virtual name, and upstream under the source name.
        assert skopeo.inspect_raw(f"{hub.host}/team/vbench@{sha256_digest(got)}", creds=creds("qnib")) == got
    store = root / "podman-virtual"
    podman.pull(f"{hub.host}/team/vbench:latest", store, creds=creds("qnib-type2"))
    platform = {"os": "linux", "architecture": "amd64", "features": ["cpu:skylake"]}
    assert podman.read_file(f"{hub.host}/team/vbench:latest", store, "build.txt") == build_text(platform)
    # Without a machine type the login sees the index metahub built over the four tags.
    index = json.loads(skopeo.inspect_raw(f"{hub.host}/team/vbench", creds=creds("qnib")))
    assert [m["platform"].get("features") for m in index["manifests"]] == [
        None, ["cpu:skylake"], ["cpu:broadwell"], ["cpu:broadwell", "nvcap:5.2"]]


def test_inspect_and_the_resolve_endpoint_agree_with_the_pulls(world) -> None:
    import subprocess
    import sys

    _, hub, index, _ = world
    metahub_cli = Path(sys.executable).with_name("metahub")
    for image in ("team/bench:1.0", "team/vbench"):
        result = subprocess.run([metahub_cli, "inspect", "--json", "--config", hub.config_path, image],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        cli = json.loads(result.stdout)
        status, _, body = request(hub.host, "GET", f"/_metahub/v1/resolve?image={image}", basic("qnib"))
        assert status == 200
        assert json.loads(body) == cli
        for machine_type, expected in EXPECTED.items():
            if image == "team/vbench" and expected == ARM64:
                continue  # the virtual image lists no arm64 build
            pulled = skopeo.inspect_raw(f"{hub.host}/{image}", creds=creds(f"qnib-{machine_type}"))
            assert cli["machine_types"][machine_type]["digest"] == sha256_digest(pulled), (image, machine_type)
        assert cli["machine_types"]["power"]["digest"] is None
    table = subprocess.run([metahub_cli, "inspect", "--config", hub.config_path, "team/bench:1.0"],
                           capture_output=True, text=True, timeout=120).stdout
    assert index.images[BROADWELL].digest in table and "cpu:broadwell" in table and "type1" in table
    # Anonymous callers are refused; a missing image is one clear line from the CLI.
    assert request(hub.host, "GET", "/_metahub/v1/resolve?image=team/bench:1.0")[0] == 401
    missing = subprocess.run([metahub_cli, "inspect", "--config", hub.config_path, "team/nothing:1"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "MANIFEST_UNKNOWN" in missing.stderr and "Traceback" not in missing.stderr
