"""Fixtures for real peer programs (see tests/peers): each one is stopped when its test ends,
pass or fail, and lives in that test's own temporary directory."""
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.peers.containerd import Containerd
from tests.peers.registry import Auth, Registry
from tests.peers.relay import Relay

RegistryFactory = Callable[..., Registry]


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Start docker-registries on demand: ``registry_factory(auth="token", proxy_of=url)``."""
    started: list[Registry] = []

    def start(auth: Auth = None, proxy_of: str | None = None, **options: str) -> Registry:
        registry = Registry(tmp_path / f"registry-{len(started)}", auth=auth, proxy_of=proxy_of,
                            **options)
        started.append(registry)
        return registry

    yield start
    for registry in reversed(started):
        registry.stop()


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> Registry:
    """A plain docker-registry without auth."""
    return registry_factory()


@pytest.fixture
def relay_factory() -> Iterator[Callable[[str], Relay]]:
    """Start counting relays on demand: ``relay_factory(registry.host)``."""
    started: list[Relay] = []

    def start(target: str) -> Relay:
        started.append(Relay(target))
        return started[-1]

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A private containerd daemon; per test, so no test sees content an earlier one pulled."""
    with Containerd(tmp_path / "containerd") as daemon:
        yield daemon


@pytest.fixture
def layout_dir(tmp_path: Path) -> Path:
    """Where a test builds its OCI image layout (see tests/peers/oci.py)."""
    return tmp_path / "layout"
