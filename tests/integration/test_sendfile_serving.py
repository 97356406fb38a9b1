"""Cached blobs over plain TCP go out with ``os.sendfile`` (issue 14): a real twistd metahub, real
``curl`` downloads, byte for byte, whole and ranged; a client leaving mid-body leaves no descriptor
behind (/proc/PID/fd); TLS serving the same blob stays byte-exact on the copy loop. Clients of a
download in progress get it by sendfile too, as it lands, all but its final byte.

``strace`` on the server shows which path a response took: sendfile calls for plain TCP, none for TLS.
"""
from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers import skopeo
from tests.peers.oci import make_image
from tests.peers.ports import LOOPBACK
from tests.peers.registry import Registry
from tests.peers.relay import Relay
from tests.peers.tls import make_ca

from .common import descriptors, pid_of, request, settle
from .metahub_process import Metahub, ServerTLS

LAYER_BYTES = 40 << 20
#: A blob the followers' test downloads through a relay slowed to FOLLOW_RATE: three seconds.
FOLLOW_BYTES = 30 << 20
FOLLOW_RATE = 10 << 20
REPO = "team/big"


@dataclass(frozen=True)
class World:
    plain: Metahub
    tls: Metahub
    ca_path: Path
    digest: str
    data: bytes
    root: Path

    @property
    def path(self) -> str:
        return f"/v2/{REPO}/blobs/{self.digest}"


def _stored(hub: Metahub, digest: str, size: int) -> None:
    """Wait until ``hub``'s store holds the blob (committed: the next GET is a cache hit)."""
    stored = Path(hub.config["storage"]["path"]) / "blobs" / "sha256" / digest[7:9] / digest[7:]
    deadline = time.monotonic() + 60
    while not (stored.exists() and stored.stat().st_size == size):
        assert time.monotonic() < deadline, f"{digest} never reached the store"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sendfile")
    ca = make_ca(root / "ca")
    cert_path, key_path = ca.issue(root / "server", "metahub", hosts=["127.0.0.1"])
    with Registry(root / "upstream") as upstream:
        image = make_image(root / "layout", "v1", layers=[LAYER_BYTES])
        skopeo.push(root / "layout", "v1", f"{upstream.host}/{REPO}:v1")
        layer = image.layers[0]
        data = (root / "layout" / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
        upstreams = {"local": {"url": upstream.url}}
        with Metahub(root / "plain", upstreams, default_upstream="local") as plain, \
                Metahub(root / "tls", upstreams, default_upstream="local",
                        tls=ServerTLS(cert_path, key_path, ca.cert_path)) as tls:
            assert request(plain.host, "GET", f"/v2/{REPO}/blobs/{layer.digest}")[0] == 200
            _stored(plain, layer.digest, layer.size)
            yield World(plain, tls, ca.cert_path, layer.digest, data, root)


def _curl(url: str, out: Path, *args: str) -> tuple[int, int]:
    """Download ``url`` to ``out`` with curl; (HTTP status, bytes downloaded)."""
    result = subprocess.run(
        ["curl", "-sS", "-o", str(out), "-w", "%{http_code} %{size_download}", *args, url],
        check=True, capture_output=True, text=True, timeout=120,
    )
    status, size = result.stdout.split()
    return int(status), int(size)


class Strace:
    """``strace -f -e trace=sendfile`` attached to a process while the block runs."""

    def __init__(self, pid: int, log: Path) -> None:
        self.pid = pid
        self.log = log

    def __enter__(self) -> Strace:
        self.process = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=sendfile", "-o", str(self.log), "-p", str(self.pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not self._attached():
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.05)
        return self

    def _attached(self) -> bool:
        """Whether every thread of the process is traced (new ones are followed by ``-f``)."""
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                if "\nTracerPid:\t0\n" in (task / "status").read_text():
                    return False
            except FileNotFoundError:  # a thread that has just ended
                pass
        return True

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def sent(self) -> int:
        """Bytes the traced sendfile calls reported sending.

        A call that another thread's call interrupted in the log is split over two lines, the
        second ``<... sendfile resumed> ...) = N``: its bytes are on that one."""
        calls = r"^(?:\d+\s+)?(?:sendfile\(|<\.\.\. sendfile resumed>).*\) = (\d+)$"
        return sum(int(n) for n in re.findall(calls, self.log.read_text(), re.MULTILINE))


def _traced_curl(hub: Metahub, url: str, out: Path, *args: str) -> tuple[int, int, int | None]:
    """:func:`_curl`, and the bytes the server sent with sendfile meanwhile (None: no strace here)."""
    if shutil.which("strace") is None:
        return *_curl(url, out, *args), None
    with Strace(pid_of(hub), out.with_suffix(".strace")) as traced:
        got = _curl(url, out, *args)
    return *got, traced.sent()


def test_curl_gets_the_cached_blob_byte_for_byte_by_sendfile(world: World, tmp_path: Path) -> None:
    out = tmp_path / "blob"
    status, size, by_sendfile = _traced_curl(world.plain, world.plain.url + world.path, out)
    assert (status, size) == (200, len(world.data))
    assert by_sendfile in (None, len(world.data))  # every body byte, none through the copy loop
    assert out.read_bytes() == world.data


def test_curl_gets_ranges_by_sendfile(world: World, tmp_path: Path) -> None:
    size = len(world.data)
    for curl_range, start, end in [("1000-2000999", 1000, 2001000), (f"{size - 77}-", size - 77, size),
                                   ("-5000000", size - 5000000, size), ("0-0", 0, 1)]:
        out = tmp_path / "part"
        assert _curl(world.plain.url + world.path, out, "-r", curl_range) == (206, end - start), curl_range
        assert out.read_bytes() == world.data[start:end], curl_range


