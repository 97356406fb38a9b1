"""Which names an account's repository patterns are checked against: the routed repository's."""
from __future__ import annotations

from metahub.cache.routing import route, spellings
from metahub.config.file import parse_config


def config(tmp_path, default: str = "local"):  # type: ignore[no-untyped-def]
    return parse_config({
        "storage": {"path": str(tmp_path / "s"), "index": str(tmp_path / "i")},
        "upstreams": {"local": {"url": "http://127.0.0.1:5001"}, "trunc": {"url": "http://127.0.0.1:5002"},
                      "docker.io": {"url": "https://registry-1.docker.io"}},
        "default_upstream": default,
    }, str(tmp_path))


def test_a_name_routed_elsewhere_by_ns_is_spelled_with_its_upstream(tmp_path) -> None:
    c = config(tmp_path)
    assert spellings(c, route(c, "allowed/img")) == ("local/allowed/img", "allowed/img")
    # The name as written says "allowed/img", but it goes to trunc: only trunc's spelling counts.
    assert spellings(c, route(c, "allowed/img", "trunc")) == ("trunc/allowed/img",)
    assert spellings(c, route(c, "trunc/allowed/img")) == ("trunc/allowed/img",)
    assert spellings(c, route(c, "allowed/img", "127.0.0.1:5002")) == ("trunc/allowed/img",)


def test_docker_hub_official_images_on_the_default_upstream(tmp_path) -> None:
    c = config(tmp_path, default="docker.io")
    assert spellings(c, route(c, "alpine")) == ("docker.io/library/alpine", "library/alpine", "alpine")
    assert spellings(c, route(c, "docker.io/alpine")) == ("docker.io/library/alpine", "library/alpine", "alpine")
    assert spellings(c, route(c, "alpine", "docker.io")) == ("docker.io/library/alpine", "library/alpine", "alpine")
