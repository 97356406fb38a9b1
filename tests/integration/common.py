"""What several integration tests share: a plain HTTP request to metahub, the Accept header of
a client that takes every manifest type, where docker-registry keeps a blob, the machine types
of the bench image (tests/peers/oci.make_bench_index), and what descriptors a metahub process holds. Test modules import these from here, never
from each other."""
from __future__ import annotations

import http.client
import os
import time
from pathlib import Path

from tests.peers.oci import INDEX, MANIFEST
from tests.peers.registry import Registry

from .metahub_process import Metahub

ACCEPT_ALL = ", ".join(
    [INDEX, MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json",
     "application/vnd.docker.distribution.manifest.v2+json"]
)


def request(host: str, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    address, port = host.split(":")
    connection = http.client.HTTPConnection(address, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def upstream_blob_path(registry: Registry, digest: str) -> Path:
    hex_ = digest.split(":")[1]
    return registry.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


#: The password of every account the machine-type tests configure.
PASSWORD = "correct horse"
MACHINE_TYPES = {
    "type1": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:broadwell"]},
    "type2": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:skylake"]},
    "gpu": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:broadwell", "nvcap:5.2"]},
    "zen": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:zen4"]},
    "arm": {"platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    "power": {"platform": {"os": "linux", "architecture": "ppc64le"}},
}
# Index entries of make_bench_index, in order.
GENERIC, SKYLAKE, BROADWELL, BROADWELL_NVCAP, ARM64 = range(5)
EXPECTED = {"type1": BROADWELL, "type2": SKYLAKE, "gpu": BROADWELL_NVCAP, "zen": GENERIC, "arm": ARM64}
SOURCE_TAGS = ["generic", "cpu-skylake", "cpu-broadwell", "cpu-broadwell-nvcap"]


def pid_of(hub: Metahub) -> int:
    return hub._daemon.process.pid  # twistd --nodaemon: the process is metahub itself


def descriptors(hub: Metahub) -> list[str]:
    """Where each open descriptor of the metahub process points."""
    fd_dir = f"/proc/{pid_of(hub)}/fd"
    targets = []
    for name in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(os.path.join(fd_dir, name)))
        except FileNotFoundError:  # closed while we looked
            pass
    return targets


def settle(hub: Metahub, at_most: int, timeout: float = 10.0) -> int:
    """The process's descriptor count once it is at most ``at_most`` (or the last seen, on timeout):
    closing sockets the client already left takes the server a moment."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(descriptors(hub))
        if count <= at_most or time.monotonic() > deadline:
            return count
        time.sleep(0.1)
