"""The running server as a Twisted service: storage opened in ``startService``, never before.

twistd may fork to daemonize after ``makeService``; an LMDB environment must not cross a fork, so
nothing that opens files or connections happens until the service starts.
"""
from __future__ import annotations

import socket
from typing import NoReturn

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from storage import IndexInUse, IndexLock, Leases, SharedTags, Storage
from storage.nodes import NodeRecord, NodeRecords
from storage.store import DEFAULT_TEMP_GRACE

from .api import Registry, RegistryResource
from .auth import Authenticator, load_token_key
from .blobs import Blobs
from .config import Config, config_summary, endpoint_problem
from .downloads import Downloads
from .eviction import run_collection
from .lane import thread_lanes
from .manifests import Manifests
from .memory import Releaser
from .site import registry_site
from .status import NodeFacts, StatusPage
from .threads import thread_runner
from .metrics import Metrics
from .upstream import UpstreamClient, make_http_client
from .virtual import VirtualImages

log = Logger()

#: How often batched last-access times are written to the index.
ACCESS_FLUSH_INTERVAL = 30.0
#: How long a clean stop waits for verified downloads to be committed to the store.
COMMIT_GRACE = 30.0
#: How often the shared directory is swept for other nodes' crash leftovers.
TIDY_INTERVAL = 3600.0
#: A node record silent this long belongs to a node that is gone (renamed, retired).
NODE_RECORD_LIFETIME = 86400.0


