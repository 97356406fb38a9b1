"""The status page at ``/`` (and ``/_metahub/``): one server-rendered HTML page for operators.

Figures come from what the server already keeps (the Prometheus metrics, the config, the store's
``nodes/`` records, each upstream client's last answer) plus a bounded count of pulls per repository.
Everything that touches the store (a scan that may be slow on NFS) runs in a thread and is cached
for a few seconds, so reloading the page costs the store nothing and never stalls the reactor.

:func:`render_page` takes plain data and returns the HTML, every value escaped; the page has no
script and no external asset, and a Content-Security-Policy that would stop any that slipped in.
"""
from __future__ import annotations

import html
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.defer import DeferredLock
from twisted.web.server import Request

from metahub.config.file import format_duration
from metahub.oci import errors
from metahub.oci.sizes import format_size
from metahub.web import login
from metahub.web.auth import ANONYMOUS, SERVICE, Identity
from storage import Storage, stats
from storage.nodes import NodeRecord, NodeRecords

if TYPE_CHECKING:
    from metahub.web.api import Registry

#: How long store figures are reused before the store is scanned again.
FIGURES_TTL = 5.0
#: Repositories the pull counter keeps at most; when full, the less pulled half is forgotten.
PULL_COUNTER_SIZE = 1000
TOP_REPOSITORIES = 10
#: A browser can answer only Basic (the registry's challenge is the Bearer token flow).
BASIC_CHALLENGE = f'Basic realm="{SERVICE}"'
_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # No script may run and nothing may load from elsewhere, even if escaping were ever missed.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
}

#: ``resolve(identity, "NAME[:TAG]")``: the resolve report (metahub/hardware/inspect.py), or a RegistryError.
Resolver = Callable[[Identity, str], Awaitable[dict[str, Any]]]


