"""Repository names, references, and which upstream a request goes to.

Names are checked against the distribution spec's grammar before anything else, and references are
either a tag (spec grammar) or a sha256 digest, so nothing from a URL reaches the filesystem or an
upstream URL unchecked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from storage import is_digest

from . import errors
from .config import Config, UpstreamConfig
from .grammar import MAX_NAME_LENGTH, NAME, TAG

_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

#: Hosts whose one-segment names live under ``library/`` (Docker Hub's official images).
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise errors.name_invalid(name[:MAX_NAME_LENGTH], f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not NAME.fullmatch(name):
        raise errors.name_invalid(name, "invalid repository name: see the distribution spec's name grammar")
    return name


def check_digest(reference: str) -> str:
    """A digest reference: sha256 is served, another well-formed algorithm is refused clearly."""
    if is_digest(reference):
        return reference
    if _ANY_DIGEST.fullmatch(reference) and not reference.startswith("sha256:"):
        raise errors.digest_invalid(reference, "unsupported digest algorithm: only sha256 is accepted")
    raise errors.digest_invalid(reference, "invalid digest: expected sha256: followed by 64 lowercase hex")


def is_tag(reference: str) -> bool:
    return TAG.fullmatch(reference) is not None


def check_reference(reference: str) -> str:
    """A manifest reference: a tag, or a digest (anything with a ``:`` is read as a digest)."""
    if ":" in reference:
        return check_digest(reference)
    if not is_tag(reference):
        raise errors.manifest_unknown(reference, "invalid tag: see the distribution spec's tag grammar")
    return reference


def is_docker_hub(upstream: UpstreamConfig) -> bool:
    return upstream.name == "docker.io" or upstream.host.split(":")[0] in DOCKER_HUB_HOSTS


@dataclass(frozen=True)
class Route:
    """Where a client's repository name goes."""

    upstream: UpstreamConfig
    repository: str  # the name on the upstream, e.g. ``library/alpine``

    @property
    def key(self) -> str:
        """Identity of the repository across upstreams, for the index's repository links."""
        return f"{self.upstream.name}/{self.repository}"


def route(config: Config, name: str, ns: str | None = None) -> Route:
    """Pick the upstream for a (checked) client name.

    ``?ns=HOST`` (containerd's mirror parameter) picks the upstream whose name or URL host is HOST; a
    first path segment equal to an upstream's name picks that upstream; otherwise the default one.
    """
    upstream: UpstreamConfig | None = None
    repository = name
    if ns is not None:
        upstream = next(
            (u for u in config.upstreams.values() if ns in (u.name, u.host, u.host.split(":")[0])), None
        )
        if upstream is None:
            raise errors.name_unknown(name)
    else:
        first, sep, rest = name.partition("/")
        if sep and first in config.upstreams:
            upstream, repository = config.upstreams[first], rest
    if upstream is None:
        upstream = config.upstreams[config.default_upstream]
    if "/" not in repository and is_docker_hub(upstream):
        repository = f"library/{repository}"
    return Route(upstream, repository)
