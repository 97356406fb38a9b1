"""Manifests through the cache: by digest forever, by tag for ``tag_ttl`` and then revalidated.

Manifests are blobs in the store (verified by digest like any blob) with their media type in the
index. A tag maps to a digest in the index with the time upstream last confirmed it. When that is
older than ``tag_ttl`` a HEAD upstream revalidates it; when upstream cannot answer (down, 5xx, rate
limited) the last known digest is served and a warning logged, which is what keeps pulls working
through an upstream outage. Confirmed tags are also written to the shared store directory, so when
upstream is unreachable any node can serve a tag that any node resolved. That write happens after
the answer, never before it: a stalled shared directory must not hold up a pull the local index can
serve, and a tag whose write is still pending is not written again (one stuck thread per tag at most).

A store that cannot take the manifest (full, read-only, failing: :mod:`metahub.cache.capacity`) does not
fail the request: the body upstream sent, already checked against its digest, is served and kept
only in the bounded memory cache.
"""
from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from metahub.cache.capacity import StoreCapacity, store_error
from metahub.cache.routing import Route
from metahub.hardware.machine import MachineType
from metahub.hardware.resolve import resolve
from metahub.oci import errors, media
from metahub.oci.grammar import is_digest_reference
from metahub.oci.media import Manifest
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.upstreams import Upstreams, unavailable
from storage import (
    BlobNotFound,
    BlobWriteError,
    Index,
    SharedTags,
    Storage,
    TagRecord,
    sha256_digest,
)

log = Logger()


def read_stored(storage: Storage, digest: str) -> bytes | None:
    """The stored manifest ``digest``, or None when the store lacks it or it is too big to be one."""
    try:
        with storage.blobs.open(digest) as reader:
            if reader.size > media.MAX_MANIFEST_SIZE:
                return None
            return reader.read(reader.size)
    except BlobNotFound:
        return None


def _write_blob(storage: Storage, digest: str, body: bytes) -> None:
    if storage.blobs.stat(digest) is not None:  # content-addressed: the same digest, the same bytes
        return
    with storage.blobs.writer(digest, len(body)) as writer:
        writer.write(body)
        writer.commit()


def _index_manifest(index: Index, manifest: Manifest, now: float, repository: str) -> None:
    """Record a stored manifest and link what it references, in one transaction (one fdatasync)."""
    with index.batch() as batch:
        batch.put_blob(manifest.digest, len(manifest.body), now, manifest.media_type, repository)
        batch.link(media.references(manifest.body), repository)


def _index_adopted_tag(index: Index, route: Route, tag: str, known: TagRecord, body: bytes) -> None:
    """Link another node's manifest for a tag to ``route``'s repository and record the tag, in one transaction."""
    with index.batch() as batch:
        batch.link([known.digest, *media.references(body)], route.key)
        batch.set_tag(route.upstream.name, route.repository, tag, known.digest, known.checked)


#: Resolutions remembered per (index digest, machine type): a hot tag costs no re-parse.
_RESOLUTION_CACHE_SIZE = 4096
#: Manifest bodies kept in memory by digest (immutable, so never stale): a hot tag costs no file read.
_BODY_CACHE_BYTES = 16 << 20


