"""The server's periodic work on the store, run by the service tree's timers (:mod:`metahub.app.service`)."""
from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from metahub.cache.capacity import StoreCapacity
from metahub.cache.eviction import run_collection
from metahub.config.file import Config
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from storage import Leases, SharedTags, Storage
from storage.nodes import NodeRecord, NodeRecords
from storage.store import DEFAULT_TEMP_GRACE

log = Logger()

#: A node record silent this long belongs to a node that is gone (renamed, retired).
NODE_RECORD_LIFETIME = 86400.0


class StoreJobs:
    """Writing access times, sweeping crash leftovers, collecting down to ``storage.max_size``."""

    def __init__(
        self, *, config: Config, storage: Storage, leases: Leases, shared_tags: SharedTags,
        node_records: NodeRecords, capacity: StoreCapacity, metrics: Metrics, in_thread: ThreadRunner,
        index_writes: ThreadRunner, clock: IReactorTime, node_name: str,
    ) -> None:
        self.config = config
        self.storage = storage
        self.leases = leases
        self.shared_tags = shared_tags
        self.node_records = node_records
        self.capacity = capacity
        self.metrics = metrics
        self.in_thread = in_thread
        self.index_writes = index_writes  # the index's own thread: each commit waits for the disk
        self.clock = clock
        self.node_name = node_name

    async def flush_access(self) -> None:
        """Write batched last-access times: the index here, the blob files' mtimes (for the
        cluster's eviction) in a thread. Files found gone were evicted elsewhere: forget them."""
        storage = self.storage
        hits, misses = self.metrics.hits_and_misses()
        record = NodeRecord(self.node_name, self.clock.seconds(), hits, misses)
        try:
            await self.index_writes(storage.index.flush_access)
            gone = await self.in_thread(storage.stamps.flush, storage.blobs, self.clock.seconds())
            if gone:
                await self.index_writes(storage.forget, *gone)
            await self.in_thread(self.node_records.write, record)
        except OSError as error:  # a full or read-only store: an error here would end the flush timer
            log.warn("could not write access times or this node's record to the store: {error}", error=error)

    async def tidy(self) -> None:
        """Remove crash leftovers of any node, in a thread (the shared directory may be slow)."""
        # Well above any live writer's silence: temp files grow and leases heartbeat constantly.
        older_than = max(DEFAULT_TEMP_GRACE, 10 * self.config.storage.lease_timeout)
        try:
            removed = await self.in_thread(self.storage.clean_leftovers, self.leases, older_than)
            await self.in_thread(self.node_records.prune, self.clock.seconds() - NODE_RECORD_LIFETIME)
        except Exception:
            log.failure("could not sweep the store for crash leftovers")
            return
        if removed:
            log.info("removed {count} files dead writers left in the store", count=removed)

    def make_room(self) -> None:
        """The store refused a file: collect now rather than at the next interval (if bounded)."""
        if self.config.storage.max_size is None:
            log.warn("the store is full and storage.max_size is not set: nothing is evicted to make room")
            return
        ensureDeferred(self.collect())

    async def collect(self) -> None:
        """One collection attempt; the cluster lease makes it a no-op while another node collects."""
        try:
            result = await self.in_thread(
                run_collection, self.config, self.storage, self.leases, self.shared_tags, self.clock.seconds()
            )
        except Exception:
            log.failure("collection failed")
            return
        if result is None:
            return
        try:
            await self.index_writes(self.storage.forget, *result.removed)
        except Exception:
            log.failure("could not drop the evicted blobs from the index")  # the next lookup finds them gone
        if result.removed:
            self.capacity.retry()
            log.info(
                "evicted {count} blobs ({size} bytes); store now {after} bytes",
                count=len(result.removed), size=result.removed_bytes, after=result.after_bytes,
            )
