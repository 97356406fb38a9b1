"""Several metahub nodes on one shared store directory, against a real docker-registry upstream."""
from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import sha256_digest
from tests.peers import skopeo
from tests.peers.oci import make_image
from tests.peers.registry import Registry
from tests.peers.relay import Relay
from tests.peers.sshfs import SshfsMount
from tests.store_checks import assert_store_sound

from .common import request, upstream_blob_path
from .metahub_process import Metahub

METAHUB_CLI = Path(sys.executable).with_name("metahub")


def start_nodes(root: Path, shared: Path, relay: Relay, count: int = 3, storage: dict | None = None,
                **config) -> list[Metahub]:
    """``count`` nodes on one store: each with its own index and port, all behind one relay."""
    upstreams = {"local": {"url": relay.url, "read_timeout": "3s"}}
    common = {"path": str(shared), "lease_timeout": "2s", **(storage or {})}
    return [Metahub(root / f"node{n}", upstreams, storage={**common, "index": str(root / f"node{n}" / "index")},
                    **config) for n in range(count)]


def committed(blobs: Path, digest: str, timeout: float = 10.0) -> Path:
    """The blob's file once it is in place. A client's pull ends as soon as the bytes verified;
    the fsync and rename into the store follow a moment later."""
    path = blobs / digest[7:9] / digest[7:]
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{digest} never reached the store"
        time.sleep(0.02)
    return path


@pytest.fixture
def cluster(tmp_path):
    with Registry(tmp_path / "upstream") as upstream, Relay(upstream.url) as relay:
        nodes = start_nodes(tmp_path, tmp_path / "shared", relay)
        try:
            yield upstream, relay, nodes, tmp_path
        finally:
            for node in nodes:
                node.stop()


def push_blob(tmp_path: Path, upstream: Registry, name: str, size: int) -> str:
    image = make_image(tmp_path / name.replace("/", "_"), "v1", layers=[size])
    skopeo.push(tmp_path / name.replace("/", "_"), "v1", f"{upstream.host}/{name}:v1")
    return image.layers[0].digest


