"""A thousand clients connecting at once (a cluster starting a job) are all accepted and answered.

Two limits stood in the way: Twisted's listen backlog of 50 (the kernel drops SYNs beyond it, and
each dropped one costs the client a retransmit a second later, or an error; ``wrk -c 1000`` counted
32) and a soft open-files limit of 1024 on many systems. metahub is started here with a soft limit
of 512 (the hard one untouched), so it only gets through if it raises its own at startup; then 1000
sockets connect at once, all must be established within a second (no SYN was dropped: the first
retransmit comes after one), and each gets its answer to ``GET /v2/``, none reset.
"""
from __future__ import annotations

import errno
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.peers.ports import LOOPBACK
from tests.peers.require import missing

from .metahub_process import Metahub

CLIENTS = 1000
LOW_SOFT_LIMIT = 512
#: The client side needs a descriptor per socket too, and metahub one per connection and more.
NEEDED = 2 * CLIENTS + 200
REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: metahub\r\nConnection: close\r\n\r\n"


@contextmanager
def soft_open_files_limit(soft: int) -> Iterator[None]:
    """Run the block (a daemon started in it inherits this) with a lower soft RLIMIT_NOFILE."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.fixture
def room() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED:
        missing(f"the hard open files limit ({hard}) is below the {NEEDED} this test needs")
    if soft != resource.RLIM_INFINITY and soft < NEEDED:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NEEDED, hard))


def connect_all(port: int) -> tuple[list[socket.socket], float]:
    """Start CLIENTS connections at once; return them once all are established, and how long that took."""
    sockets: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    for _ in range(CLIENTS):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        code = client.connect_ex((LOOPBACK, port))
        assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)
        sockets.append(client)
        selector.register(client, selectors.EVENT_WRITE)
    pending = len(sockets)
    deadline = started + 30
    while pending:
        assert time.monotonic() < deadline, f"{pending} connections not established after 30 s"
        for key, _ in selector.select(timeout=1):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert error == 0, f"connect failed: {errno.errorcode.get(error, error)}"
            selector.unregister(client)
            pending -= 1
    took = time.monotonic() - started
    selector.close()
    return sockets, took


def ask_all(sockets: list[socket.socket]) -> list[bytes]:
    """Send ``GET /v2/`` on every socket and read each answer to its end (the server closes)."""
    for client in sockets:
        client.setblocking(True)
        client.sendall(REQUEST)
        client.setblocking(False)
    answers = {client: bytearray() for client in sockets}
    selector = selectors.DefaultSelector()
    for client in sockets:
        selector.register(client, selectors.EVENT_READ)
    open_ = len(sockets)
    deadline = time.monotonic() + 60
    while open_:
        assert time.monotonic() < deadline, f"{open_} answers unfinished after 60 s"
        for key, _ in selector.select(timeout=1):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            data = client.recv(65536)  # a reset raises ConnectionResetError: the test fails
            if data:
                answers[client] += data
            else:
                selector.unregister(client)
                open_ -= 1
    selector.close()
    return [bytes(answers[client]) for client in sockets]


def test_a_thousand_connections_at_once_are_accepted_and_answered(tmp_path: Path, room: None) -> None:
    with soft_open_files_limit(LOW_SOFT_LIMIT):
        hub = Metahub(tmp_path / "metahub", {"local": {"url": "http://127.0.0.1:9"}}, default_upstream="local",
                      access_log=False)
    with hub:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert f"raised the open files limit from {LOW_SOFT_LIMIT} to" in hub.log()
        limits = Path(f"/proc/{hub.pid}/limits").read_text().splitlines()
        soft_now, hard_now = next(line.split()[-3:-1] for line in limits if line.startswith("Max open files"))
        assert soft_now == hard_now == str(hard)
        sockets, took = connect_all(hub.port)
        try:
            assert took < 1.0, f"{CLIENTS} connections took {took:.2f} s: SYNs were dropped (listen backlog)"
            answers = ask_all(sockets)
        finally:
            for client in sockets:
                client.close()
        bad = [answer[:80] for answer in answers if not answer.startswith(b"HTTP/1.1 200 ")]
        assert not bad, f"{len(bad)} of {CLIENTS} clients got no 200: {bad[:3]}"
