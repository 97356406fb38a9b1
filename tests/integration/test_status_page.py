"""The status page in a real browser: headless Chromium loads it from a running metahub in front of
a real docker-registry, after skopeo pulled through it; the DOM holds what /metrics and the store
say, the resolve form gives each machine type's build, and a screenshot is taken."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metahub.oci.sizes import format_size
from metahub.web.auth import hash_password
from tests.peers import chromium, skopeo
from tests.peers.oci import make_bench_index, make_image
from tests.peers.registry import Registry

from .common import EXPECTED, MACHINE_TYPES, request
from .metahub_process import Metahub

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _TextById(HTMLParser):
    """Text inside each element that has an ``id`` (nested elements' text included, each element's
    text set apart by a space, as a table's cells are on screen)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_data(" ")
        if tag in self.VOID:
            return
        element_id = dict(attrs).get("id")
        if element_id:
            self.texts[element_id] = ""
        self._open.append(element_id)

    def handle_endtag(self, tag: str) -> None:
        self.handle_data(" ")
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id:
                self.texts[element_id] += data


def texts(dom: str) -> dict[str, str]:
    parser = _TextById()
    parser.feed(dom)
    return {key: " ".join(value.split()) for key, value in parser.texts.items()}


def metrics(host: str) -> tuple[int, int, int]:
    """Cache hits and misses (all kinds), and blob bytes served from the store, as /metrics says."""
    status, _, body = request(host, "GET", "/metrics")
    assert status == 200
    counts = {"hit": 0, "miss": 0, "cache": 0}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "metahub_cache_lookups_total":
                counts[sample.labels["result"]] += int(sample.value)
            elif sample.name == "metahub_bytes_served_total" and sample.labels["source"] == "cache":
                counts["cache"] += int(sample.value)
    return counts["hit"], counts["miss"], counts["cache"]


def store_blob_count(hub: Metahub) -> int:
    return sum(1 for path in (hub.workdir / "store" / "blobs" / "sha256").glob("*/*") if path.is_file())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("status-upstream")
    with Registry(root / "registry") as registry:
        make_image(root / "app", "1.0", [120_000])
        skopeo.push(root / "app", "1.0", f"{registry.host}/team/app:1.0")
        index = make_bench_index(root / "bench", "1.0", layers=[10_000])
        skopeo.push(root / "bench", "1.0", f"{registry.host}/team/bench:1.0")
        yield registry, index


def test_chromium_shows_the_figures_the_metrics_say(tmp_path, upstream) -> None:
    registry, index = upstream
    with Metahub(tmp_path / "hub", {"local": {"url": registry.url}}, default_upstream="local",
                 storage={"path": str(tmp_path / "hub" / "store"), "index": str(tmp_path / "hub" / "index"),
                          "max_size": "1GiB"},
                 machine_types=MACHINE_TYPES) as hub:
        for attempt in range(2):  # the first pull fills the store, the second is served from it
            skopeo.copy_to_dir(f"{hub.host}/team/app:1.0", tmp_path / f"pull-{attempt}")
        hits, misses, from_store = metrics(hub.host)
        assert hits > 0 and misses > 0 and from_store > 120_000

        page = texts(chromium.dump_dom(f"http://{hub.host}/"))
        assert (page["hits"], page["misses"]) == (str(hits), str(misses))
        assert page["hit-ratio"] == f"{100 * hits / (hits + misses):.1f}%"
        assert page["blob-count"] == str(store_blob_count(hub)) != "0"
        assert "of 1GiB" in page["size"]
        assert page["bytes-saved"].startswith(f"{format_size(from_store)} served from the store")
        assert page["version"] == "0.1.0"
        assert str(hub.port) in page["listen"]
        assert page["store-path"] == str(tmp_path / "hub" / "store")
        assert page["shared"] == "no other live node"
        assert "local/team/app 2" in page["store"]  # two pulls of one platform each
        assert re.search(rf"local \(default\) {re.escape(registry.url)} \d{{4}}-\d\d-\d\d \S+ UTC \(\d+s ago\) none$",
                         page["upstreams"]), page["upstreams"]
        assert "cpu:broadwell, nvcap:5.2" in page["machine-types"]

        # The form: each machine type's build, as the resolve report says and a pull would get.
        report = texts(chromium.dump_dom(f"http://{hub.host}/_metahub/?image=team/bench:1.0"))
        assert index.digest in report["resolved"]
        table = report["resolve"]
        for machine_type, position in EXPECTED.items():
            assert f"{machine_type} {index.images[position].digest}" in table
        assert "power none" in table

        hostile = chromium.dump_dom(f"http://{hub.host}/_metahub/?image={quote('<script>alert(1)</script>')}")
        assert "<script" not in hostile
        assert texts(hostile)["resolve-error"].startswith("NAME_INVALID: '<script>alert(1)</script>'")

        png = chromium.screenshot(f"http://{hub.host}/", tmp_path / "status.png")
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_under_anonymous_deny_the_page_asks_for_a_login(tmp_path, upstream) -> None:
    registry, _ = upstream
    accounts = {"ops": {"password_hash": hash_password("s3cret"), "machine_types": ["type1", "arm"]}}
    with Metahub(tmp_path / "hub", {"local": {"url": registry.url}}, default_upstream="local",
                 anonymous="deny", machine_types=MACHINE_TYPES, accounts=accounts) as hub:
        status, headers, _ = request(hub.host, "GET", "/")
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="metahub"'
        # The registry API keeps its token challenge: only the page speaks Basic to browsers.
        assert request(hub.host, "GET", "/v2/")[1]["www-authenticate"].startswith("Bearer ")

        assert "blob-count" not in chromium.dump_dom(f"http://{hub.host}/")
        assert "blob-count" not in chromium.dump_dom(f"http://ops:wrong@{hub.host}/")
        page = texts(chromium.dump_dom(f"http://ops:s3cret@{hub.host}/"))
        assert page["blob-count"] == "0"
        assert "type1 linux/amd64 cpu:broadwell compatible ops" in page["machine-types"]  # the default match
        assert "power linux/ppc64le none compatible no account" in page["machine-types"]
        assert "scrypt" not in str(page)
        report = texts(chromium.dump_dom(f"http://ops-arm:s3cret@{hub.host}/_metahub/?image=team/bench:1.0"))
        assert "arm " in report["resolve"]
