"""Virtual images: manifest lists built from a manifest-tool style spec instead of pushed upstream.

The seed built ``qnib/bench`` by pushing four tags and then a list over them with manifest-tool.
With ``virtual_images`` metahub builds that list itself: it fetches each referenced manifest from its
own repository (verified, cached like any manifest), writes an OCI index over them with the platforms
the spec gives, and serves it under the virtual name, where machine types resolve it exactly as an
upstream index. The chosen manifest is served byte for byte; its blobs are fetched from the source
repository it came from, which is why this module remembers, per digest, where it came from.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from metahub.cache.manifests import Manifests
from metahub.cache.routing import Route, route
from metahub.config.file import Config, VirtualEntry, VirtualImage
from metahub.oci import errors, media
from metahub.oci.grammar import split_reference
from metahub.oci.media import Manifest
from metahub.oci.names import is_tag

Fetch = Callable[[Route, str], Awaitable[Manifest]]


def _platform(entry: VirtualEntry) -> dict[str, object]:
    """The OCI index's platform object for an entry (the spec's ``osfeatures`` is ``os.features``)."""
    spec = entry.platform
    platform: dict[str, object] = {"architecture": spec.architecture, "os": spec.os}
    if spec.variant:
        platform["variant"] = spec.variant
    if spec.features:
        platform["features"] = list(spec.features)
    if spec.osfeatures:
        platform["os.features"] = list(spec.osfeatures)
    return platform


async def build_index(config: Config, image: VirtualImage, fetch: Fetch) -> tuple[bytes, dict[str, Route]]:
    """The OCI index for ``image`` and, for every digest it reaches, the source route to fetch it from.

    The index is serialised deterministically, so its digest is stable while the sources are.
    """
    descriptors: list[dict[str, object]] = []
    sources: dict[str, Route] = {}
    for entry in image.manifests:
        name, reference = split_reference(entry.image)
        source = route(config, name)
        manifest = await fetch(source, reference)
        if manifest.media_type in media.INDEX_TYPES:
            raise errors.bad_gateway(
                f"virtual image {image.image}: {entry.image} is itself an index; list single-platform images"
            )
        descriptors.append(
            {"mediaType": manifest.media_type, "digest": manifest.digest, "size": len(manifest.body),
             "platform": _platform(entry)}
        )
        for digest in [manifest.digest, *media.references(manifest.body)]:
            sources.setdefault(digest, source)
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": descriptors}, separators=(",", ":")
    ).encode()
    return body, sources


async def store_index(
    config: Config, image: VirtualImage, manifests: Manifests, target: Route
) -> tuple[Manifest, dict[str, Route]]:
    """Build ``image``'s index, link everything it reaches to ``target``, and keep the index."""
    body, sources = await build_index(config, image, manifests.get)
    await manifests.index_writes(manifests.storage.index.link, list(sources), target.key)
    return await manifests.store(target, body, media.OCI_INDEX), sources


class VirtualImages:
    """The configured virtual images, found by the (route, tag) a client asks for."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._images: dict[tuple[str, str], VirtualImage] = {}
        for image in config.virtual_images:
            name, tag = split_reference(image.image)
            self._images[(route(config, name).key, tag)] = image
        self._repositories = {key for key, _ in self._images}
        self._sources: dict[tuple[str, str], Route] = {}  # (virtual repo key, digest) -> source

    def find(self, target: Route, tag: str) -> VirtualImage | None:
        return self._images.get((target.key, tag))

    def is_virtual(self, target: Route) -> bool:
        return target.key in self._repositories

    def remember(self, target: Route, sources: dict[str, Route]) -> None:
        for digest, source in sources.items():
            self._sources[(target.key, digest)] = source

    def source(self, target: Route, digest: str) -> Route | None:
        """Where a digest seen under the virtual name really lives, once its index was built."""
        return self._sources.get((target.key, digest))

    def images_of(self, target: Route) -> list[VirtualImage]:
        return [image for (key, _), image in self._images.items() if key == target.key]

    async def manifest(self, manifests: Manifests, target: Route, reference: str) -> Manifest:
        """What ``target:reference`` serves: under a virtual name, the image's index (built here and
        kept) or a manifest it reaches (from the repository it comes from); under any other name,
        the upstream's manifest through the cache. The one place that tells the two apart."""
        if not self.is_virtual(target):
            return await manifests.get(target, reference)
        if is_tag(reference):
            image = self.find(target, reference)
            if image is None:
                raise errors.manifest_unknown(reference)
            return await self._build(manifests, target, image)
        return await manifests.by_digest(await self.route_of(manifests, target, reference), reference)

    async def route_of(self, manifests: Manifests, target: Route, digest: str) -> Route:
        """The route to fetch ``digest`` through: under a virtual name the repository it really
        comes from, else ``target`` itself."""
        if not self.is_virtual(target):
            return target
        if self.source(target, digest) is None:
            for image in self.images_of(target):  # after a restart the map is empty: rebuild it
                await self._build(manifests, target, image)
        return self.source(target, digest) or target

    async def _build(self, manifests: Manifests, target: Route, image: VirtualImage) -> Manifest:
        index, sources = await store_index(self.config, image, manifests, target)
        self.remember(target, sources)
        self.remember(target, {index.digest: target})
        return index
