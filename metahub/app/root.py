"""The composition root: the one place that builds the server's parts and hands them down.

:class:`Root` builds each part once, on first use, and gives every constructor what it needs by
keyword. The server (:mod:`metahub.app.service`), ``metahub prefetch`` and ``metahub inspect`` all
take their parts from a root, so the three cannot drift apart (the ``metahub cache`` commands work
on the store alone, through :mod:`storage`). Building is lazy because of twistd: it may fork after ``makeService``, and an LMDB
environment must not cross a fork, so the store opens when a service first asks for it (in
``startService``), never when the root is made.
"""
from __future__ import annotations

import socket
from functools import cached_property
from typing import Any

from twisted.web.server import Site

from metahub.app.jobs import StoreJobs
from metahub.app.ports import PortService, listen_backlog
from metahub.cache.blobs import BlobCache
from metahub.cache.capacity import StoreCapacity
from metahub.cache.downloads import Downloads
from metahub.cache.manifests import Manifests
from metahub.cache.virtual import VirtualImages
from metahub.config.file import Config
from metahub.runtime.lane import LanePool, default_workers
from metahub.runtime.memory import Releaser
from metahub.runtime.metrics import Metrics
from metahub.runtime.pools import ThreadPoolRunner, default_io_threads
from metahub.runtime.threads import BoundedPool
from metahub.upstream.client import UpstreamClient, make_http_clients
from metahub.upstream.upstreams import Upstreams
from metahub.web.api import Registry, RegistryResource
from metahub.web.auth import Authenticator, load_token_key
from metahub.web.blobs import Blobs
from metahub.web.metrics_port import metrics_site
from metahub.web.site import registry_site
from metahub.web.status import NodeFacts, StatusPage
from storage import IndexLock, Leases, SharedTags, Storage
from storage.nodes import NodeRecords

#: How often batched last-access times (and this node's record) are written to the store.
ACCESS_FLUSH_INTERVAL = 30.0


