"""The service tree, driven on a fake reactor: what it holds, when its timers run, how it stops."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import TimerService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from metahub.app import tap
from metahub.app.root import Root
from metahub.app.service import (
    COMMIT_GRACE,
    RESOLVER_THREADS,
    TIDY_INTERVAL,
    server_tree,
)
from metahub.config.file import parse_config
from storage import IndexLock
from storage.nodes import NodeRecords
from tests.unit.fakes import InlinePool, inline_threads, minimal


@implementer(IListeningPort)
class _Port:
    def __init__(self, port: int, events: list[str]) -> None:
        self.port = port
        self.events = events

    def startListening(self) -> None:  # noqa: N802
        pass

    def stopListening(self) -> None:  # noqa: N802
        self.events.append(f"stop listening on {self.port}")

    def getHost(self) -> IPv4Address:  # noqa: N802
        return IPv4Address("TCP", "127.0.0.1", self.port)


class Reactor(MemoryReactorClock):
    """Listens in memory (or refuses to, with ``busy``), runs thread work inline, records stops."""

    def __init__(self, busy: set[int] = frozenset()) -> None:
        super().__init__()
        self.busy = busy
        self.events: list[str] = []
        self.thread_pool_size = 10  # Twisted's default

    def listenTCP(self, port, factory, backlog=50, interface=""):  # noqa: N802
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        return _Port(port, self.events)

    def getThreadPool(self) -> InlinePool:  # noqa: N802
        return InlinePool()

    def suggestThreadPoolSize(self, size: int) -> None:  # noqa: N802
        self.thread_pool_size = size

    def callFromThread(self, function, *args, **kwargs) -> None:  # noqa: N802
        function(*args, **kwargs)


def make_root(tmp_path: Path, reactor: Reactor, **config: Any) -> Root:
    parsed = parse_config(minimal(tmp_path) | config, str(tmp_path))
    root = Root(config=parsed, reactor=reactor, listen="tcp:5000", collects=True)
    inline_threads(root)
    return root


class Jobs:
    """Stands in for the root's StoreJobs: notes when each job runs."""

    def __init__(self, clock: Reactor) -> None:
        self.clock = clock
        self.runs: dict[str, list[float]] = {"flush_access": [], "tidy": [], "collect": []}

    def __getattr__(self, name: str):
        async def job() -> None:
            self.runs[name].append(self.clock.seconds())

        return job


def index_opened(tmp_path: Path) -> bool:
    return (tmp_path / "index" / "data.mdb").exists()


def test_make_service_builds_the_tree_and_opens_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tap, "tune_malloc", lambda: None)  # process-wide; not this test's business
    monkeypatch.setattr(tap, "raise_open_files_limit", lambda: "raised the open files limit")
    config = tmp_path / "metahub.yaml"
    config.write_text(f"storage: {{path: {tmp_path / 'store'}, index: {tmp_path / 'index'}, max_size: 1 GiB}}\n"
                      "upstreams: {hub: {url: 'http://127.0.0.1:9'}}\nmetrics: {listen: 'tcp:9100'}\n")
    options = tap.Options()
    options.parseOptions(["--config", str(config), "--listen", "tcp:5001"])
    tree = tap.makeService(options)
    assert [child.name for child in tree] == ["store-io", "store-reads", "lanes", "index-writes", "store", "kdf", "registry-port", "metrics-port", "flush", "tidy", "gc"]
    timers = [child for child in tree if isinstance(child, TimerService)]
    assert [timer.step for timer in timers] == [30.0, TIDY_INTERVAL, 600.0]
    assert tree.getServiceNamed("registry-port").description == "tcp:5001"
    assert "raised the open files limit" in tree.notice  # logged first, with the config's summary
    assert not index_opened(tmp_path)  # twistd may fork after makeService: LMDB waits for startService


def test_without_max_size_or_a_metrics_port_those_children_are_left_out(tmp_path) -> None:
    tree = server_tree(root=make_root(tmp_path, Reactor()))
    assert [child.name for child in tree] == ["store-io", "store-reads", "lanes", "index-writes", "store", "kdf", "registry-port", "flush", "tidy"]


def test_starting_opens_the_store_listens_and_runs_the_timers_at_their_intervals(tmp_path) -> None:
    reactor = Reactor()
    root = make_root(tmp_path, reactor, storage={**minimal(tmp_path)["storage"], "max_size": "1 GiB",
                                                  "gc_interval": "10m"})
    jobs = root.jobs = Jobs(reactor)  # type: ignore[assignment]
    tree = server_tree(root=root)
    tree.startService()
    assert index_opened(tmp_path)
    assert [port for port, *_ in reactor.tcpServers] == [5000]
    # The reactor's pool only resolves host names: capped, so the thread count stays bounded.
    assert reactor.thread_pool_size == RESOLVER_THREADS
    # TimerService runs its job as it starts, then every interval.
    assert jobs.runs == {"flush_access": [0], "tidy": [0], "collect": [0]}
    for _ in range(3600):
        reactor.advance(1)
    assert jobs.runs["flush_access"] == [30.0 * n for n in range(121)]
    assert jobs.runs["tidy"] == [0, 3600]
    assert jobs.runs["collect"] == [600.0 * n for n in range(7)]
    tree.stopService()
    reactor.advance(100)
    assert len(jobs.runs["flush_access"]) == 122  # the last, at the stop; no timer ran after it


