"""The running server as a tree of Twisted services, its parts taken from a :class:`~metahub.app.root.Root`.

``makeService`` returns this tree (children in the order they start)::

    ServerTree          logs the configuration, starts the children in order, stops them in reverse,
                        one after another
      store-io          PoolService: store I/O's own threads (storage.io_threads), and
      store-reads         reads of open blob files on threads of their own (docs/cluster.md)
      lanes             PoolService: the downloads' hashing and writing, on storage.write_threads
                        threads shared by every download (metahub.runtime.lane)
      index-writes      PoolService: every write of the node's index, in order, on one thread
      store             StoreService: opens the store (never before: twistd may fork after makeService,
                        and an LMDB environment must not cross a fork); at a clean stop lets the
                        commits in flight land, writes the last access times, closes it
      kdf               PoolService: the logins' own threads
      registry-port     PortService: the registry API (a port that cannot be taken ends the process
      metrics-port        in one line, before the reactor runs); /metrics, when metrics.listen is set
      flush             TimerService: access times and this node's record, every 30 s
      tidy              TimerService: other nodes' crash leftovers, hourly
      gc                TimerService: collection down to storage.max_size, when set

Every timer runs once as it starts (``TimerService`` starts its loop at once) and then at its interval.
The ports start after the store and before the timers, so a port that fails leaves no job started.
"""
from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger

from metahub.app.ports import give_up
from metahub.app.root import ACCESS_FLUSH_INTERVAL, Root
from metahub.config.file import config_summary
from metahub.runtime.lane import LanePool
from metahub.runtime.pools import ThreadPoolRunner
from metahub.runtime.threads import BoundedPool
from storage import IndexInUse

log = Logger()

#: How long a clean stop waits for verified downloads to be committed to the store.
COMMIT_GRACE = 30.0
#: How often the shared directory is swept for other nodes' crash leftovers.
TIDY_INTERVAL = 3600.0


class StoreService(Service):
    """Holds the store open while running: opened in ``startService``, closed at the end of a stop."""

    def __init__(self, *, root: Root) -> None:
        self.root = root

    def startService(self) -> None:
        super().startService()
        try:
            self.root.open_store()
        except IndexInUse:  # `cache reindex` runs alone: every server waits for it
            give_up(f"{self.root.config.storage.index} is being reindexed (metahub cache reindex); start after it")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        root = self.root
        # Clients of these already have the whole blob: let the fsync and rename land.
        settled = root.downloads.committing()
        settled.addTimeout(COMMIT_GRACE, root.reactor)
        try:
            await settled
        except Exception:
            log.failure("blobs still being committed at shutdown may have to be fetched again")
        try:  # a clean stop keeps the last access times and this node's record
            await root.jobs.flush_access()
        except Exception:
            log.failure("could not write access times at shutdown")
        root.close()


class PoolService(Service):
    """Runs a thread pool of our own while running."""

    def __init__(self, *, pool: BoundedPool | ThreadPoolRunner | LanePool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()  # waits for the calls in progress (a KDF run: tens of ms), but not a lane's


class ServerTree(MultiService):
    """The server: its children start in order and stop in reverse, each stop awaited before the next.

    ``MultiService`` would stop them all at once; here the store must close only after the ports
    stopped listening and the timers' last runs (a collection in a thread, say) are over.
    """

    def __init__(self, *, root: Root, notice: Sequence[str] = ()) -> None:
        super().__init__()
        self.root = root
        self.notice = notice  # lines that head the log, e.g. that the built-in default serves

    def startService(self) -> None:
        # The reactor's own thread pool now only runs host-name lookups for upstream connections
        # (every blocking call of ours has a pool of its own): Twisted's default of 10 threads
        # would only raise the process's thread count, which issue 14 bounds.
        self.root.reactor.suggestThreadPoolSize(RESOLVER_THREADS)
        summary = config_summary(replace(self.root.config, listen=self.root.listen))
        for line in [*self.notice, *summary.splitlines()]:
            log.info("{line}", line=line)
        try:
            super().startService()
        except SystemExit:
            # The process ends before the reactor runs, which a stop would need: let go of the
            # store and the index lock now.
            self.root.close()
            raise

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # not MultiService's, which stops every child at once
        return ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("could not stop {name} cleanly", name=child.name)


#: Threads for host-name lookups (the reactor's pool): a stalled resolver holds up one of them.
RESOLVER_THREADS = 2


def _timer(interval: float, job: Callable[[], Coroutine[Any, Any, None]], root: Root) -> TimerService:
    # ``job`` reaches its object through the root when it runs: building it here would open the store.
    timer = TimerService(interval, lambda: ensureDeferred(job()))
    timer.clock = root.reactor
    return timer


def server_tree(*, root: Root, notice: Sequence[str] = ()) -> ServerTree:
    children: list[tuple[str, IService]] = [
        # Before the store: children stop in reverse order, and the store's stop still flushes
        # through these pools.
        ("store-io", PoolService(pool=root.in_thread)),
        ("store-reads", PoolService(pool=root.store_reads)),
        ("lanes", PoolService(pool=root.lanes)),
        ("index-writes", PoolService(pool=root.index_writes)),
        ("store", StoreService(root=root)),
        ("kdf", PoolService(pool=root.kdf)),
        ("registry-port", root.registry_port),
    ]
    if root.metrics_port is not None:
        children.append(("metrics-port", root.metrics_port))
    children += [
        ("flush", _timer(ACCESS_FLUSH_INTERVAL, lambda: root.jobs.flush_access(), root)),
        ("tidy", _timer(TIDY_INTERVAL, lambda: root.jobs.tidy(), root)),
    ]
    if root.config.storage.max_size is not None:
        children.append(("gc", _timer(root.config.storage.gc_interval, lambda: root.jobs.collect(), root)))
    tree = ServerTree(root=root, notice=notice)
    for name, child in children:
        child.setName(name)
        child.setServiceParent(tree)
    return tree