class PullCounts:
    """Pulls per repository, in bounded memory: only served repositories are counted, and at most
    ``size`` of them are kept (a flood of distinct names evicts only names pulled less)."""

    def __init__(self, size: int = PULL_COUNTER_SIZE) -> None:
        self._size = size
        self._counts: dict[str, int] = {}

    def add(self, repository: str) -> None:
        self._counts[repository] = self._counts.get(repository, 0) + 1
        if len(self._counts) > self._size:
            kept = sorted(self._counts.items(), key=lambda item: item[1], reverse=True)[: self._size // 2]
            self._counts = dict(kept)

    def top(self, n: int = TOP_REPOSITORIES) -> list[tuple[str, int]]:
        return sorted(self._counts.items(), key=lambda item: (-item[1], item[0]))[:n]

    def __len__(self) -> int:
        return len(self._counts)


@dataclass(frozen=True)
class UpstreamRow:
    name: str
    url: str
    default: bool
    last_success: float | None
    last_error: tuple[float, str] | None


@dataclass(frozen=True)
class MachineTypeRow:
    name: str
    platform: str
    features: tuple[str, ...]
    match: str
    accounts: tuple[str, ...]


@dataclass(frozen=True)
class StatusData:
    """Everything the page shows, as plain values (what the unit tests hand to :func:`render_page`)."""

    version: str
    node: str
    now: float
    uptime: float
    listen: str
    store_path: str
    other_nodes: tuple[NodeRecord, ...]
    blob_count: int
    total_bytes: int
    max_size: int | None
    hits: int
    misses: int
    bytes_from_cache: int
    bytes_from_upstream: int
    top_repositories: tuple[tuple[str, int], ...]
    upstreams: tuple[UpstreamRow, ...]
    machine_types: tuple[MachineTypeRow, ...]
    image: str = ""
    resolved: dict[str, Any] | None = None
    resolve_error: str | None = None


@dataclass(frozen=True, kw_only=True)
class NodeFacts:
    """What the service knows about this process, for the page's node section."""

    name: str
    started: float
    listen: Callable[[], str]  # the bound address once listening, else the endpoint description
    storage: Storage
    records: NodeRecords
    live_within: float  # a node record newer than this (seconds) belongs to a live node


@dataclass(frozen=True)
class _StoreFigures:
    blob_count: int
    total_bytes: int
    nodes: tuple[NodeRecord, ...]


def _version() -> str:
    try:
        return metadata.version("metahub")
    except metadata.PackageNotFoundError:
        return "unknown"


class StatusPage:
    """Serves the page; store figures are gathered in a thread, one scan at a time, cached."""

    def __init__(self, registry: Registry, node: NodeFacts, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.node = node
        self.clock = clock
        self.version = _version()
        self._lock = DeferredLock()
        self._figures: tuple[float, _StoreFigures] | None = None

    async def serve(self, request: Request, resolve: Resolver) -> None:
        if request.method not in (b"GET", b"HEAD"):
            raise errors.unsupported(request.method.decode("latin-1"))
        identity = await self._identify(request)
        query = parse_qs(urlsplit(request.uri.decode("latin-1")).query, keep_blank_values=True)
        image = query.get("image", [""])[-1].strip()[:1000]
        resolved, resolve_error, status = None, None, 200
        if image:
            if identity.anonymous and self.registry.auth.enabled:
                raise errors.unauthorized("log in to query resolutions", BASIC_CHALLENGE)
            try:
                resolved = await resolve(identity, image)
            except errors.RegistryError as error:
                resolve_error, status = f"{error.code}: {error.message}", error.status
        data = self.data(await self.figures(), image, resolved, resolve_error)
        body = render_page(data).encode()
        request.setResponseCode(status)
        for header, value in _HEADERS.items():
            request.setHeader(header, value)
        request.setHeader("Content-Length", str(len(body)))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    async def _identify(self, request: Request) -> Identity:
        """The page's login: the registry's accounts, over Basic (what a browser can answer)."""
        auth = self.registry.auth
        if request.getHeader("authorization") is None:
            if not auth.anonymous_allowed:
                raise errors.unauthorized("log in to see the status page", BASIC_CHALLENGE)
            return ANONYMOUS
        try:
            return await login.identify(request, auth, self.registry.in_thread)
        except errors.RegistryError as error:
            error.headers["WWW-Authenticate"] = BASIC_CHALLENGE
            raise

    async def figures(self) -> _StoreFigures:
        """The store's figures, at most ``FIGURES_TTL`` old; concurrent requests share one scan."""
        async with self._lock:
            now = self.clock()
            if self._figures is None or now - self._figures[0] >= FIGURES_TTL:
                self._figures = (now, await self.registry.in_thread(self._scan))
            return self._figures[1]

    def _scan(self) -> _StoreFigures:  # in a thread: the store may be on NFS
        found = stats(self.node.storage.blobs)
        return _StoreFigures(found.blob_count, found.total_bytes, tuple(self.node.records.read_all()))

    def data(
        self, figures: _StoreFigures, image: str = "", resolved: dict[str, Any] | None = None,
        resolve_error: str | None = None,
    ) -> StatusData:
        registry, config, now = self.registry, self.registry.config, self.clock()
        metrics = registry.metrics
        hits, misses = metrics.hits_and_misses()
        served = lambda source: int(  # noqa: E731
            metrics.registry.get_sample_value("metahub_bytes_served_total", {"source": source}) or 0
        )
        others = tuple(
            record for record in figures.nodes
            if record.node != self.node.name and now - record.last_seen <= self.node.live_within
        )
        upstreams = tuple(
            UpstreamRow(name, upstream.url, name == config.default_upstream,
                        registry.upstreams.client(name).last_success, registry.upstreams.client(name).last_error)
            for name, upstream in config.upstreams.items()
        )
        machine_types = tuple(
            MachineTypeRow(
                name,
                "/".join(part for part in (mt.platform.os, mt.platform.architecture, mt.platform.variant) if part),
                mt.features,
                mt.match,
                tuple(account.name for account in config.accounts.values() if name in account.machine_types),
            )
            for name, mt in config.machine_types.items()
        )
        return StatusData(
            version=self.version, node=self.node.name, now=now, uptime=now - self.node.started,
            listen=self.node.listen(), store_path=config.storage.path, other_nodes=others,
            blob_count=figures.blob_count, total_bytes=figures.total_bytes, max_size=config.storage.max_size,
            hits=hits, misses=misses, bytes_from_cache=served("cache"), bytes_from_upstream=served("upstream"),
            top_repositories=tuple(registry.pulls.top()), upstreams=upstreams, machine_types=machine_types,
            image=image, resolved=resolved, resolve_error=resolve_error,
        )


# --- rendering ---------------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
main{padding:8px 24px 24px;max-width:1100px}
section{background:#fff;border:1px solid #d8dbe2;border-radius:6px;margin:16px 0;padding:12px 16px}
h2{font-size:16px;margin:0 0 8px}h3{font-size:15px;margin:14px 0 6px}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
th{font-weight:600;color:#4a5265}code,.mono{font-family:ui-monospace,monospace;font-size:13px;word-break:break-all}
.bar{background:#e3e6ec;border-radius:4px;height:14px;width:100%;max-width:480px;overflow:hidden}
.bar div{background:#3b7ddd;height:100%}.bar .full{background:#d9534f}
.ok{color:#1e7b34}.bad{color:#b02a2a}.muted{color:#6b7385}
input[type=text]{font:inherit;padding:4px 6px;width:360px}button{font:inherit;padding:4px 12px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(moment: float | None, now: float) -> str:
    if moment is None:
        return '<span class="muted">never</span>'
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))
    return f"{_e(stamp)} ({_e(format_duration(max(0, int(now - moment))))} ago)"


def _size(size: int) -> str:
    return f'<span title="{size} bytes">{_e(format_size(size))}</span>'


def _rows(rows: list[list[str]], headings: list[str], empty: str) -> str:
    """A table of already-escaped cells."""
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _node_section(data: StatusData) -> str:
    shared = (
        f"yes: {len(data.other_nodes)} other live node(s)" if data.other_nodes else "no other live node"
    )
    others = _rows(
        [[_e(n.node), _when(n.last_seen, data.now), f"{n.hits}", f"{n.misses}"] for n in data.other_nodes],
        ["node", "last seen", "hits", "misses"], "No other node has written to this store recently.",
    )
    return f"""<section id="node"><h2>Node</h2><table>
<tr><th>node</th><td>{_e(data.node)}</td></tr>
<tr><th>version</th><td id="version">{_e(data.version)}</td></tr>
<tr><th>uptime</th><td id="uptime">{_e(format_duration(max(0, int(data.uptime))))}</td></tr>
<tr><th>listening on</th><td id="listen" class="mono">{_e(data.listen)}</td></tr>
<tr><th>store</th><td id="store-path" class="mono">{_e(data.store_path)}</td></tr>
<tr><th>shared store</th><td id="shared">{_e(shared)}</td></tr>
</table><h3>Other live nodes</h3>{others}</section>"""


def _store_section(data: StatusData) -> str:
    if data.max_size:
        percent = min(100.0, 100.0 * data.total_bytes / data.max_size)
        full = ' class="full"' if percent >= 90 else ""
        bound = (f'{_size(data.total_bytes)} of {_size(data.max_size)} ({percent:.1f}%)'
                 f'<div class="bar" role="img" aria-label="{percent:.1f}% used">'
                 f'<div{full} style="width:{percent:.1f}%"></div></div>')
    else:
        bound = f"{_size(data.total_bytes)} (no <code>storage.max_size</code>: unbounded)"
    lookups = data.hits + data.misses
    ratio = f"{100 * data.hits / lookups:.1f}%" if lookups else "n/a (no lookups yet)"
    top = _rows(
        [[f'<span class="mono">{_e(name)}</span>', f"{count}"] for name, count in data.top_repositories],
        ["repository", "pulls"], "Nothing pulled since this node started.",
    )
    return f"""<section id="store"><h2>Store</h2><table>
<tr><th>size</th><td id="size">{bound}</td></tr>
<tr><th>blobs</th><td id="blob-count">{data.blob_count}</td></tr>
<tr><th>hit ratio</th><td><span id="hit-ratio">{_e(ratio)}</span>:
<span id="hits">{data.hits}</span> hits, <span id="misses">{data.misses}</span> misses (this node, since it started)</td></tr>
<tr><th>upstream bytes saved</th><td id="bytes-saved">{_size(data.bytes_from_cache)} served from the store;
{_size(data.bytes_from_upstream)} streamed from upstreams</td></tr>
</table><h3>Most pulled repositories</h3>{top}</section>"""


def _upstream_section(data: StatusData) -> str:
    rows = []
    for upstream in data.upstreams:
        error = (
            f'<span class="bad">{_when(upstream.last_error[0], data.now)}: {_e(upstream.last_error[1])}</span>'
            if upstream.last_error else '<span class="muted">none</span>'
        )
        name = _e(upstream.name) + (' <span class="muted">(default)</span>' if upstream.default else "")
        success = f'<span class="ok">{_when(upstream.last_success, data.now)}</span>' if upstream.last_success else _when(None, data.now)
        rows.append([name, f'<span class="mono">{_e(upstream.url)}</span>', success, error])
    table = _rows(rows, ["name", "URL", "last success", "last error"], "No upstreams.")
    return f'<section id="upstreams"><h2>Upstreams</h2>{table}</section>'


def _machine_type_section(data: StatusData) -> str:
    rows = [
        [_e(mt.name), f'<span class="mono">{_e(mt.platform)}</span>',
         _e(", ".join(mt.features)) or '<span class="muted">none</span>', _e(mt.match),
         _e(", ".join(mt.accounts)) or '<span class="muted">no account</span>']
        for mt in data.machine_types
    ]
    table = _rows(rows, ["machine type", "platform", "features", "match", "accounts"], "No machine types configured.")
    return f'<section id="machine-types"><h2>Machine types</h2>{table}</section>'


def _resolve_section(data: StatusData) -> str:
    form = (
        '<form method="get" action="/_metahub/"><label>Which build does each machine type get for '
        f'<input type="text" name="image" placeholder="IMAGE:TAG" value="{_e(data.image)}"></label> '
        '<button type="submit">Resolve</button></form>'
    )
    result = ""
    if data.resolve_error is not None:
        result = f'<p class="bad" id="resolve-error">{_e(data.resolve_error)}</p>'
    elif data.resolved is not None:
        report = data.resolved
        entries = _rows(
            [[_e(e["position"]), f'<span class="mono">{_e(e["platform"])}</span>',
              _e(", ".join(e["features"])), f'<code>{_e(e["digest"])}</code>'] for e in report["entries"]],
            ["#", "platform", "features", "digest"], "A single-platform image: no list of builds.",
        )
        choices = _rows(
            [[_e(name), f'<code>{_e(choice["digest"] or "none")}</code>', _e(choice["why"])]
             for name, choice in report["machine_types"].items()],
            ["machine type", "gets", "why"], "No machine types configured.",
        )
        result = (
            f'<p id="resolved"><code>{_e(report["image"])}</code> is <code>{_e(report["digest"])}</code> '
            f'({_e(report["media_type"])})</p><h3>Builds</h3>{entries}<h3>What each machine type gets</h3>{choices}'
        )
    return f'<section id="resolve"><h2>Resolve</h2>{form}{result}</section>'


def render_page(data: StatusData) -> str:
    sections = "".join(
        part(data) for part in (_node_section, _store_section, _upstream_section, _machine_type_section, _resolve_section)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>metahub {_e(data.node)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>metahub on {_e(data.node)}</h1></header><main>{sections}</main></body></html>\n"
    )
