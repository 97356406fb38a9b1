"""Keeping a (shared) store under ``storage.max_size``: pins, batched access stamps, collection.

Every node stamps the blobs it served (file mtimes, batched) and tries to collect every
``storage.gc_interval``; the cluster-wide ``gc`` lease lets one node at a time do it. Pinned images
(``pin:``) are never evicted: their manifests and every blob they reach are computed from this
node's view of the tags at collection time.
"""
from __future__ import annotations

import errno

from twisted.logger import Logger

from metahub.cache.manifests import read_stored
from metahub.cache.routing import route
from metahub.config.file import Config
from metahub.oci import media
from metahub.oci.grammar import is_digest_reference, split_reference
from storage import (
    GcResult,
    Leases,
    SharedTags,
    Storage,
    collect,
    collect_with_lease,
)

log = Logger()


def pinned_digests(config: Config, storage: Storage, shared_tags: SharedTags) -> set[str]:
    """Every digest the pinned images reach: index, child manifests, configs, layers (blocking I/O)."""
    pinned: set[str] = set()
    for reference in config.pin:
        name, ref = split_reference(reference)
        target = route(config, name)
        if is_digest_reference(ref):
            _reach(storage, ref, pinned)
            continue
        tag = storage.index.get_tag(target.upstream.name, target.repository, ref) or shared_tags.read(
            target.upstream.name, target.repository, ref
        )
        if tag is not None:
            _reach(storage, tag.digest, pinned)
    return pinned


def _reach(storage: Storage, digest: str, seen: set[str]) -> None:
    if digest in seen:
        return
    seen.add(digest)
    body = read_stored(storage, digest)
    if body is None:
        return  # not here, or a layer, not a manifest
    doc = media.load(body)
    if "manifests" in doc or "layers" in doc:
        for child in media.references(body):
            _reach(storage, child, seen)


def run_collection(
    config: Config, storage: Storage, leases: Leases, shared_tags: SharedTags, now: float, dry_run: bool = False
) -> GcResult | None:
    """Collect down to ``storage.max_size`` under the cluster lease; None if another node collects
    (or no bound is configured). Blocking: run it in a thread."""
    if config.storage.max_size is None:
        return None
    pinned = pinned_digests(config, storage, shared_tags)
    if dry_run:
        return collect(storage.blobs, config.storage.max_size, now, config.storage.gc_grace, pinned, dry_run=True)
    try:
        return collect_with_lease(storage.blobs, leases, config.storage.max_size, now, config.storage.gc_grace, pinned)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
    # A full store cannot take even the lease file, and it is when room is needed most. Two
    # collectors at once are safe (they pick the same oldest blobs), only wasteful: collect unleased.
    log.warn("the store is full: collecting without the cluster's gc lease")
    return collect(storage.blobs, config.storage.max_size, now, config.storage.gc_grace, pinned)
