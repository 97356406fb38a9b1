"""Scenario 7: a thousand concurrent connections on a cached manifest by tag (issue 14).

Hundreds of nodes asking one cache at the same moment: ``wrk -c 1000`` (two threads) on
``GET /v2/bench/app/manifests/1.0``, metahub logged in as a machine type as in scenario 3, against
a distribution proxy pointed straight at the upstream (scenario 3 says why). Figures: requests/s,
p99 latency, and errors: wrk's socket errors (connect, read, write, timeout) plus non-2xx answers,
every one a node whose pull failed or stalled.

A thousand connections need a thousand descriptors in wrk and in each server: the harness raises
its own soft RLIMIT_NOFILE to the hard limit before it starts the servers (they inherit it), and
wrk raises its own in ``preexec_fn``, whatever the harness was started with.
"""
from __future__ import annotations

import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tests.peers import skopeo
from tests.peers.oci import INDEX, make_bench_index

from .load import LoadError, parse_wrk
from .servers import DistributionServer

if TYPE_CHECKING:
    from .run import Bench

WRK_THREADS = 2
#: An answer slower than this is a timeout error, not a latency (wrk's default): wrk 4.1 counts it
#: as a timeout instead of in the histogram, so slow answers show in the errors. A request still
#: unanswered when the run ends is counted nowhere by wrk; ``unanswered`` bounds those from below.
WRK_TIMEOUT_S = 2
SETTLE_LIMIT_S = 120.0
#: An answer this fast means the server is no longer busy with an earlier round's requests.
SETTLED_ANSWER_S = 0.5


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


@dataclass(frozen=True)
class ManyResult:
    requests_per_second: float
    p99_ms: float
    requests: int
    connect: int
    read: int
    write: int
    timeout: int
    non_2xx: int
    #: Connections that got no answer at all, at least: fewer answers than connections means some
    #: connections waited the whole run (each answer is on one connection).
    unanswered: int

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.non_2xx


def parse_errors(output: str) -> tuple[int, int, int, int, int]:
    """wrk's socket errors (connect, read, write, timeout) and its non-2xx/3xx count."""
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    connect, read, write, timeout = (int(n) for n in socket_errors.groups()) if socket_errors else (0, 0, 0, 0)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return connect, read, write, timeout, int(non_2xx.group(1)) if non_2xx else 0


def wrk_many(url: str, headers: dict[str, str], connections: int, seconds: float) -> ManyResult:
    binary = shutil.which("wrk")
    if binary is None:
        raise LoadError("scenario 7 needs wrk (a Python client cannot hold 1000 connections busy)")
    duration = max(1, round(seconds))
    argv = [binary, "--latency", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{duration}s",
            "--timeout", f"{WRK_TIMEOUT_S}s"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    completed = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60,
                               stdin=subprocess.DEVNULL, preexec_fn=raise_fd_limit)
    if completed.returncode != 0:
        raise LoadError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    load = parse_wrk(completed.stdout)
    # No request finished in the whole run: wrk prints a p99 of 0; the truth is "longer than the run".
    p99 = load.p99_ms if load.requests else duration * 1e3
    return ManyResult(load.requests_per_second, p99, load.requests, *parse_errors(completed.stdout),
                      unanswered=max(0, connections - load.requests))


def settle(get: Callable[[], int], limit: float = SETTLE_LIMIT_S) -> float:
    """Until one request is answered with 200 (``get`` returns the status) within
    :data:`SETTLED_ANSWER_S`: the seconds that took.

    A server that queued up work in one round (distribution goes on revalidating upstream for
    connections wrk has closed) is let finish it first, so every round starts from a server that
    answers; how long that took is in the note.
    """
    started = time.monotonic()
    while True:
        try:
            asked = time.monotonic()
            if get() == 200 and time.monotonic() - asked < SETTLED_ANSWER_S:
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > limit:
            raise RuntimeError(f"the server did not answer one request within {limit:.0f} s after a round")
        time.sleep(0.2)


def _ensure_app_image(bench: Bench, path: str) -> None:
    """Scenario 3's index in the upstream, pushed unless scenario 3 already did."""
    from .run import APP_REPO, APP_TAG, _get

    status, _, _ = _get(bench.upstream.url + path, {"Accept": INDEX}, "HEAD")
    if status == 200:
        return
    layout = bench.workdir / "layout-7"
    make_bench_index(layout, APP_TAG, layers=[1000])
    skopeo.push(layout, APP_TAG, f"{bench.upstream.host}/{APP_REPO}:{APP_TAG}")


