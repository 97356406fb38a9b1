"""Scenario 8: one huge layer (4 GiB, as CUDA and ML images carry), cold then cached (issue 14);
and the curl figures of scenario 1, which are read the same way (against ``os.sendfile``).

The scenario runs on servers of its own (upstream, counting relays, metahub with the bench's
accounts, distribution) in a directory of its own, removed when it ends: four copies of a 4 GiB
blob (upstream, both caches, a verified download in smoke runs) are not left on the disk for
the scenarios after it. Free space is checked first.

Cold: one ``curl -o /dev/null`` per proxy, each through its relay; then, once both have stored
the blob, cached: curl from metahub, distribution and ``bench/sendfile_server.py`` serving
metahub's own copy, alternating who goes first each round. Peak RSS (VmHWM, reset before each
phase) covers each phase whole, storing included.
"""
from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tests.peers.registry import Registry
from tests.peers.relay import Relay

from . import curl
from .blobs import PushedBlob, push_random_blob
from .servers import (
    DistributionServer,
    MetahubServer,
    SendfileServer,
    peak_rss_mb,
    reset_peak_rss,
)

if TYPE_CHECKING:
    from .run import Bench, Row

HUGE_REPO = "bench/huge"
RSS_LIMIT_MB = 100.0
GiB = 1 << 30
#: Of metahub's generated configuration, what points at the main run's store and upstream.
_OWN_KEYS = ("storage", "upstreams", "default_upstream")


class _Stores(Protocol):
    name: str

    def blob_path(self, digest: str) -> Path: ...


def wait_stored(server: _Stores, blob: PushedBlob, timeout: float = 300.0) -> None:
    """Until ``server`` has the whole blob on disk (distribution stores after the client has it)."""
    stored = server.blob_path(blob.digest)
    deadline = time.monotonic() + timeout
    while not (stored.exists() and stored.stat().st_size == blob.size):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} never stored the blob at {stored}")
        time.sleep(0.1)


def curl_download(bench: Bench, base_url: str, blob: PushedBlob,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One ``curl -o /dev/null`` of ``blob`` (logged in as the bench's user unless ``headers`` are
    given, outside the timed part); verified through a scratch file in smoke runs."""
    from .run import login_headers

    settings = bench.settings
    if headers is None:
        headers = login_headers(base_url, bench.load_user, blob.repository)
    transfer = curl.download(base_url + blob.path(), headers, settings.client_timeout, blob.size,
                             blob.digest if settings.verify else None, bench.workdir / "curl-scratch")
    return transfer.as_dict()


def sendfile_row(label: str, mbps: dict[str, float | None]) -> Row:
    """Metahub and distribution with curl, against the sendfile server with curl: >= 0.9x."""
    from .run import Row, _fmt

    m, d, s = mbps["metahub"], mbps["distribution"], mbps["sendfile"]
    reference = f"sendfile {_fmt(s)} (m/s {m / s:.2f})" if m and s else f"sendfile {_fmt(s)}"
    return Row(label, "MB/s", m, d, reference, ">= 0.9x sendfile",
               None if m is None or s is None else m >= 0.9 * s)


def mbps_of(samples: list[dict[str, Any]]) -> float | None:
    from .run import _median

    return _median([sample["bytes"] / sample["total"] / 1e6 for sample in samples])


def _check_disk(directory: Path, size: int) -> None:
    needed = 4 * size + GiB
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise RuntimeError(f"scenario 8 needs {needed / GiB:.1f} GiB free in {directory}, "
                           f"{free / GiB:.1f} GiB are (try a smaller --huge-mb)")


def scenario_huge(bench: Bench) -> None:
    from .run import Row, _fmt, login_headers

    settings = bench.settings
    size = settings.huge_mib << 20
    bench.log(f"scenario 8: one {settings.huge_mib} MiB layer, cold then cached")
    root = bench.workdir / "scenario-8"
    root.mkdir(parents=True, exist_ok=True)
    _check_disk(root, size)
    overlay = {key: value for key, value in bench.metahub.config.items() if key not in _OWN_KEYS}
    try:
        with ExitStack() as stack:
            upstream = stack.enter_context(Registry(root / "upstream"))
            relays = {who: stack.enter_context(Relay(upstream.url)) for who in ("metahub", "distribution")}
            metahub = MetahubServer(root / "metahub", relays["metahub"].url, overlay)
            stack.callback(metahub.stop)
            distribution = DistributionServer(root / "distribution", relays["distribution"].url)
            stack.callback(distribution.stop)
            servers: dict[str, Any] = {"metahub": metahub, "distribution": distribution}
            blob = push_random_blob(upstream.host, HUGE_REPO, size)
            headers = {who: login_headers(server.url, bench.load_user, HUGE_REPO) for who, server in servers.items()}

            for server in servers.values():
                reset_peak_rss(server.pid)
            for who in bench.order(0):
                bench.attempt(f"scenario 8 cold, {who}", lambda: bench.sample(
                    "8cold", who, curl_download(bench, servers[who].url, blob, headers[who])))
            for server in servers.values():
                wait_stored(server, blob)
            for who, server in servers.items():
                bench.sample("rss8cold", who, peak_rss_mb(server.pid))
                bench.sample("8upstream", who, relays[who].bytes_by_path[blob.path()] / blob.size)

            sendfile = SendfileServer(metahub.blob_path(blob.digest), root / "sendfile")
            stack.callback(sendfile.stop)
            urls = {"metahub": metahub.url, "distribution": distribution.url, "sendfile": sendfile.url}
            headers["sendfile"] = {}
            for server in servers.values():
                reset_peak_rss(server.pid)
            for number in range(settings.rounds):
                for who in bench.order(number) + ["sendfile"]:
                    bench.attempt(f"scenario 8 cached, {who}, round {number + 1}", lambda: bench.sample(
                        "8cached", who, curl_download(bench, urls[who], blob, headers[who])))
            for who, server in servers.items():
                bench.sample("rss8cached", who, peak_rss_mb(server.pid))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = bench.results.rows
    total = {who: [sample["total"] for sample in bench.values("8cold", who)] for who in servers}
    m, d = (min(total[who], default=None) for who in ("metahub", "distribution"))
    rows.append(Row(f"8 one {settings.huge_mib} MiB layer, cold pull", "s", m, d,
                    "", "", None))
    rows.append(sendfile_row(f"8 one {settings.huge_mib} MiB layer, cached, curl",
                             {who: mbps_of(bench.values("8cached", who)) for who in urls}))
    for phase in ("cold", "cached"):
        m, d = (max(bench.values(f"rss8{phase}", who), default=None) for who in ("metahub", "distribution"))
        rows.append(Row(f"8 peak RSS, {phase} phase", "MB", m, d, "", f"metahub < {RSS_LIMIT_MB:.0f} MB",
                        None if m is None else m < RSS_LIMIT_MB))
    multiples = {who: max(bench.values("8upstream", who), default=None) for who in servers}
    bench.results.notes.append(
        "scenario 8: servers of its own (fresh processes, removed afterwards); cold pull once per proxy "
        "(metahub first), both through a Python counting relay; "
        f"upstream bytes metahub {_fmt(multiples['metahub'])}x, distribution {_fmt(multiples['distribution'])}x "
        "the layer")