def fetch_all(jobs: list[tuple[str, str]]) -> list[tuple[int, str] | Exception]:
    results: list[tuple[int, str] | Exception] = [None] * len(jobs)  # type: ignore[list-item]

    def fetch(i: int, host: str, path: str) -> None:
        try:
            status, _, body = request(host, "GET", path)
            results[i] = (status, sha256_digest(body))
        except (http.client.HTTPException, ConnectionError) as error:
            results[i] = error

    threads = [threading.Thread(target=fetch, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return results


def test_thirty_clients_on_three_nodes_cause_one_upstream_fetch(cluster) -> None:
    upstream, relay, nodes, tmp_path = cluster
    digest = push_blob(tmp_path, upstream, "team/big", 60 << 20)
    relay.reset()
    jobs = [(nodes[i % 3].host, f"/v2/team/big/blobs/{digest}") for i in range(30)]
    assert fetch_all(jobs) == [(200, digest)] * 30
    assert relay.blob_gets("team/big", digest) == 1
    assert relay.bytes_by_path[f"/v2/team/big/blobs/{digest}"] == upstream_blob_path(upstream, digest).stat().st_size
    # Committed once, served from the shared store by every node afterwards.
    relay.reset()
    assert fetch_all([(node.host, f"/v2/team/big/blobs/{digest}") for node in nodes]) == [(200, digest)] * 3
    assert relay.blob_gets("team/big", digest) == 0
    assert_store_sound(tmp_path / "shared")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_killing_the_lease_holder_mid_download(cluster) -> None:
    """Clients that other nodes serve from a dead holder's file see one slow response, no error."""
    upstream, relay, nodes, tmp_path = cluster
    digest = push_blob(tmp_path, upstream, "team/slow", 30 << 20)
    relay.reset()
    relay.rate = 10 << 20  # 3 s for the blob: time to kill the node that fetches it
    path = f"/v2/team/slow/blobs/{digest}"
    holder = threading.Thread(target=fetch_all, args=([(nodes[0].host, path)],))
    holder.start()
    lease = tmp_path / "shared" / "leases" / f"{digest[7:]}.lease"
    wait_for(lease.exists, 10, "node 0 never took the download lease")
    followers: list = []
    watcher = threading.Thread(target=lambda: followers.extend(
        fetch_all([(nodes[1 + i % 2].host, path) for i in range(6)])))
    watcher.start()
    time.sleep(0.8)
    os.killpg(nodes[0]._daemon.process.pid, signal.SIGKILL)  # no goodbye: lease and temp file stay
    killed = time.monotonic()
    watcher.join(120)
    took = time.monotonic() - killed
    holder.join(30)
    relay.rate = None
    # Every client on a surviving node got the whole, verified blob: the survivors noticed the
    # lease going stale themselves, one took it over and fetched again, and the responses went on.
    assert followers == [(200, digest)] * 6
    # lease_timeout (2 s) + the whole blob again (3 s) + polls and slack
    assert took < 2 + 3 + 4, f"the followers took {took:.1f} s after the kill"
    assert relay.blob_gets("team/slow", digest) == 2  # the dead holder's fetch and one takeover
    for node in nodes[1:]:
        log = node.log()
        assert "aborting a response" not in log and "Unhandled" not in log and "Traceback" not in log
    assert any("goes on from another source" in node.log() for node in nodes[1:])
    assert_store_sound(tmp_path / "shared")
    wait_for(lambda: not os.listdir(tmp_path / "shared" / "tmp"), 10, "a temp file was left behind")
    assert not list((tmp_path / "shared" / "leases").glob("*.lease"))
    assert fetch_all([(nodes[1].host, path), (nodes[2].host, path)]) == [(200, digest)] * 2
    assert relay.blob_gets("team/slow", digest) == 2


def test_a_tag_resolved_by_one_node_is_served_by_another_when_upstream_is_down(cluster) -> None:
    upstream, relay, nodes, tmp_path = cluster
    image = make_image(tmp_path / "t", "v1", layers=[b"tagged"])
    skopeo.push(tmp_path / "t", "v1", f"{upstream.host}/team/tagged:v1")
    assert skopeo.inspect_raw(f"{nodes[0].host}/team/tagged:v1") == image.manifest
    skopeo.copy_to_dir(f"{nodes[0].host}/team/tagged:v1", tmp_path / "first")  # node 0 caches it all
    upstream.stop()
    assert skopeo.inspect_raw(f"{nodes[1].host}/team/tagged:v1") == image.manifest
    skopeo.copy_to_dir(f"{nodes[2].host}/team/tagged:v1", tmp_path / "offline")
    layer = image.layers[0].digest
    assert sha256_digest((tmp_path / "offline" / layer[7:]).read_bytes()) == layer


def test_eviction_keeps_the_bound_pinned_and_recent_blobs(tmp_path) -> None:
    with Registry(tmp_path / "upstream") as upstream, Relay(upstream.url) as relay:
        pinned = make_image(tmp_path / "p", "v1", layers=[1 << 20])
        skopeo.push(tmp_path / "p", "v1", f"{upstream.host}/team/pinned:v1")
        olds = [push_blob(tmp_path, upstream, f"team/old{i}", 1 << 20) for i in range(4)]
        nodes = start_nodes(tmp_path, tmp_path / "shared", relay, count=1,
                            storage={"max_size": "3MiB", "gc_grace": "1h", "gc_interval": "1h"},
                            pin=["team/pinned:v1"])
        node = nodes[0]
        try:
            assert skopeo.inspect_raw(f"{node.host}/team/pinned:v1") == pinned.manifest
            reads = [("team/pinned", pinned.layers[0].digest)] + [(f"team/old{i}", d) for i, d in enumerate(olds)]
            for repo, digest in reads:
                assert request(node.host, "GET", f"/v2/{repo}/blobs/{digest}")[0] == 200
            blobs = tmp_path / "shared" / "blobs" / "sha256"
            for _, digest in reads:
                committed(blobs, digest)
            ages = {olds[0]: 1000, olds[1]: 2000, olds[2]: 3000, pinned.layers[0].digest: 500}
            for digest, when in ages.items():  # long ago, in this order; olds[3] was just read
                os.utime(blobs / digest[7:9] / digest[7:], (when, when))
            command = [METAHUB_CLI, "cache", "gc", "--config", node.config_path]
            dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=60)
            assert dry.returncode == 0 and "would remove" in dry.stdout
            assert all((blobs / d[7:9] / d[7:]).exists() for d in olds)
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            sizes = sum(f.stat().st_size for f in blobs.rglob("*") if f.is_file())
            assert sizes <= 3 << 20
            assert not (blobs / olds[0][7:9] / olds[0][7:]).exists()  # the oldest went first
            assert (blobs / olds[3][7:9] / olds[3][7:]).exists()  # read within the grace period
            assert (blobs / pinned.layers[0].digest[7:9] / pinned.layers[0].digest[7:]).exists()  # pinned
            relay.reset()
            status, _, body = request(node.host, "GET", f"/v2/team/old0/blobs/{olds[0]}")
            assert status == 200 and sha256_digest(body) == olds[0]  # evicted: simply fetched again
            assert relay.blob_gets("team/old0", olds[0]) == 1
            node.stop()  # a clean stop writes this node's record (hits and misses) to the store
            stats = subprocess.run([METAHUB_CLI, "cache", "stats", "--config", node.config_path],
                                   capture_output=True, text=True, timeout=60)
            assert stats.returncode == 0, stats.stderr
            assert "nodes seen:  1" in stats.stdout and "hit ratio:" in stats.stdout
            assert "n/a" not in stats.stdout
        finally:
            node.stop()


def test_verify_quarantines_a_corrupted_blob(cluster) -> None:
    upstream, relay, nodes, tmp_path = cluster
    digest = push_blob(tmp_path, upstream, "team/v", 100_000)
    assert request(nodes[0].host, "GET", f"/v2/team/v/blobs/{digest}")[0] == 200
    blob = committed(tmp_path / "shared" / "blobs" / "sha256", digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    result = subprocess.run([METAHUB_CLI, "cache", "verify", "--config", nodes[0].config_path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and digest in result.stdout
    assert not blob.exists() and (tmp_path / "shared" / "quarantine" / digest[7:]).exists()
    status, _, body = request(nodes[1].host, "GET", f"/v2/team/v/blobs/{digest}")
    assert status == 200 and sha256_digest(body) == digest  # refetched, verified


def test_three_nodes_over_sshfs_fetch_once(tmp_path) -> None:
    """The same fan-in with two nodes reaching the store through a real network filesystem."""
    shared = tmp_path / "shared"
    shared.mkdir()
    with Registry(tmp_path / "upstream") as upstream, Relay(upstream.url) as relay, \
            SshfsMount(shared, tmp_path / "sshfs-1") as mount_1, SshfsMount(shared, tmp_path / "sshfs-2") as mount_2:
        digest = push_blob(tmp_path, upstream, "team/net", 60 << 20)
        upstreams = {"local": {"url": relay.url, "read_timeout": "10s"}}
        nodes = [
            Metahub(tmp_path / f"node{n}", upstreams,
                    storage={"path": str(path), "index": str(tmp_path / f"node{n}" / "index"), "lease_timeout": "5s"})
            for n, path in enumerate([shared, mount_1.path, mount_2.path])
        ]
        try:
            relay.reset()
            jobs = [(nodes[i % 3].host, f"/v2/team/net/blobs/{digest}") for i in range(30)]
            assert fetch_all(jobs) == [(200, digest)] * 30
            assert relay.blob_gets("team/net", digest) == 1
            assert_store_sound(shared)
        finally:
            for node in nodes:
                node.stop()


def metric(node_metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in node_metrics.splitlines() if line.startswith(name))


@pytest.mark.parametrize("stopped", ["sshfs", "sftp server"])
def test_a_node_whose_sshfs_mount_stalls_mid_download(tmp_path, stopped: str) -> None:
    """Node B (the lease holder) reaches the store through sshfs, whose client or server is stopped
    mid-download. Node A takes the download over; B's clients, A's, and B's other work come through."""
    shared = tmp_path / "shared"
    shared.mkdir()
    with Registry(tmp_path / "upstream") as upstream, Relay(upstream.url) as relay, \
            SshfsMount(shared, tmp_path / "sshfs") as mount:
        digest = push_blob(tmp_path, upstream, "team/stall", 30 << 20)
        tagged = make_image(tmp_path / "tagged", "v1", layers=[b"small"])
        skopeo.push(tmp_path / "tagged", "v1", f"{upstream.host}/team/tagged:v1")
        port = upstream.host.split(":")[1]
        upstreams = {
            "local": {"url": relay.url, "read_timeout": "30s"},
            # Never contacted before the stall: its first connection needs a name lookup.
            "other": {"url": f"http://localhost:{port}"},
        }
        common = {"lease_timeout": "3s", "io_threads": 4}
        a, b = [Metahub(tmp_path / f"node-{n}", upstreams, default_upstream="local", cache={"tag_ttl": "1s"},
                        storage={**common, "path": str(path), "index": str(tmp_path / f"node-{n}" / "index")})
                for n, path in (("a", shared), ("b", mount.path))]
        try:
            assert skopeo.inspect_raw(f"{b.host}/team/tagged:v1") == tagged.manifest  # B knows the tag
            relay.reset()
            relay.rate = 6 << 20  # 5 s for the blob
            path = f"/v2/team/stall/blobs/{digest}"
            on_b: list = []
            b_clients = threading.Thread(target=lambda: on_b.extend(fetch_all([(b.host, path)] * 2)))
            b_clients.start()
            wait_for((shared / "leases" / f"{digest[7:]}.lease").exists, 10, "node B never took the lease")
            time.sleep(1.0)
            mount.stall(server=stopped == "sftp server")
            stalled = time.monotonic()
            on_a: list = []
            a_clients = threading.Thread(target=lambda: on_a.extend(fetch_all([(a.host, path)] * 2)))
            a_clients.start()
            # B's store requests hang in its store pool (4 threads, more queued behind them)...
            cold = [f"/v2/team/stall/blobs/sha256:{n:064x}" for n in range(8)]
            hung = threading.Thread(target=fetch_all, args=([(b.host, p) for p in cold],), daemon=True)
            hung.start()
            time.sleep(0.5)
            # ...and the rest of B keeps answering: the API, a revalidated tag, another upstream.
            started = time.monotonic()
            assert request(b.host, "GET", "/v2/")[0] == 200
            status, _, body = request(b.host, "GET", "/v2/team/tagged/manifests/v1",
                                      {"Accept": "application/vnd.oci.image.manifest.v1+json"})
            assert status == 200 and body == tagged.manifest
            status, _, body = request(b.host, "GET", "/v2/other/team/tagged/tags/list")
            assert status == 200 and b"v1" in body
            assert time.monotonic() - started < 3, "node B's other work waited for the stalled store"
            a_clients.join(60)
            assert on_a == [(200, digest)] * 2  # A took the lease over, fetched, verified
            # lease_timeout + one whole transfer + slack
            assert time.monotonic() - stalled < 3 + 5 + 5
            committed(shared / "blobs" / "sha256", digest)
            mount.unstall()
            b_clients.join(60)
            assert on_b == [(200, digest)] * 2  # B's clients finished from the blob A stored
            hung.join(60)
            relay.rate = None
            assert relay.blob_gets("team/stall", digest) == 2  # B's, A's takeover; B did not fetch again
            log_b = b.log()
            assert "Unhandled" not in log_b and "Traceback" not in log_b and "FileNotFoundError" not in log_b
            assert "stepping aside" in log_b
            assert "aborting a response" not in log_b and "aborting a response" not in a.log()
            assert_store_sound(shared)
            wait_for(lambda: not [f for f in os.listdir(shared / "tmp") if not f.startswith(".fuse_hidden")],
                     15, "a temp file was left behind")
            assert not list((shared / "leases").glob("*.lease"))
        finally:
            mount.unstall()
            a.stop()
            b.stop()


def test_prefetch_warms_the_shared_store_for_one_machine_type(tmp_path) -> None:
    from tests.peers.oci import make_bench_index

    with Registry(tmp_path / "upstream") as upstream, Relay(upstream.url) as relay:
        index = make_bench_index(tmp_path / "layout", "1.0", layers=[200_000])
        skopeo.push(tmp_path / "layout", "1.0", f"{upstream.host}/team/bench:1.0")
        machine_types = {"type1": {"platform": {"os": "linux", "architecture": "amd64"}, "features": ["cpu:broadwell"]}}
        [node] = start_nodes(tmp_path, tmp_path / "shared", relay, count=1, machine_types=machine_types)
        try:
            relay.reset()
            result = subprocess.run([METAHUB_CLI, "prefetch", "--config", node.config_path, "--machine-type", "type1",
                                     "team/bench:1.0"], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            assert "prefetched team/bench:1.0: 3 blobs" in result.stdout and "100.0%" in result.stderr
            blobs = tmp_path / "shared" / "blobs" / "sha256"
            broadwell, skylake = index.images[2], index.images[1]
            for blob in [broadwell.config, *broadwell.layers]:
                assert (blobs / blob.digest[7:9] / blob.digest[7:]).exists()
            assert not (blobs / skylake.layers[-1].digest[7:9] / skylake.layers[-1].digest[7:]).exists()
            relay.reset()  # the node now serves the prefetched build without asking upstream for blobs
            for blob in broadwell.layers:
                status, _, body = request(node.host, "GET", f"/v2/team/bench/blobs/{blob.digest}")
                assert status == 200 and sha256_digest(body) == blob.digest
                assert relay.blob_gets("team/bench", blob.digest) == 0
            bad = subprocess.run([METAHUB_CLI, "prefetch", "--config", node.config_path, "team/nothing:1"],
                                 capture_output=True, text=True, timeout=120)
            assert bad.returncode == 1 and "MANIFEST_UNKNOWN" in bad.stderr and "Traceback" not in bad.stderr
        finally:
            node.stop()
