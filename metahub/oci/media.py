"""Manifest media types: what they are, what a client accepts, what a manifest references."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
#: What we ask upstreams for: everything we can serve, lists first so a tag is never resolved
#: upstream to one platform behind our back.
UPSTREAM_ACCEPT = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST]

#: Manifests larger than this are refused (distribution uses the same bound); they are held in memory.
MAX_MANIFEST_SIZE = 4 << 20


@dataclass(frozen=True)
class Manifest:
    """A manifest byte for byte as upstream serves it; ``digest`` has been checked against ``body``.

    ``media_type`` is what upstream's ``Content-Type`` said, or, when it said nothing, what the
    manifest itself says (:func:`sniff_media_type`).
    """

    body: bytes
    media_type: str
    digest: str


def parse_accept(headers: list[str]) -> frozenset[str] | None:
    """Media types in ``Accept`` headers; None when the client accepts anything."""
    types: frozenset[str] = frozenset()
    for header in headers:
        listed = _accept_header(header)
        if listed is None:
            return None
        types |= listed
    return types or None


@lru_cache(maxsize=256)
def _accept_header(header: str) -> frozenset[str] | None:
    """One ``Accept`` value's media types; None for a wildcard. A client sends the same value on
    every request, so it is split once (bounded: a client may also vary it)."""
    types: set[str] = set()
    for item in header.split(","):
        media_type = item.split(";")[0].strip().lower()
        if media_type in ("*/*", "application/*"):
            return None
        if media_type:
            types.add(media_type)
    return frozenset(types)


def acceptable(media_type: str, accepted: frozenset[str] | None) -> bool:
    return accepted is None or media_type in accepted


def sniff_media_type(body: bytes) -> str:
    """The media type a manifest declares, or the one its shape implies (``mediaType`` is optional)."""
    doc = load(body)
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def load(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def references(body: bytes) -> list[str]:
    """Digests a manifest points at (config, layers, child manifests, subject): linked to its repo."""
    doc = load(body)
    found: list[str] = []
    descriptors: list[Any] = [doc.get("config"), doc.get("subject")]
    for key in ("layers", "manifests", "blobs"):
        value = doc.get(key)
        if isinstance(value, list):
            descriptors.extend(value)
    for descriptor in descriptors:
        if isinstance(descriptor, dict) and isinstance(descriptor.get("digest"), str):
            found.append(descriptor["digest"])
    return found