def test_a_stop_stops_timers_then_ports_then_logins_then_lets_commits_land_and_closes_the_store(
    tmp_path, monkeypatch
) -> None:
    reactor = Reactor()
    root = make_root(tmp_path, reactor, metrics={"listen": "tcp:9100"})
    tree = server_tree(root=root)
    tree.startService()
    events = reactor.events
    committing: Deferred[list[bool]] = Deferred()
    monkeypatch.setattr(root.downloads, "committing", lambda: committing)
    stop_pool = root.kdf.stop
    monkeypatch.setattr(root.kdf, "stop", lambda: (events.append("stop logins"), stop_pool()))
    close = root.close
    monkeypatch.setattr(root, "close", lambda: (events.append("close the store"), close()))
    reactor.advance(10)
    stopped = tree.stopService()
    assert not tree.getServiceNamed("flush").running and not tree.getServiceNamed("tidy").running
    assert events == ["stop listening on 9100", "stop listening on 5000", "stop logins"]
    assert not stopped.called  # a verified download is still being committed
    committing.callback([True])
    assert events[-1] == "close the store" and stopped.called
    # The last access times and this node's record were written at the stop, before the close.
    assert [record.last_seen for record in NodeRecords(str(tmp_path / "store")).read_all()] == [10]
    IndexLock(str(tmp_path / "index"), exclusive=True).release()  # no longer held by the server


def test_a_stop_lets_a_collection_in_progress_end_before_it_stops_anything_else(tmp_path, monkeypatch) -> None:
    reactor = Reactor()
    root = make_root(tmp_path, reactor, storage={**minimal(tmp_path)["storage"], "max_size": "1 GiB"})
    collecting: Deferred[None] = Deferred()

    class Collecting(Jobs):
        async def collect(self) -> None:
            await collecting  # in a thread, over the store: it must not be closed under it

    root.jobs = Collecting(reactor)  # type: ignore[assignment]
    tree = server_tree(root=root)
    tree.startService()  # the first collection starts at once
    close = root.close
    monkeypatch.setattr(root, "close", lambda: (reactor.events.append("close the store"), close()))
    stopped = tree.stopService()
    assert reactor.events == [] and not stopped.called
    collecting.callback(None)
    assert reactor.events == ["stop listening on 5000", "close the store"] and stopped.called


def test_a_stop_waits_for_commits_at_most_commit_grace(tmp_path, monkeypatch) -> None:
    reactor = Reactor()
    root = make_root(tmp_path, reactor)
    tree = server_tree(root=root)
    tree.startService()
    monkeypatch.setattr(root.downloads, "committing", lambda: Deferred())
    stopped = tree.stopService()
    reactor.advance(COMMIT_GRACE - 1)
    assert not stopped.called
    reactor.advance(1)
    assert stopped.called and index_opened(tmp_path)
    IndexLock(str(tmp_path / "index"), exclusive=True).release()


def test_the_registry_serves_on_a_unix_socket_and_stops(tmp_path) -> None:
    """A UNIX socket's address has no host or port, and its port may stop at once (returning None)."""
    reactor = Reactor()
    path = str(tmp_path / "metahub.sock")
    parsed = parse_config(minimal(tmp_path), str(tmp_path))
    root = Root(config=parsed, reactor=reactor, listen=f"unix:{path}")
    inline_threads(root)
    tree = server_tree(root=root)
    tree.startService()
    assert [server[0] for server in reactor.unixServers] == [path]
    assert root.registry_port.address() == f"unix:{path}"
    stopped = tree.stopService()
    assert stopped.called and stopped.result is None


def test_a_busy_port_ends_the_start_with_one_line_and_lets_go_of_the_store(tmp_path) -> None:
    reactor = Reactor(busy={5000})
    root = make_root(tmp_path, reactor)
    root.jobs = jobs = Jobs(reactor)  # type: ignore[assignment]
    tree = server_tree(root=root)
    with pytest.raises(SystemExit) as exited:
        tree.startService()
    message = str(exited.value.code)
    assert message.startswith("metahub: cannot listen on tcp:5000: ") and "\n" not in message
    assert jobs.runs == {"flush_access": [], "tidy": [], "collect": []}  # no timer started
    IndexLock(str(tmp_path / "index"), exclusive=True).release()  # the store's share was let go


def test_a_busy_metrics_port_ends_the_start_too(tmp_path) -> None:
    tree = server_tree(root=make_root(tmp_path, Reactor(busy={9100}), metrics={"listen": "tcp:9100"}))
    with pytest.raises(SystemExit, match="^metahub: cannot listen on tcp:9100: "):
        tree.startService()


def test_a_reindex_in_progress_ends_the_start_with_one_line(tmp_path) -> None:
    reindexing = IndexLock(str(tmp_path / "index"), exclusive=True)
    try:
        tree = server_tree(root=make_root(tmp_path, Reactor()))
        with pytest.raises(SystemExit, match="is being reindexed"):
            tree.startService()
    finally:
        reindexing.release()


def test_the_hourly_sweep_removes_a_dead_nodes_half_written_blob(tmp_path) -> None:
    reactor = Reactor()
    reactor.advance(time.time())  # the store dates files by the reactor's clock
    root = make_root(tmp_path, reactor)
    leftover = os.path.join(root.storage.blobs.tmp_dir, "ab" * 32 + ".other-node-99.part")
    with open(leftover, "wb") as file:
        file.write(b"x" * 1000)
    hours_ago = time.time() - 3 * 3600
    os.utime(leftover, (hours_ago, hours_ago))
    ensureDeferred(root.jobs.tidy())
    assert not os.path.exists(leftover)
    root.close()
