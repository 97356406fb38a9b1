"""``metahub prefetch``: which blobs it fetches into the store, and the progress it prints.

The upstream is a fake registry behind StubTreq (tests/unit/harness.py); thread work and download
lanes run inline on a fake clock.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from metahub.app import root as root_module
from metahub.app.prefetch import Progress, prefetch, progress_line
from metahub.app.root import Root
from metahub.config.file import Config, parse_config
from metahub.oci import errors, media
from storage import BlobStore
from tests.unit.fakes import FakeReactor, inline_threads, minimal
from tests.unit.harness import (
    FakeRegistry,
    digest_of,
    fake_network,
    image_index,
    image_manifest,
)

AMD64_LAYERS = [b"amd64 layer one" * 100, b"amd64 layer two" * 50]
ARM64_LAYERS = [b"arm64 layer" * 70]
AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def hub() -> FakeRegistry:
    hub = FakeRegistry("hub.test")
    for layer in AMD64_LAYERS + ARM64_LAYERS:
        hub.add_blob("team/app", layer)
    amd64, arm64 = image_manifest(*AMD64_LAYERS), image_manifest(*ARM64_LAYERS)
    hub.add_manifest("team/app", amd64, "amd64")
    hub.add_manifest("team/app", arm64)
    hub.add_manifest("team/app", image_index((amd64, AMD64), (arm64, ARM64)), "multi", media.OCI_INDEX)
    return hub


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch, hub: FakeRegistry) -> Iterator[None]:
    fake_network(monkeypatch, root_module, {"docker.io": hub})
    yield


def config(tmp_path: Path, **extra: Any) -> Config:
    data = minimal(tmp_path) | {
        "upstreams": {"docker.io": {"url": "http://hub.test"}},
        "machine_types": {"pi": {"platform": ARM64}},
    } | extra
    return parse_config(data, str(tmp_path))


def run(cfg: Config, image: str, machine_type: str | None = None, out: io.StringIO | None = None) -> Progress:
    reactor = FakeReactor()
    outcome: list[Any] = []
    root = Root(config=cfg, reactor=reactor)
    inline_threads(root)
    done = Deferred.fromCoroutine(prefetch(root=root, image=image, machine_type=machine_type, out=out or io.StringIO()))
    done.addBoth(outcome.append)
    for _ in range(100):  # a download in progress is polled every 0.2 s
        if outcome:
            break
        reactor.advance(0.2)
    assert outcome, f"prefetch of {image} did not finish"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def stored(cfg: Config) -> set[str]:
    return {found.digest for found in BlobStore(cfg.storage.path).iter_blobs()}


def blob_gets(hub: FakeRegistry) -> int:
    return sum(1 for method, path in hub.requests if method == "GET" and "/blobs/" in path)


def test_the_progress_line_shows_bytes_and_blobs() -> None:
    assert progress_line(Progress(), width=10) == "[##########] 100.0%  0.0/0.0 MiB  0/0 blobs"
    half = Progress(total_bytes=4 << 20, done_bytes=2 << 20, blobs=4, blobs_done=1)
    assert progress_line(half, width=10) == "[#####     ]  50.0%  2.0/4.0 MiB  1/4 blobs"


def test_a_single_platform_image_is_fetched_into_the_store_once(
    tmp_path: Path, network: None, hub: FakeRegistry
) -> None:
    cfg = config(tmp_path)
    out = io.StringIO()
    progress = run(cfg, "team/app:amd64", out=out)
    layers = {digest_of(layer) for layer in AMD64_LAYERS}
    assert layers <= stored(cfg)
    assert (progress.blobs, progress.blobs_done) == (2, 2)
    assert progress.total_bytes == progress.done_bytes == sum(len(layer) for layer in AMD64_LAYERS)
    assert out.getvalue().splitlines()[-1].endswith("100.0%  0.0/0.0 MiB  2/2 blobs")
    assert "\r" not in out.getvalue()  # not a terminal: whole lines only
    assert blob_gets(hub) == 2
    again = run(cfg, "team/app:amd64")  # already in the (shared) store: nothing is fetched
    assert blob_gets(hub) == 2 and again.blobs_done == 2


def test_an_index_without_a_machine_type_fetches_every_build(tmp_path: Path, network: None) -> None:
    cfg = config(tmp_path)
    progress = run(cfg, "team/app:multi")
    assert {digest_of(layer) for layer in AMD64_LAYERS + ARM64_LAYERS} <= stored(cfg)
    assert progress.blobs == 3


def test_a_machine_type_fetches_only_its_build(tmp_path: Path, network: None, hub: FakeRegistry) -> None:
    cfg = config(tmp_path)
    tty = Tty()
    progress = run(cfg, "team/app:multi", "pi", tty)
    assert progress.blobs == 1
    held = stored(cfg)
    assert digest_of(ARM64_LAYERS[0]) in held
    assert not {digest_of(layer) for layer in AMD64_LAYERS} & held
    assert tty.getvalue().startswith("\r[") and tty.getvalue().endswith("1/1 blobs\n")  # one line, redrawn


def test_an_unknown_machine_type_is_refused_before_anything_is_fetched(
    tmp_path: Path, network: None, hub: FakeRegistry
) -> None:
    with pytest.raises(errors.RegistryError) as refused:
        run(config(tmp_path), "team/app:multi", "cray")
    assert "unknown machine type 'cray'" in refused.value.message
    assert hub.requests == []


def test_a_virtual_image_is_fetched_from_its_sources(tmp_path: Path, network: None, hub: FakeRegistry) -> None:
    spec = {"image": "team/bench", "manifests": [{"image": "team/app:amd64", "platform": AMD64}]}
    cfg = config(tmp_path, virtual_images=[spec])
    progress = run(cfg, "team/bench")
    assert {digest_of(layer) for layer in AMD64_LAYERS} <= stored(cfg) and progress.blobs == 2
    assert all("team/bench" not in path for _, path in hub.requests)


def test_a_blob_upstream_does_not_have_fails_the_prefetch(tmp_path: Path, network: None, hub: FakeRegistry) -> None:
    del hub.blobs["team/app"][digest_of(AMD64_LAYERS[1])]
    cfg = config(tmp_path)
    with pytest.raises(errors.RegistryError) as failed:
        run(cfg, "team/app:amd64")
    assert failed.value.code == "BLOB_UNKNOWN"
    assert digest_of(AMD64_LAYERS[0]) in stored(cfg) and digest_of(AMD64_LAYERS[1]) not in stored(cfg)