def test_a_connection_that_closes_after_the_body_gets_it_all(world: World, tmp_path: Path) -> None:
    out = tmp_path / "blob"
    for args in [("--http1.0",), ("-H", "Connection: close")]:  # the channel closes once the body is out
        assert _curl(world.plain.url + world.path, out, *args) == (200, len(world.data)), args
        assert out.read_bytes() == world.data, args


def test_access_log_and_metrics_count_the_bytes_sent(world: World, tmp_path: Path) -> None:
    before = _served_from_cache(world.plain)
    assert _curl(world.plain.url + world.path, tmp_path / "blob", "-r", "100-1099") == (206, 1000)
    assert _served_from_cache(world.plain) - before == 1000
    deadline = time.monotonic() + 30  # the log line is written after the response; a loaded machine is slow
    while f'"GET {world.path} HTTP/1.1" 206 1000 ' not in world.plain.log():
        assert time.monotonic() < deadline, world.plain.log()[-2000:]
        time.sleep(0.05)


def _served_from_cache(hub: Metahub) -> float:
    return _served(hub, "cache")


def _served(hub: Metahub, source: str) -> float:
    status, _, body = request(hub.host, "GET", "/metrics")
    assert status == 200
    match = re.search(rf'^metahub_bytes_served_total\{{source="{source}"\}} (\S+)$', body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _leave_mid_body(hub: Metahub, path: str, reset: bool) -> None:
    """GET ``path``, read a MiB of the response, and go: closing, or resetting (SO_LINGER 0)."""
    with socket.create_connection((LOOPBACK, hub.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the server must wait on us
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: metahub.test\r\n\r\n".encode())
        received = 0
        while received < 1 << 20:
            chunk = sock.recv(1 << 16)
            assert chunk
            received += len(chunk)
        time.sleep(0.3)  # the server's job fills our buffer and gives its thread back to the reactor
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_leaving_mid_body_leaves_no_descriptor(world: World, tmp_path: Path) -> None:
    hub = world.plain
    # A connection that stays, so the count below is the blob files' and sockets' alone.
    assert request(hub.host, "GET", "/v2/")[0] == 200
    before = len(descriptors(hub))
    for number in range(6):
        _leave_mid_body(hub, world.path, reset=number % 2 == 1)
    assert settle(hub, before) <= before, descriptors(hub)
    # The server is none the worse: the next client gets every byte.
    out = tmp_path / "blob"
    assert _curl(hub.url + world.path, out) == (200, len(world.data))
    assert out.read_bytes() == world.data
    assert "Traceback" not in hub.log()


def test_tls_serves_the_cached_blob_byte_for_byte_on_the_copy_loop(world: World, tmp_path: Path) -> None:
    hub = world.tls
    url = hub.url + world.path
    cacert = ("--cacert", str(world.ca_path))
    assert _curl(url, tmp_path / "first", *cacert) == (200, len(world.data))  # a miss, then cached
    _stored(hub, world.digest, len(world.data))
    out = tmp_path / "blob"
    status, size, by_sendfile = _traced_curl(hub, url, out, *cacert)
    assert (status, size) == (200, len(world.data))
    assert by_sendfile in (None, 0)  # TLS encrypts in user space: the copy loop
    assert out.read_bytes() == world.data
    assert _curl(url, out, *cacert, "-r", "5-1000004") == (206, 1000000)
    assert out.read_bytes() == world.data[5:1000005]



def test_followers_of_a_download_get_it_by_sendfile_as_it_lands(tmp_path: Path) -> None:
    """Two curls of a blob still coming from a slow upstream: both follow the one download, get
    every byte but the last by sendfile from the file being written (the last, held until the blob
    verified, through the copy loop), and get the blob exactly."""
    with Registry(tmp_path / "upstream") as upstream, Relay(upstream.url) as relay:
        image = make_image(tmp_path / "layout", "v1", layers=[FOLLOW_BYTES])
        skopeo.push(tmp_path / "layout", "v1", f"{upstream.host}/{REPO}:v1")
        layer = image.layers[0]
        data = (tmp_path / "layout" / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
        relay.reset()
        relay.rate = FOLLOW_RATE
        with Metahub(tmp_path / "hub", {"local": {"url": relay.url}}, default_upstream="local") as hub:
            url = f"{hub.url}/v2/{REPO}/blobs/{layer.digest}"
            outs = [tmp_path / "first", tmp_path / "second"]
            got: list[tuple[int, int]] = []

            def pull(out: Path) -> None:
                got.append(_curl(url, out))

            traced = Strace(pid_of(hub), tmp_path / "followers.strace") if shutil.which("strace") else None
            started = time.monotonic()
            if traced is not None:
                traced.__enter__()
            try:
                pulls = [threading.Thread(target=pull, args=(out,)) for out in outs]
                pulls[0].start()
                time.sleep(0.5)  # the second joins the download the first started
                pulls[1].start()
                for thread in pulls:
                    thread.join(120)
            finally:
                if traced is not None:
                    traced.__exit__()
            took = time.monotonic() - started
            assert got == [(200, len(data))] * 2
            assert all(out.read_bytes() == data for out in outs)
            assert took > 2, f"{took:.1f} s: the relay did not hold the download up, so none was followed"
            assert relay.blob_gets(REPO, layer.digest) == 1  # one download, two followers
            if traced is not None:
                assert traced.sent() == 2 * (len(data) - 1)
            assert _served(hub, "upstream") == 2 * len(data) and _served(hub, "cache") == 0
            assert "aborting a response" not in hub.log() and "Traceback" not in hub.log()
