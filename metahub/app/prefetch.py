"""``metahub prefetch``: warm the (shared) store with an image before a job lands on a node.

It runs the server's own machinery (manifest cache, single-flight downloads under the cluster's
leases) in a short-lived process, so a prefetch and a live pull of the same blob still fetch it
once. With ``--machine-type`` only that build of a multi-platform image is fetched; without, all.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from twisted.internet.task import deferLater

from metahub.app.root import Root
from metahub.cache.capacity import StoreUnavailable
from metahub.cache.downloads import AlreadyStored
from metahub.cache.routing import route
from metahub.hardware.machine import machine_types
from metahub.oci import errors, media
from metahub.oci.grammar import split_reference
from metahub.oci.media import Manifest


@dataclass
class Progress:
    total_bytes: int = 0
    done_bytes: int = 0
    blobs: int = 0
    blobs_done: int = 0


def progress_line(progress: Progress, width: int = 30) -> str:
    fraction = progress.done_bytes / progress.total_bytes if progress.total_bytes else 1.0
    bar = "#" * int(fraction * width)
    mib = 1 << 20
    return (f"[{bar:<{width}}] {fraction:6.1%}  {progress.done_bytes / mib:.1f}/{progress.total_bytes / mib:.1f} MiB"
            f"  {progress.blobs_done}/{progress.blobs} blobs")


async def prefetch(*, root: Root, image: str, machine_type: str | None, out: TextIO = sys.stderr) -> Progress:
    """Fetch ``image``'s blobs into the store ``root`` opens, and close it when done."""
    config = root.config
    name, reference = split_reference(image)
    if machine_type is not None and machine_type not in config.machine_types:
        raise errors.unauthorized(f"unknown machine type {machine_type!r}")
    try:
        storage, manifests, downloads = root.storage, root.manifests, root.downloads
        target = route(config, name)
        top = await root.virtual.manifest(manifests, target, reference)
        images: list[Manifest] = [top]
        if top.media_type in media.INDEX_TYPES:
            if machine_type is not None:
                images = [await manifests.for_machine_type(target, top, machine_types(config.machine_types)[machine_type], image)]
            else:
                images = [await manifests.by_digest(await root.virtual.route_of(manifests, target, d), d)
                          for d in media.references(top.body)]
        layers: dict[str, int] = {}
        for manifest in images:
            doc = media.load(manifest.body)
            for descriptor in [doc.get("config"), *(doc.get("layers") or [])]:
                if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
                    layers[descriptor["digest"]] = int(descriptor.get("size") or 0)
        progress = Progress(total_bytes=sum(layers.values()), blobs=len(layers))
        show = _printer(out, progress)
        for digest, size in layers.items():
            source = await root.virtual.route_of(manifests, target, digest)
            if await root.in_thread(storage.blobs.stat, digest) is None:
                try:
                    download = await downloads.join(source, digest)
                except AlreadyStored:
                    download = None
                except StoreUnavailable as error:  # warming a store that takes nothing: say so
                    raise errors.RegistryError(507, "UNKNOWN", str(error)) from error
                while download is not None and not download.finished.called:
                    show(progress.done_bytes + download.received_bytes)  # 0 while another node fetches
                    await deferLater(root.reactor, 0.2, lambda: None)
                if download is not None and not await download.outcome():
                    raise errors.bad_gateway(f"upstream {source.upstream.name} failed to deliver {digest}")
            progress.done_bytes += size
            progress.blobs_done += 1
            show(progress.done_bytes, final=progress.blobs_done == progress.blobs)
        return progress
    finally:
        root.close()


def _printer(out: TextIO, progress: Progress) -> Callable[..., None]:
    tty = out.isatty()

    def show(done: int, final: bool = False) -> None:
        shown = Progress(progress.total_bytes, min(done, progress.total_bytes), progress.blobs, progress.blobs_done)
        if tty:
            print("\r" + progress_line(shown), end="\n" if final else "", file=out, flush=True)
        elif final or done == progress.done_bytes:
            print(progress_line(shown), file=out, flush=True)

    return show