class Root:
    """Every part of a metahub process, each built once when first asked for.

    ``listen`` is the registry's endpoint (the server's; the config's by default). ``collects``:
    whether a store that refused a file starts a collection at once (the server; not a prefetch,
    which closes the store when it is done, under a collection that might still run).
    """

    def __init__(self, *, config: Config, reactor: Any = None, listen: str | None = None,
                 collects: bool = False) -> None:
        self.config = config
        self.listen = listen or config.listen
        self.collects = collects
        self._reactor = reactor
        self._index_lock: IndexLock | None = None
        # Stable across restarts, so the shared store's nodes/ holds one record per node, not per process.
        self.node_name = config.node_id or socket.gethostname()

    @property
    def reactor(self) -> Any:
        # Imported on first use: twistd installs the reactor it was asked for while parsing its
        # options, and a test hands in its own.
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # --- the store: opened on first use, closed by close() -----------------------------------

    def open_store(self) -> Storage:
        """Take this server's share of the index lock, then open the store.

        The lock is shared with the other servers on this index; ``metahub cache reindex`` takes it
        alone, so this raises :class:`storage.IndexInUse` while a reindex runs.
        """
        if self._index_lock is None:
            self._index_lock = IndexLock(self.config.storage.index, exclusive=False)
        return self.storage

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.config.storage.path, self.config.storage.index, clock=self.reactor.seconds)

    def close(self) -> None:
        """Close the store if it was opened, and let go of the index lock if it was taken."""
        index_writes = vars(self).pop("index_writes", None)  # where cached_property keeps what it built
        if index_writes is not None:
            index_writes.stop()  # its last writes are done before the index closes
        storage = vars(self).pop("storage", None)
        if storage is not None:
            storage.close()
        if self._index_lock is not None:
            self._index_lock.release()
            self._index_lock = None
        for name in ("in_thread", "store_reads", "lanes"):  # our own pools' threads would outlive the process
            pool = vars(self).pop(name, None)
            if pool is not None:
                pool.stop()

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.config.storage.path, node=self.node_name, clock=self.reactor.seconds)

    @cached_property
    def shared_tags(self) -> SharedTags:
        return SharedTags(self.config.storage.path)

    @cached_property
    def node_records(self) -> NodeRecords:
        return NodeRecords(self.config.storage.path)

    @cached_property
    def capacity(self) -> StoreCapacity:
        return StoreCapacity(
            clock=self.reactor, metrics=self.metrics, make_room=self._make_room if self.collects else None,
        )

    def _make_room(self) -> None:
        self.jobs.make_room()

    @cached_property
    def jobs(self) -> StoreJobs:
        return StoreJobs(
            config=self.config, storage=self.storage, leases=self.leases, shared_tags=self.shared_tags,
            node_records=self.node_records, capacity=self.capacity, metrics=self.metrics,
            in_thread=self.in_thread, index_writes=self.index_writes, clock=self.reactor, node_name=self.node_name,
        )

    # --- threads, metrics, upstreams ---------------------------------------------------------

    @property
    def io_threads(self) -> int:
        """Threads of each store pool: ``storage.io_threads``, else sized from the cores."""
        return self.config.storage.io_threads or default_io_threads()

    @cached_property
    def in_thread(self) -> ThreadPoolRunner:
        """Store I/O (opens, stats, leases, directories) on threads of its own: a stalled mount
        costs these, not the reactor's pool, which also resolves upstream host names."""
        return ThreadPoolRunner(self.reactor, self.io_threads, "metahub-store")

    @cached_property
    def index_writes(self) -> ThreadPoolRunner:
        """Every write of the node's index, in order, on one thread: each commit waits for an
        fdatasync, which the reactor must not; one thread keeps the writes in the order made."""
        return ThreadPoolRunner(self.reactor, 1, "metahub-index")

    @cached_property
    def store_reads(self) -> ThreadPoolRunner:
        """Reads of blob files already open, never queued behind opens a stalled store holds up."""
        return ThreadPoolRunner(self.reactor, self.io_threads, "metahub-store-reads")

    @cached_property
    def lanes(self) -> LanePool:
        """The downloads' hashing and writing: a few threads shared by every download, each
        download's jobs in order (:mod:`metahub.runtime.lane`)."""
        threads = self.config.storage.write_threads or default_workers()
        pool = LanePool(reactor=self.reactor, threads=threads, name="metahub-write")
        self.metrics.write_workers_busy.set_function(lambda: pool.busy)
        self.metrics.write_jobs_queued.set_function(lambda: pool.queued)
        return pool

    @cached_property
    def kdf(self) -> BoundedPool:
        """The logins' own few threads: a flood of them never queues ahead of blob reads."""
        logins = self.config.logins
        return BoundedPool(reactor=self.reactor, threads=logins.kdf_threads, queue=logins.kdf_queue, name="metahub-kdf")

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics()

    @cached_property
    def upstreams(self) -> Upstreams:
        configured = self.config.upstreams
        http = make_http_clients(self.reactor, list(configured.values()))
        clients = {
            name: UpstreamClient(config=upstream, http=http[name], clock=self.reactor)
            for name, upstream in configured.items()
        }
        return Upstreams(clients=clients, metrics=self.metrics)

    # --- the cache ---------------------------------------------------------------------------

    @cached_property
    def downloads(self) -> Downloads:
        return Downloads(
            storage=self.storage, upstreams=self.upstreams, clock=self.reactor, in_thread=self.in_thread,
            index_writes=self.index_writes, metrics=self.metrics, leases=self.leases, lanes=self.lanes.lane,
            lease_timeout=self.config.storage.lease_timeout, capacity=self.capacity,
        )

    @cached_property
    def manifests(self) -> Manifests:
        return Manifests(
            storage=self.storage, upstreams=self.upstreams, clock=self.reactor, in_thread=self.in_thread,
            index_writes=self.index_writes, metrics=self.metrics, tag_ttl=self.config.tag_ttl, shared_tags=self.shared_tags,
            capacity=self.capacity,
        )

    @cached_property
    def virtual(self) -> VirtualImages:
        return VirtualImages(self.config)

    @cached_property
    def blob_cache(self) -> BlobCache:
        return BlobCache(
            storage=self.storage, upstreams=self.upstreams, downloads=self.downloads, clock=self.reactor,
            in_thread=self.in_thread, index_writes=self.index_writes, read_in_thread=self.store_reads,
            metrics=self.metrics,
        )

    # --- the HTTP face -----------------------------------------------------------------------

    @cached_property
    def blobs(self) -> Blobs:
        return Blobs(
            cache=self.blob_cache, clock=self.reactor, metrics=self.metrics, releaser=Releaser(self.reactor),
            read_in_thread=self.store_reads, fds=self.reactor,
        )

    @cached_property
    def authenticator(self) -> Authenticator:
        return Authenticator(
            config=self.config, key=load_token_key(self.config.storage.path), clock=self.reactor.seconds,
        )

    @cached_property
    def registry(self) -> Registry:
        registry = Registry(
            config=self.config, upstreams=self.upstreams, manifests=self.manifests, blobs=self.blobs,
            metrics=self.metrics, auth=self.authenticator, in_thread=self.kdf, virtual=self.virtual,
        )
        node = NodeFacts(
            name=self.node_name, started=self.reactor.seconds(), listen=self.registry_port.address,
            storage=self.storage, records=self.node_records,
            live_within=3 * ACCESS_FLUSH_INTERVAL,  # records are rewritten at every flush
        )
        # The page reads the registry, which serves the page: wired once both exist.
        registry.status = StatusPage(registry=registry, node=node, clock=self.reactor.seconds)
        return registry

    @cached_property
    def resource(self) -> RegistryResource:
        return RegistryResource(self.registry)

    @cached_property
    def site(self) -> Site:
        config = self.config
        return registry_site(resource=self.resource, access_log=config.access_log, limits=config.http,
                             reactor=self.reactor)

    # --- the listening ports -----------------------------------------------------------------

    @cached_property
    def registry_port(self) -> PortService:
        return PortService(description=self.listen, factory=lambda: self.site, what="the registry API",
                           reactor=self.reactor, backlog=listen_backlog(), announce=True)

    @cached_property
    def metrics_port(self) -> PortService | None:
        """``metrics.listen``'s port, if set: /metrics alone, for monitoring."""
        description = self.config.metrics.listen
        if description is None:
            return None
        return PortService(description=description, factory=lambda: metrics_site(self.metrics), what="/metrics",
                           reactor=self.reactor, backlog=listen_backlog())