class Manifests:
    def __init__(
        self,
        *,
        storage: Storage,
        upstreams: Upstreams,
        clock: IReactorTime,
        in_thread: ThreadRunner,
        index_writes: ThreadRunner,
        metrics: Metrics,
        tag_ttl: float,
        shared_tags: SharedTags,
        capacity: StoreCapacity,
    ) -> None:
        self.storage = storage
        self.capacity = capacity
        self.shared_tags = shared_tags
        self.upstreams = upstreams
        self.clock = clock
        self.in_thread = in_thread
        #: Every write of the index, in order, on a thread of its own: each commit waits for the disk.
        self.index_writes = index_writes
        self.metrics = metrics
        self.tag_ttl = tag_ttl
        #: Shared tag writes under way: (upstream, repository, tag) -> the (digest, time) to write next.
        self._sharing: dict[tuple[str, str, str], tuple[str, float] | None] = {}
        self._resolutions: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._bodies: OrderedDict[str, Manifest] = OrderedDict()
        self._body_bytes = 0

    async def get(self, route: Route, reference: str) -> Manifest:
        if is_digest_reference(reference):
            return await self.by_digest(route, reference)
        return await self.by_tag(route, reference)

    def _remember(self, manifest: Manifest) -> None:
        if manifest.digest in self._bodies:
            self._bodies.move_to_end(manifest.digest)
            return
        self._bodies[manifest.digest] = manifest
        self._body_bytes += len(manifest.body)
        while self._body_bytes > _BODY_CACHE_BYTES:
            _, dropped = self._bodies.popitem(last=False)
            self._body_bytes -= len(dropped.body)

    async def _cached(self, route: Route, digest: str) -> Manifest | None:
        """The stored manifest, if this repository is known to have it."""
        if not self.storage.index.is_linked(digest, route.key):
            return None
        remembered = self._bodies.get(digest)
        if remembered is not None:
            self._bodies.move_to_end(digest)
            self.storage.record_access(digest, self.clock.seconds())
            return remembered
        body = await self.in_thread(read_stored, self.storage, digest)
        if body is None:
            await self.index_writes(self.storage.forget, digest)
            return None
        record = self.storage.index.get_blob(digest)
        media_type = record.media_type if record and record.media_type else media.sniff_media_type(body)
        self.storage.record_access(digest, self.clock.seconds())
        manifest = Manifest(body, media_type, digest)
        self._remember(manifest)
        return manifest

    async def store(self, route: Route, body: bytes, media_type: str) -> Manifest:
        """Keep a manifest (verified by construction: its digest is computed here) and link what it references."""
        digest = sha256_digest(body)
        manifest = Manifest(body, media_type, digest)
        if not await self._write(digest, body):
            # Not in the store, but this repository's all the same: kept in memory only (bounded),
            # so a client's next request by digest (a virtual index's, too) is still answered.
            self.capacity.bypassed("manifest")
            await self.index_writes(self.storage.index.link, [digest, *media.references(body)], route.key)
            self._remember(manifest)
            return manifest
        now = self.clock.seconds()
        await self.index_writes(_index_manifest, self.storage.index, manifest, now, route.key)
        self._remember(manifest)
        return manifest

    async def _write(self, digest: str, body: bytes) -> bool:
        """Put the manifest in the store; False if the store cannot take it (full, read-only, failing)."""
        if not self.capacity.can_store():
            return False
        try:
            await self.in_thread(_write_blob, self.storage, digest, body)
        except (OSError, BlobWriteError) as failure:
            refused = store_error(failure)
            if refused is None:
                raise
            self.capacity.failed(refused, f"manifest {digest}")
            return False
        self.capacity.stored()
        return True

    async def _fetch(self, route: Route, reference: str) -> Manifest:
        client = self.upstreams.client(route.upstream.name)
        fetched = await client.get_manifest(route.repository, reference, media.UPSTREAM_ACCEPT)
        return await self.store(route, fetched.body, fetched.media_type)

    async def by_digest(self, route: Route, digest: str) -> Manifest:
        cached = await self._cached(route, digest)
        self.metrics.count_lookup("manifest", "hit" if cached else "miss")
        if cached is not None:
            return cached
        return await self._fetch(route, digest)  # the client verifies the body against the digest

    async def by_tag(self, route: Route, tag: str) -> Manifest:
        upstream = route.upstream.name
        known = self.storage.index.get_tag(upstream, route.repository, tag)
        if known is None:  # another node may have resolved it
            known = await self.in_thread(self.shared_tags.read, upstream, route.repository, tag)
            if known is not None:
                await self._adopt(route, tag, known)
        now = self.clock.seconds()
        if known is not None:
            cached = await self._cached(route, known.digest)
            if cached is not None and now - known.checked < self.tag_ttl:
                self.metrics.count_lookup("tag", "hit")
                return cached
            self.metrics.count_lookup("tag", "revalidate")
            try:
                head = await self.upstreams.client(upstream).head_manifest(route.repository, tag, media.UPSTREAM_ACCEPT)
            except errors.RegistryError as error:
                if cached is None or not unavailable(error):
                    raise
                log.warn(
                    "upstream {upstream} unavailable ({status} {code}); serving {repo}:{tag} from cache as {digest}",
                    upstream=upstream, status=error.status, code=error.code, repo=route.repository, tag=tag,
                    digest=known.digest,
                )
                return cached
            if cached is not None and head.digest == known.digest:
                await self._confirmed(route, tag, known.digest, now)
                return cached
            manifest = await self.by_digest(route, head.digest) if head.digest else await self._fetch(route, tag)
        else:
            self.metrics.count_lookup("tag", "miss")
            manifest = await self._fetch(route, tag)
        await self._confirmed(route, tag, manifest.digest, now)
        return manifest

    async def _adopt(self, route: Route, tag: str, known: TagRecord) -> None:
        """A tag another node confirmed for this repository: its manifest and blobs are the repo's,
        and the tag is recorded here too, so the next request does not read the shared copy again."""
        body = await self.in_thread(read_stored, self.storage, known.digest)
        if body is not None:
            await self.index_writes(_index_adopted_tag, self.storage.index, route, tag, known, body)

    async def _confirmed(self, route: Route, tag: str, digest: str, now: float) -> None:
        """Upstream confirmed tag -> digest: remember it here, and for the other nodes after the answer."""
        await self.index_writes(self.storage.index.set_tag, route.upstream.name, route.repository, tag, digest, now)
        if not self.capacity.can_store():
            return  # the other nodes resolve the tag themselves meanwhile
        key = (route.upstream.name, route.repository, tag)
        if key in self._sharing:  # a write of this tag is under way (perhaps stalled): write after it
            self._sharing[key] = (digest, now)
            return
        self._sharing[key] = None
        ensureDeferred(self._share(route, key, digest, now))

    async def _share(self, route: Route, key: tuple[str, str, str], digest: str, now: float) -> None:
        upstream, repository, tag = key
        try:
            while True:
                try:
                    await self.in_thread(self.shared_tags.write, upstream, repository, tag, digest, now)
                except OSError as error:
                    self.capacity.failed(error, f"the shared record of {route.key}:{tag}")
                    return
                later = self._sharing[key]
                if later is None:
                    return
                digest, now = later
                self._sharing[key] = None
        finally:
            del self._sharing[key]

    async def for_machine_type(
        self, route: Route, index: Manifest, machine_type: MachineType, reference: str
    ) -> Manifest:
        """The manifest of ``index`` that fits ``machine_type``, byte for byte as upstream has it."""
        key = (index.digest, machine_type.name)
        digest = self._resolutions.get(key)
        if digest is None:
            digest = resolve(index.body, machine_type, reference).digest
            self._resolutions[key] = digest
            if len(self._resolutions) > _RESOLUTION_CACHE_SIZE:
                self._resolutions.popitem(last=False)
        return await self.by_digest(route, digest)
