"""An account's repository patterns hold on every route to a repository: the name as written, a
name prefix, ``?ns=``, blobs, tags and the resolve endpoint (issue 10, item 1)."""
from __future__ import annotations

import base64
import json
from urllib.parse import quote

import pytest

from metahub.web.auth import hash_password
from tests.peers import skopeo
from tests.peers.oci import make_image
from tests.peers.registry import Registry

from .common import ACCEPT_ALL, request
from .metahub_process import Metahub

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One real upstream under two upstream names; ``allowed`` may pull only ``allowed/*`` of the
    default upstream, ``qualified`` only ``trunc/team/*``."""
    root = tmp_path_factory.mktemp("authorization")
    with Registry(root / "upstream") as upstream:
        image = make_image(root / "layout", "1", [10_000])
        for name in ("allowed/img", "team/app"):
            skopeo.push(root / "layout", "1", f"{upstream.host}/{name}:1")
        accounts = {
            "allowed": {"password_hash": hash_password(PASSWORD), "repositories": ["allowed/*"]},
            "qualified": {"password_hash": hash_password(PASSWORD), "repositories": ["trunc/team/*"]},
        }
        upstreams = {"local": {"url": upstream.url}, "trunc": {"url": upstream.url}}
        with Metahub(root / "hub", upstreams, default_upstream="local", anonymous="deny", accounts=accounts) as hub:
            yield hub, image


def get(hub: Metahub, account: str, path: str) -> tuple[int, str | None]:
    login = base64.b64encode(f"{account}:{PASSWORD}".encode()).decode()
    status, _, body = request(hub.host, "GET", path, {"Authorization": f"Basic {login}", "Accept": ACCEPT_ALL})
    code = json.loads(body)["errors"][0]["code"] if status >= 400 else None
    return status, code


def routes(image, name: str, ns: str | None = None) -> list[str]:
    """Every read of repository ``name``: manifest by tag and digest, a blob, the tag list."""
    query = f"?ns={quote(ns)}" if ns else ""
    return [f"/v2/{name}/manifests/1{query}", f"/v2/{name}/manifests/{image.digest}{query}",
            f"/v2/{name}/blobs/{image.layers[0].digest}{query}", f"/v2/{name}/tags/list{query}"]


def test_the_allowed_repository_is_served_on_every_route(world) -> None:
    hub, image = world
    for path in routes(image, "allowed/img"):
        assert get(hub, "allowed", path) == (200, None), path
    assert get(hub, "allowed", "/_metahub/v1/resolve?image=allowed/img:1")[0] == 200


@pytest.mark.parametrize("name, ns", [("trunc/allowed/img", None), ("allowed/img", "trunc")])
def test_another_upstreams_repository_of_the_same_name_is_denied(world, name: str, ns: str | None) -> None:
    hub, image = world
    for path in routes(image, name, ns):
        assert get(hub, "allowed", path) == (403, "DENIED"), path
    assert get(hub, "allowed", "/_metahub/v1/resolve?image=trunc/allowed/img:1") == (403, "DENIED")


def test_an_upstream_qualified_pattern_confines_the_account(world) -> None:
    hub, image = world
    for name, ns in [("trunc/team/app", None), ("team/app", "trunc")]:
        for path in routes(image, name, ns):
            assert get(hub, "qualified", path) == (200, None), path
    for path in routes(image, "team/app"):  # the default upstream's team/app is another repository
        assert get(hub, "qualified", path) == (403, "DENIED"), path
