"""The running server as a Twisted service: storage opened in ``startService``, never before.

twistd may fork to daemonize after ``makeService``; an LMDB environment must not cross a fork, so
nothing that opens files or connections happens until the service starts.
"""
from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from metahub.cache.capacity import StoreCapacity
from metahub.cache.downloads import Downloads
from metahub.cache.eviction import run_collection
from metahub.cache.manifests import Manifests
from metahub.cache.virtual import VirtualImages
from metahub.config.file import Config, config_summary, endpoint_problem
from metahub.runtime.lane import thread_lanes
from metahub.runtime.memory import Releaser
from metahub.runtime.metrics import Metrics
from metahub.runtime.pools import ThreadPoolRunner
from metahub.runtime.threads import BoundedPool
from metahub.upstream.client import UpstreamClient, make_http_clients
from metahub.web.api import Registry, RegistryResource
from metahub.web.auth import Authenticator, load_token_key
from metahub.web.blobs import Blobs
from metahub.web.metrics_port import metrics_site
from metahub.web.site import registry_site
from metahub.web.status import NodeFacts, StatusPage
from storage import IndexInUse, IndexLock, Leases, SharedTags, Storage
from storage.nodes import NodeRecord, NodeRecords
from storage.store import DEFAULT_TEMP_GRACE

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
    def __init__(self, config: Config, listen: str, reactor: object | None = None,
                 notice: Sequence[str] = ()) -> None:
        self.config = config
        self.listen = listen
        self.notice = notice  # lines that head the log, e.g. that the built-in default serves
        self._reactor = reactor
        self.storage: Storage | None = None
        self.index_lock: IndexLock | None = None
        self.downloads: Downloads | None = None
        self.port: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self.kdf: BoundedPool | None = None
        self.store_io: ThreadPoolRunner | None = None
        self.store_reads: ThreadPoolRunner | None = None
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
        # Store I/O on pools of its own (metahub.runtime.pools): a stalled mount costs these threads,
        # not the reactor's, and reads of open files never queue behind new opens.
        self.store_io = ThreadPoolRunner(reactor, config.storage.io_threads, "metahub-store")
        self.store_reads = ThreadPoolRunner(reactor, config.storage.io_threads, "metahub-store-reads")
        in_thread = self.in_thread = self.store_io
        http = make_http_clients(reactor, list(config.upstreams.values()))
        clients = {name: UpstreamClient(upstream, http[name], reactor) for name, upstream in config.upstreams.items()}
        metrics = self.metrics = Metrics()
        logins = config.logins
        # Logins get their own few threads: a flood of them never queues ahead of blob reads.
        self.kdf = BoundedPool(reactor, logins.kdf_threads, logins.kdf_queue, "metahub-kdf")
        leases = self.leases = Leases(config.storage.path, node=self.node_name, clock=reactor.seconds)
        self.shared_tags = SharedTags(config.storage.path)
        self.node_records = NodeRecords(config.storage.path)
        capacity = self.capacity = StoreCapacity(reactor, metrics, self._make_room)
        downloads = self.downloads = Downloads(
            self.storage, clients, reactor, in_thread, metrics, leases, thread_lanes(reactor),
            config.storage.lease_timeout, capacity,
        )
        registry = Registry(
            config=config,
            clients=clients,
            manifests=Manifests(
                self.storage, clients, reactor, in_thread, metrics, config.tag_ttl, self.shared_tags, capacity
            ),
            blobs=Blobs(self.storage, clients, downloads, reactor, in_thread, metrics, Releaser(reactor),
                        self.store_reads),
            metrics=metrics,
            auth=Authenticator(config, load_token_key(config.storage.path), reactor.seconds),
            in_thread=self.kdf,
            virtual=VirtualImages(config),
        )
        node = NodeFacts(
            self.node_name, reactor.seconds(), self.listen_address, self.storage, self.node_records,
            live_within=3 * ACCESS_FLUSH_INTERVAL,  # records are rewritten at every flush
        )
        registry.status = StatusPage(registry, node, reactor.seconds)
        return registry_site(RegistryResource(registry), config.access_log, config.http, reactor)

    def startService(self) -> None:
        super().startService()
        for line in [*self.notice, *config_summary(replace(self.config, listen=self.listen)).splitlines()]:
            log.info("{line}", line=line)
        site = self.build_site()
        # Listen first: if that fails the process ends here, with nothing else started yet.
        self.port = self._listen(self.listen, site, "the registry API")
        self._point_clients(self.port)
        if self.config.metrics.listen is not None:
            self.metrics_port = self._listen(self.config.metrics.listen, metrics_site(self.metrics), "/metrics")
        self.kdf.start()
        self.store_io.start()
        self.store_reads.start()
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

    def _listen(self, description: str, site: Site, what: str) -> IListeningPort:
        """Listen on the endpoint, or end the process with one line and exit status 1.

        A process that cannot listen serves nothing, yet a supervisor would think it up. twistd
        calls ``startService`` before it runs the reactor, and Twisted's TCP, SSL and UNIX endpoints
        listen at once, so the failure is known here and ``SystemExit`` ends twistd before the
        reactor starts (twistd would print a traceback for any other exception).
        """
        problem = endpoint_problem(description)
        if problem is not None:
            self._give_up(f"listen {description!r}: {problem}")
        outcome: list[IListeningPort | Failure] = []
        endpoints.serverFromString(self.reactor, description).listen(site).addBoth(outcome.append)
        if not outcome:  # none of Twisted's own endpoint types listens later
            self._give_up(f"the endpoint {description!r} does not listen at once; use tcp:, ssl: or unix:")
        if isinstance(outcome[0], Failure):
            self._give_up(f"cannot listen on {description}: {outcome[0].getErrorMessage()}")
        port = outcome[0]
        address = port.getHost()
        log.info("metahub serving {what} on {host}:{port}", what=what, host=address.host, port=address.port)
        return port

    def _point_clients(self, port: IListeningPort) -> None:
        address = port.getHost()
        if isinstance(address, (IPv4Address, IPv6Address)):
            scheme = "https" if self.listen.startswith("ssl:") else "http"
            host = f"[{address.host}]" if isinstance(address, IPv6Address) else address.host
            log.info("point clients at {url} (e.g. docker pull {where}/library/alpine)",
                     url=f"{scheme}://{host}:{address.port}", where=f"{host}:{address.port}")

    def listen_address(self) -> str:
        if self.port is None:
            return self.listen
        address = self.port.getHost()
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        return f"{self.listen} ({host}:{port})" if host is not None else self.listen

    def _give_up(self, message: str) -> NoReturn:
        if self.port is not None:  # the registry's port, when the metrics port failed
            self.port.stopListening()
        if self.storage is not None:
            self.storage.close()
            self.storage = None
        if self.index_lock is not None:
            self.index_lock.release()
            self.index_lock = None
        for pool in (self.store_io, self.store_reads):
            if pool is not None:
                pool.stop()
        raise SystemExit(f"metahub: {message}")

    async def flush_access(self) -> None:
        """Write batched last-access times: the index here, the blob files' mtimes (for the
        cluster's eviction) in a thread. Files found gone were evicted elsewhere: forget them."""
        storage = self.storage
        storage.index.flush_access()
        hits, misses = self.metrics.hits_and_misses()
        record = NodeRecord(self.node_name, self.reactor.seconds(), hits, misses)
        try:
            storage.forget(*await self.in_thread(storage.stamps.flush, storage.blobs, self.reactor.seconds()))
            await self.in_thread(self.node_records.write, record)
        except OSError as error:  # a full or read-only store: an error here would end the flush loop
            log.warn("could not write access times or this node's record to the store: {error}", error=error)

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

    def _make_room(self) -> None:
        """The store refused a file: collect now rather than at the next interval (if bounded)."""
        if self.config.storage.max_size is None:
            log.warn("the store is full and storage.max_size is not set: nothing is evicted to make room")
            return
        ensureDeferred(self.collect())

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
            self.capacity.retry()
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
        for port in (self.port, self.metrics_port):
            if port is not None:
                await port.stopListening()
        if self.kdf is not None:
            self.kdf.stop()  # waits for at most the KDF runs in progress (tens of ms each)
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
        for pool in (self.store_io, self.store_reads):
            if pool is not None:
                pool.stop()