class MetahubService(Service):
    def __init__(self, config: Config, listen: str, reactor: object | None = None) -> None:
        self.config = config
        self.listen = listen
        self._reactor = reactor
        self.storage: Storage | None = None
        self.index_lock: IndexLock | None = None
        self.downloads: Downloads | None = None
        self.port: IListeningPort | None = None
        self._flush: LoopingCall | None = None
        self._gc: LoopingCall | None = None
        self._tidy: LoopingCall | None = None
        # Stable across restarts, so the shared store's nodes/ holds one record per node, not per process.
        self.node_name = config.node_id or socket.gethostname()

    @property
    def reactor(self):  # imported late: twistd installs the reactor it was asked for first
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def build_site(self) -> Site:
        reactor = self.reactor
        config = self.config
        try:  # shared with other servers on this index; `cache reindex` must wait for all to stop
            self.index_lock = IndexLock(config.storage.index, exclusive=False)
        except IndexInUse:
            self._give_up(f"{config.storage.index} is being reindexed (metahub cache reindex); start after it")
        self.storage = Storage(config.storage.path, config.storage.index, clock=reactor.seconds)
        in_thread = self.in_thread = thread_runner(reactor)
        http = make_http_client(reactor, list(config.upstreams.values()))
        clients = {name: UpstreamClient(upstream, http, reactor) for name, upstream in config.upstreams.items()}
        metrics = self.metrics = Metrics()
        leases = self.leases = Leases(config.storage.path, node=self.node_name, clock=reactor.seconds)
        self.shared_tags = SharedTags(config.storage.path)
        self.node_records = NodeRecords(config.storage.path)
        downloads = self.downloads = Downloads(
            self.storage, clients, reactor, in_thread, metrics, leases, thread_lanes(reactor), config.storage.lease_timeout
        )
        registry = Registry(
            config=config,
            clients=clients,
            manifests=Manifests(
                self.storage, clients, reactor, in_thread, metrics, config.tag_ttl, self.shared_tags
            ),
            blobs=Blobs(self.storage, clients, downloads, reactor, in_thread, metrics, Releaser(reactor)),
            metrics=metrics,
            auth=Authenticator(config, load_token_key(config.storage.path), reactor.seconds),
            in_thread=in_thread,
            virtual=VirtualImages(config),
        )
        node = NodeFacts(
            self.node_name, reactor.seconds(), self.listen_address, self.storage, self.node_records,
            live_within=3 * ACCESS_FLUSH_INTERVAL,  # records are rewritten at every flush
        )
        registry.status = StatusPage(registry, node, reactor.seconds)
        return registry_site(RegistryResource(registry), config.access_log)

    def startService(self) -> None:
        super().startService()
        for line in config_summary(self.config).splitlines():
            log.info("{line}", line=line)
        site = self.build_site()
        self._flush = LoopingCall(lambda: ensureDeferred(self.flush_access()))
        self._flush.clock = self.reactor
        self._flush.start(ACCESS_FLUSH_INTERVAL, now=False)
        self._tidy = LoopingCall(lambda: ensureDeferred(self.tidy()))
        self._tidy.clock = self.reactor
        self._tidy.start(TIDY_INTERVAL, now=False)
        if self.config.storage.max_size is not None:
            self._gc = LoopingCall(lambda: ensureDeferred(self.collect()))
            self._gc.clock = self.reactor
            self._gc.start(self.config.storage.gc_interval, now=True)
        self._listen(site)

    def _listen(self, site: Site) -> None:
        """Listen on the endpoint, or end the process with one line and exit status 1.

        A process that cannot listen serves nothing, yet a supervisor would think it up. twistd
        calls ``startService`` before it runs the reactor, and Twisted's TCP, SSL and UNIX endpoints
        listen at once, so the failure is known here and ``SystemExit`` ends twistd before the
        reactor starts (twistd would print a traceback for any other exception).
        """
        problem = endpoint_problem(self.listen)
        if problem is not None:
            self._give_up(f"listen {self.listen!r}: {problem}")
        outcome: list[IListeningPort | Failure] = []

        def note(result: IListeningPort | Failure) -> IListeningPort | Failure:
            outcome.append(result)
            return result

        listening = endpoints.serverFromString(self.reactor, self.listen).listen(site)
        listening.addBoth(note)
        if not outcome:
            # An endpoint type that listens later (none of Twisted's own): log and stop then.
            listening.addCallback(self._listening_on)
            listening.addErrback(self._cannot_listen_later)
        elif isinstance(outcome[0], Failure):
            listening.addErrback(lambda _: None)  # reported here, not as an unhandled error
            self._give_up(f"cannot listen on {self.listen}: {outcome[0].getErrorMessage()}")
        else:
            self._listening_on(outcome[0])

    def _listening_on(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info("metahub serving the registry API on {host}:{port}", host=address.host, port=address.port)

    def listen_address(self) -> str:
        if self.port is None:
            return self.listen
        address = self.port.getHost()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return f"{self.listen} ({host}:{port})" if host is not None else self.listen

    def _cannot_listen_later(self, failure: Failure) -> None:
        log.error("metahub: cannot listen on {listen}: {why}", listen=self.listen, why=failure.getErrorMessage())
        self.reactor.callWhenRunning(self.reactor.stop)

    def _give_up(self, message: str) -> NoReturn:
        if self.storage is not None:
            self.storage.close()
            self.storage = None
        if self.index_lock is not None:
            self.index_lock.release()
            self.index_lock = None
        raise SystemExit(f"metahub: {message}")

    async def flush_access(self) -> None:
        """Write batched last-access times: the index here, the blob files' mtimes (for the
        cluster's eviction) in a thread. Files found gone were evicted elsewhere: forget them."""
        storage = self.storage
        storage.index.flush_access()
        storage.forget(*await self.in_thread(storage.stamps.flush, storage.blobs, self.reactor.seconds()))
        hits, misses = self.metrics.hits_and_misses()
        record = NodeRecord(self.node_name, self.reactor.seconds(), hits, misses)
        await self.in_thread(self.node_records.write, record)

    async def tidy(self) -> None:
        """Remove crash leftovers of any node, in a thread (the shared directory may be slow)."""
        assert self.storage is not None
        # Well above any live writer's silence: temp files grow and leases heartbeat constantly.
        older_than = max(DEFAULT_TEMP_GRACE, 10 * self.config.storage.lease_timeout)
        try:
            removed = await self.in_thread(self.storage.clean_leftovers, self.leases, older_than)
            await self.in_thread(self.node_records.prune, self.reactor.seconds() - NODE_RECORD_LIFETIME)
        except Exception:
            log.failure("could not sweep the store for crash leftovers")
            return
        if removed:
            log.info("removed {count} files dead writers left in the store", count=removed)

    async def collect(self) -> None:
        """One collection attempt; the cluster lease makes it a no-op while another node collects."""
        try:
            result = await self.in_thread(
                run_collection, self.config, self.storage, self.leases, self.shared_tags, self.reactor.seconds()
            )
        except Exception:
            log.failure("collection failed")
            return
        if result is None:
            return
        self.storage.forget(*result.removed)
        if result.removed:
            log.info(
                "evicted {count} blobs ({size} bytes); store now {after} bytes",
                count=len(result.removed), size=result.removed_bytes, after=result.after_bytes,
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for loop in (self._flush, self._gc, self._tidy):
            if loop is not None and loop.running:
                loop.stop()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        if self.downloads is not None:
            # Clients of these already have the whole blob: let the fsync and rename land.
            settled = self.downloads.committing()
            settled.addTimeout(COMMIT_GRACE, self.reactor)
            try:
                await settled
            except Exception:
                log.failure("blobs still being committed at shutdown may have to be fetched again")
        if self.storage is not None:
            try:  # a clean stop keeps the last access times and this node's record
                await self.flush_access()
            except Exception:
                log.failure("could not write access times at shutdown")
            self.storage.close()
            self.storage = None
        if self.index_lock is not None:
            self.index_lock.release()
            self.index_lock = None
