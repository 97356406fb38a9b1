"""Which upstream a client's repository name goes to: a name prefix, ``?ns=``, or the default."""
from __future__ import annotations

from dataclasses import dataclass

from metahub.config.file import Config, UpstreamConfig
from metahub.oci import errors

#: Hosts whose one-segment names live under ``library/`` (Docker Hub's official images).
DOCKER_HUB_HOSTS = frozenset({"registry-1.docker.io", "index.docker.io", "docker.io"})


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


def spellings(config: Config, target: Route) -> tuple[str, ...]:
    """Every name a client may write for ``target``'s repository, for authorization.

    An account's ``repositories`` patterns are matched against these, never against the name as
    the request wrote it: ``?ns=`` and a name prefix both pick the upstream, so a check of the
    written name alone let ``/v2/allowed/x?ns=other`` reach ``other``'s ``allowed/x``. The
    upstream-qualified spelling always counts (``ghcr.io/org/app``); the bare repository counts
    only on the default upstream, and there a Docker Hub official image also without ``library/``.
    """
    names = [f"{target.upstream.name}/{target.repository}"]
    if target.upstream.name == config.default_upstream:
        names.append(target.repository)
        official = target.repository.removeprefix("library/")
        if official != target.repository and "/" not in official and is_docker_hub(target.upstream):
            names.append(official)
    return tuple(names)
