"""A long-lived store, made up for scenario 9: images committed through ``storage``'s API, not HTTP.

Each image is one manifest, one config and :data:`LAYERS_PER_IMAGE` layers (ten blobs) plus one
tag, so 10^5 blobs come with 10^4 tags, the shape of issue 14. What metahub itself records for a
pulled image is recorded here, with the same calls: every blob committed (verified, fsynced,
renamed) with ``store.blobs.writer``, put in the index with its repository link (the manifest with
its media type), the tag set in the index and written to the shared tag records. Tags are
confirmed "now", so a server started on the store answers them without asking the upstream.

Blobs are tiny (tens of bytes): what grows with the store here is the number of files and index
entries, not bytes; ``cache verify`` then measures its per-blob cost, not the disk's read rate.

Files are committed by worker processes (several fsyncs in flight, and no GIL shared with the
index writer) while the calling process writes the index: LMDB wants one writer, and it writes
through ``Index.batch``, as ``cache reindex`` does, so a transaction (and its fsync) holds
``storage.BATCH_RECORDS`` records, not one. The time spent in index calls, and the transactions
committed, are measured on their own, so a slow index shows as a rate, not a guess. Workers are spawned, not forked: the harness has threads (the relays) a fork would copy
mid-flight.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import dataclass

from storage import BlobStore, IndexBatch, SharedTags, Storage, sha256_digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYERS_PER_IMAGE = 8
BLOBS_PER_IMAGE = LAYERS_PER_IMAGE + 2  # layers, config, manifest
#: Tags spread over this many repositories (``bench/store/r00`` ...), 100 tags each at 10^4 tags.
REPOSITORIES = 100
#: Committing processes: commits wait on fsync, so more than the two cores help.
COMMIT_PROCESSES = 4
#: Images per task handed to a committing process.
CHUNK = 16


@dataclass(frozen=True)
class Image:
    repository: str
    tag: str
    manifest: bytes
    blobs: tuple[tuple[str, bytes, str | None], ...]  # (digest, bytes, media type), manifest last

    @property
    def digest(self) -> str:
        return self.blobs[-1][0]


def image(number: int) -> Image:
    """Image ``number`` of the made-up store: the same bytes, hence digests, every time."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "bench": number}).encode()
    layers = [f"metahub bench store image {number} layer {layer}\n".encode() for layer in range(LAYERS_PER_IMAGE)]

    def descriptor(media_type: str, body: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": sha256_digest(body), "size": len(body)}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST, "config": descriptor(CONFIG, config),
        "layers": [descriptor(LAYER, layer) for layer in layers],
    }).encode()
    blobs: list[tuple[str, bytes, str | None]] = [(sha256_digest(body), body, None) for body in (*layers, config)]
    blobs.append((sha256_digest(manifest), manifest, MANIFEST))
    return Image(f"bench/store/r{number % REPOSITORIES:02d}", f"t{number}", manifest, tuple(blobs))


@dataclass
class FillTiming:
    images: int = 0
    blobs: int = 0
    seconds: float = 0.0  # wall time of the fill
    index_seconds: float = 0.0  # of which the calling thread spent in index calls
    index_transactions: int = 0  # committed write transactions (each BATCH_RECORDS records)
    index_records: int = 0  # blobs and tags written to the index

    @property
    def blobs_per_second(self) -> float:
        return self.blobs / self.seconds if self.seconds else 0.0

    @property
    def index_transactions_per_second(self) -> float:
        return self.index_transactions / self.index_seconds if self.index_seconds else 0.0

    @property
    def index_records_per_second(self) -> float:
        return self.index_records / self.index_seconds if self.index_seconds else 0.0


class StoreFiller:
    """Grows the store at ``store_path`` (index at ``index_path``) for upstream ``upstream``.

    Opens the store for each :meth:`fill_to` and closes it after, so a server or the ``metahub``
    CLI can open the index in between.
    """

    def __init__(self, store_path: str, index_path: str, upstream: str) -> None:
        self.store_path = store_path
        self.index_path = index_path
        self.upstream = upstream
        self.images = 0
        self.timing = FillTiming()

    @property
    def blobs(self) -> int:
        return self.images * BLOBS_PER_IMAGE

    def fill_to(self, blobs: int) -> None:
        """Add images until the store holds at least ``blobs`` blobs."""
        wanted = -(-blobs // BLOBS_PER_IMAGE)
        if wanted <= self.images:
            return
        started = time.monotonic()
        store = Storage(self.store_path, self.index_path)
        context = multiprocessing.get_context("spawn")
        try:
            with context.Pool(COMMIT_PROCESSES, _open_worker, (self.store_path, self.upstream)) as pool, \
                    store.index.batch() as batch:
                committed = pool.imap(_commit, range(self.images, wanted), chunksize=CHUNK)
                for made in committed:  # in order; a failed commit raises here
                    self._index(batch, made)
                    self.images += 1
                started_last = time.monotonic()
                batch.commit()  # the last, partial batch, timed with the others
                self.timing.index_seconds += time.monotonic() - started_last
                self.timing.index_transactions += batch.transactions
        finally:
            store.close()
        self.timing.images = self.images
        self.timing.blobs = self.blobs
        self.timing.seconds += time.monotonic() - started

    def _index(self, batch: IndexBatch, made: Image) -> None:
        started = time.monotonic()
        now = time.time()
        key = f"{self.upstream}/{made.repository}"  # metahub's Route.key: the link's repository
        for digest, body, media_type in made.blobs:
            batch.put_blob(digest, len(body), now, media_type=media_type, repository=key)
        batch.set_tag(self.upstream, made.repository, made.tag, made.digest, checked=now)
        self.timing.index_seconds += time.monotonic() - started
        self.timing.index_records += len(made.blobs) + 1



# In each committing process: its blob store, shared tags and upstream name (set by _open_worker).
_worker: tuple[BlobStore, SharedTags, str] | None = None


def _open_worker(store_path: str, upstream: str) -> None:
    global _worker
    _worker = (BlobStore(store_path), SharedTags(store_path), upstream)


def _commit(number: int) -> Image:
    """Commit image ``number``'s blobs and write its shared tag record (in a committing process)."""
    assert _worker is not None
    blobs, shared, upstream = _worker
    made = image(number)
    for digest, body, _ in made.blobs:
        with blobs.writer(digest, len(body)) as writer:
            writer.write(body)
            writer.commit()
    shared.write(upstream, made.repository, made.tag, made.digest, time.time())
    return made