def _round(url: str, headers: dict[str, str], connections: int, seconds: float) -> dict[str, Any]:
    from .run import _get

    settled = settle(lambda: _get(url, headers)[0])
    return {**asdict(wrk_many(url, headers, connections, seconds)), "settle_s": settled}


def scenario_connections(bench: Bench) -> None:
    from .run import APP_REPO, APP_TAG, Row, _get, _median

    settings = bench.settings
    connections = settings.many_connections
    bench.log(f"scenario 7: manifest by tag, {connections} connections")
    path = f"/v2/{APP_REPO}/manifests/{APP_TAG}"
    _ensure_app_image(bench, path)
    direct = DistributionServer(bench.workdir / "distribution-direct-7", bench.upstream.url)
    bench.stack.callback(direct.stop)
    targets = {"metahub": bench.metahub, "distribution": direct}
    headers = {who: bench._load_headers(who, server.url) for who, server in targets.items()}
    for who, server in targets.items():  # warm: the tag is cached in both before the clock starts
        status, _, body = _get(server.url + path, headers[who])
        if status != 200:
            raise RuntimeError(f"scenario 7: {who} answered {status} to GET {path}: {body[:200]!r}")
    servers, bench.servers = bench.servers, dict(targets)
    try:
        with bench.server_use("7"):
            for number in range(settings.rounds):
                for who in bench.order(number):
                    bench.attempt(f"scenario 7, {who}, round {number + 1}", lambda: bench.sample(
                        "7", who, _round(targets[who].url + path, headers[who], connections,
                                         settings.many_seconds)))
    finally:
        bench.servers = servers
        direct.stop()
    results = {who: [ManyResult(**{key: value for key, value in sample.items() if key != "settle_s"})
                     for sample in bench.values("7", who)] for who in targets}
    settled = {who: max((sample["settle_s"] for sample in bench.values("7", who)), default=0.0)
               for who in targets}
    rps = {who: _median([r.requests_per_second for r in results[who]]) for who in targets}
    p99 = {who: _median([r.p99_ms for r in results[who]]) for who in targets}
    errors = {who: max((float(r.errors) for r in results[who]), default=None) for who in targets}
    m, d = rps["metahub"], rps["distribution"]
    rows = bench.results.rows
    rows.append(Row(f"7 manifest by tag, {connections} conns", "req/s", m, d, "", ">= 3x dist",
                    None if m is None or d is None else m >= 3 * d))
    m, d = p99["metahub"], p99["distribution"]
    rows.append(Row(f"7 manifest by tag, {connections} conns, p99", "ms", m, d, "", "<= dist",
                    None if m is None or d is None else m <= d))
    m, d = errors["metahub"], errors["distribution"]
    rows.append(Row(f"7 manifest by tag, {connections} conns, errors", "worst round", m, d, "", "0",
                    None if m is None else m == 0))
    m, d = (max((float(r.unanswered) for r in results[who]), default=None) for who in targets)
    rows.append(Row(f"7 manifest by tag, {connections} conns, unanswered", "conns, at least", m, d, "", "0",
                    None if m is None else m == 0))

    def breakdown(who: str) -> str:
        worst = max(results[who], key=lambda r: r.errors, default=None)
        if worst is None:
            return "-"
        return (f"connect {worst.connect}, read {worst.read}, write {worst.write}, timeout {worst.timeout}, "
                f"non-2xx {worst.non_2xx} of {worst.requests}")

    rss = {who: max(bench.values("rss7", who), default=None) for who in targets}
    stalled = [who for who in targets if any(r.requests == 0 for r in results[who])]
    if stalled:
        bench.results.notes.append(f"scenario 7: no request to {' or '.join(stalled)} finished within a run; "
                                   "its p99 is shown as the run's length (a lower bound)")
    bench.results.notes.append(
        f"scenario 7: wrk -t{WRK_THREADS} -c{connections} -d{max(1, round(settings.many_seconds))}s "
        f"--timeout {WRK_TIMEOUT_S}s; "
        f"fd limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; worst round's errors, metahub: "
        f"{breakdown('metahub')}; distribution: {breakdown('distribution')}; peak RSS metahub "
        f"{rss['metahub'] or 0:.0f} MB, distribution {rss['distribution'] or 0:.0f} MB; before each round one "
        f"request had to be answered (longest wait: metahub {settled['metahub']:.1f} s, distribution "
        f"{settled['distribution']:.1f} s)")
