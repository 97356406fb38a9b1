"""metahub against distribution's registry in proxy mode, side by side: ``python -m bench.run``.

One run starts a docker-registry upstream seeded with test blobs, a counting relay in front of it
for each proxy (so each one's upstream traffic is counted on its own), metahub and docker-registry
in proxy mode, both with their access logs off where they can be, then runs the scenarios of
issue 6 against both, alternating which goes first, and prints one table. See bench/README.md.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.peers import skopeo
from tests.peers.oci import INDEX, MANIFEST, make_bench_index
from tests.peers.registry import Registry
from tests.peers.relay import Relay

from . import (
    machine,
    scenario_connections,
    scenario_huge,
    scenario_image,
    scenarios_store,
)
from .blobs import PushedBlob, push_random_blob
from .load import LoadResult, run_load
from .profile import Profiler, py_spy, summarise
from .servers import (
    DistributionServer,
    MetahubServer,
    SendfileServer,
    cpu_seconds,
    missing_programs,
    peak_rss_mb,
    reset_peak_rss,
)

MiB = 1 << 20
ACCEPT = ", ".join([INDEX, MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])
BIG_REPO = "bench/big"
COLD_REPO = "bench/cold"
APP_REPO = "bench/app"
APP_TAG = "1.0"
RSS_LIMIT_MB = 100.0


# --- settings ----------------------------------------------------------------------------------

@dataclass
class Settings:
    cached_mib: int = 1024
    cold_mib: int = 200
    clients: int = 20
    connections: int = 16
    load_seconds: float = 10.0
    load_threads: int = 1
    rounds: int = 3
    verify: bool = False  # hash every downloaded body (smoke runs)
    client_timeout: float = 120.0
    user: str | None = None  # ACCOUNT-TYPE:PASSWORD metahub is logged in as for scenario 3
    anonymous: bool = False
    metahub_overlay: dict[str, Any] = field(default_factory=dict)
    profile_dir: Path | None = None
    scenarios: tuple[str, ...] = ("1", "2", "3", "5", "6", "7", "8", "9", "10")
    # scenario 6 (bench/scenario_image.py)
    image_layers: int = 48
    layer_mib: int = 8
    image_clients: int = 8
    layer_parallel: int = 4
    # scenario 7 (bench/scenario_connections.py)
    many_connections: int = 1000
    many_seconds: float = 5.0
    # scenario 8 (bench/scenario_huge.py)
    huge_mib: int = 4096
    # scenario 9 (bench/scenarios_store.py)
    store_blobs: int = 100_000  # blobs in the filled store
    store_steps: tuple[float, ...] = (0.1, 0.5, 1.0)  # the fractions of it the cache commands are timed at


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        settings = Settings(cached_mib=16, cold_mib=8, clients=20, load_seconds=1.0, rounds=1,
                            verify=True, client_timeout=30.0)
    else:
        settings = Settings()
    if args.quick:  # scenarios 6-8: small blobs, but still 8 clients and 1000 connections
        settings.image_layers, settings.layer_mib, settings.many_seconds, settings.huge_mib = 8, 1, 1.0, 32
    if args.huge_mib is not None:
        settings.huge_mib = args.huge_mib
    for name in ("cached_mib", "cold_mib", "clients", "connections", "rounds", "load_seconds"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.quick:
        settings.store_blobs, settings.store_steps = 2000, (0.5, 1.0)  # two spans, as a full run judges
    if args.store_blobs is not None:
        settings.store_blobs = args.store_blobs
    settings.user = args.user
    settings.anonymous = args.anonymous
    if args.metahub_config:
        settings.metahub_overlay = yaml.safe_load(Path(args.metahub_config).read_text()) or {}
    settings.profile_dir = Path(args.profile).resolve() if args.profile else None
    if args.scenarios:
        chosen = tuple(part.strip() for part in args.scenarios.split(",") if part.strip())
        unknown = [part for part in chosen if part not in Settings.scenarios]
        if unknown:
            raise SystemExit(f"bench: no scenario {', '.join(unknown)} (choose from "
                             f"{','.join(Settings.scenarios)}; 4 is the peak RSS of the others)")
        settings.scenarios = chosen
    return settings


# --- results -----------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table; ``metahub``/``distribution`` are None when that run failed."""

    scenario: str
    unit: str
    metahub: float | None
    distribution: float | None
    reference: str  # the other figure a target compares with, e.g. "sendfile 1850"
    target: str
    met: bool | None  # None: no target for this row, or a figure is missing
    distribution_applies: bool = True  # False: distribution has nothing to compare ("-", not "error")

    @property
    def ratio(self) -> float | None:
        if self.metahub is None or not self.distribution:
            return None
        return self.metahub / self.distribution


@dataclass
class Results:
    settings: dict[str, Any]
    machine: dict[str, str]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    profiles: dict[str, list[str]] = field(default_factory=dict)


def _fmt(value: float | None) -> str:
    if value is None:
        return "error"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


HEADER = ("scenario", "unit", "metahub", "distribution", "ratio m/d", "reference", "target", "met?")


def table(rows: list[Row]) -> str:
    cells = [HEADER] + [
        (row.scenario, row.unit, _fmt(row.metahub), _fmt(row.distribution) if row.distribution_applies else "-",
         "-" if row.ratio is None else f"{row.ratio:.2f}", row.reference or "-", row.target or "-",
         "-" if row.met is None else ("yes" if row.met else "NO"))
        for row in rows
    ]
    widths = [max(len(line[column]) for line in cells) for column in range(len(HEADER))]
    lines = []
    for number, line in enumerate(cells):
        lines.append(" | ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
        if number == 0:
            lines.append("-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def report(results: Results) -> str:
    out = ["", "machine: " + "; ".join(f"{key} {value}" for key, value in results.machine.items())]
    out += [f"note: {note}" for note in results.notes]
    out += ["", table(results.rows)]
    for problem in results.problems:
        out.append(f"PROBLEM: {problem}")
    for name, lines in results.profiles.items():
        out += ["", f"py-spy profile of metahub, {name}:", *lines]
    return "\n".join(out)


# --- clients -----------------------------------------------------------------------------------

def _fetch_command(url: str, clients: int, sha256: str | None, timeout: float,
                   headers: dict[str, str]) -> list[str]:
    argv = [sys.executable, "-m", "bench.fetch", url, "--clients", str(clients), "--timeout", str(timeout)]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    return argv + (["--sha256", sha256] if sha256 else [])


def _client_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _check_download(result: dict[str, Any], blob: PushedBlob, what: str) -> None:
    if result["status"] != 200 or result["bytes"] != blob.size:
        raise RuntimeError(f"{what}: status {result['status']}, {result['bytes']} of {blob.size} bytes")
    if result.get("sha256_ok") is False:
        raise RuntimeError(f"{what}: the body does not match {blob.digest}")


@dataclass(frozen=True)
class Client:
    """Runs ``bench.fetch``: ``verify`` hashes every body, ``timeout`` is how long a server may
    stay silent before a download fails (a hung server fails the scenario, never the harness)."""

    verify: bool
    timeout: float
    #: The login the clients answer a challenge with (None: an anonymous token when challenged).
    user: str | None = None

    def _run(self, base_url: str, blob: PushedBlob, clients: int, what: str) -> list[dict[str, Any]]:
        # Outside the timed part: a server with accounts challenges every request without a login.
        headers = login_headers(base_url, self.user, blob.repository)
        completed = subprocess.run(
            _fetch_command(base_url + blob.path(), clients, blob.digest if self.verify else None, self.timeout,
                           headers),
            capture_output=True, text=True, env=_client_env(), timeout=self.timeout * 10,
            stdin=subprocess.DEVNULL)
        results = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
        if completed.returncode != 0 or len(results) != clients:
            raise RuntimeError(f"{what}: {clients - len(results)} of {clients} clients failed: "
                               f"{completed.stderr.strip()[-500:]}")
        for result in results:
            _check_download(result, blob, what)
        return results

    def download(self, base_url: str, blob: PushedBlob, what: str) -> dict[str, Any]:
        """One client downloading ``blob`` from ``base_url``: its timings."""
        return self._run(base_url, blob, 1, what)[0]

    def fan_in(self, base_url: str, blob: PushedBlob, clients: int, what: str) -> tuple[float, float]:
        """``clients`` clients request ``blob`` at the same instant: seconds until the last has it,
        and how late the last one started (on two cores, twenty clients cannot all run at once)."""
        results = self._run(base_url, blob, clients, what)
        start_at = results[0]["start_at"]
        wall = max(result["end"] for result in results) - start_at
        late = max(result["start"] for result in results) - start_at
        if late > wall / 2:
            raise RuntimeError(f"{what}: the last client started {late * 1e3:.0f} ms late, the transfer "
                               f"took {wall * 1e3:.0f} ms: the requests did not overlap (machine too busy?)")
        return wall, late


# --- auth ------------------------------------------------------------------------------------

def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    split = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=30)
    try:
        target = split.path + (f"?{split.query}" if split.query else "")
        connection.request(method, target, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _challenge_params(header: str) -> dict[str, str]:
    params = {}
    for part in header.split(" ", 1)[1].split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            params[key.strip().lower()] = value.strip().strip('"')
    return params


def login_headers(base_url: str, user: str | None, repository: str) -> dict[str, str]:
    """The Authorization header a registry client would send after answering ``/v2/``'s challenge.

    Basic when challenged for Basic (or not challenged at all), else a token from the Bearer realm,
    fetched with the Basic credentials, as docker and skopeo do. Without a ``user``, an anonymous
    token from the realm when challenged, else nothing.
    """
    basic = "Basic " + base64.b64encode(user.encode()).decode() if user is not None else None
    # HEAD: the sendfile reference answers every GET with its whole file.
    status, headers, _ = _get(base_url + "/v2/", {}, "HEAD")
    challenge = headers.get("www-authenticate", "")
    if status != 401 or not challenge.lower().startswith("bearer"):
        return {"Authorization": basic} if basic else {}
    params = _challenge_params(challenge)
    query = urllib.parse.urlencode({"service": params.get("service", ""),
                                    "scope": f"repository:{repository}:pull"})
    realm = params["realm"]
    if realm.startswith("/"):
        realm = base_url + realm
    status, _, body = _get(f"{realm}?{query}", {"Authorization": basic} if basic else {})
    if status != 200:
        raise RuntimeError(f"the token realm {realm} answered {status}: {body[:200]!r}")
    answer = json.loads(body)
    return {"Authorization": "Bearer " + (answer.get("token") or answer["access_token"])}


def metahub_auth_overlay(user: str) -> dict[str, Any]:
    """An account and machine type for ``--user ACCOUNT-TYPE:PASSWORD`` (hash via the metahub CLI)."""
    login, _, password = user.partition(":")
    account, _, machine_type = login.partition("-")
    cli = Path(sys.executable).parent / "metahub"
    completed = subprocess.run([str(cli), "hash-password"], input=password + "\n",
                               capture_output=True, text=True)
    hashed = next((word for word in completed.stdout.split() if word.startswith("scrypt$")), None)
    if completed.returncode != 0 or hashed is None:
        raise SystemExit("bench: `metahub hash-password` did not print a hash; pass the account "
                         "with --metahub-config FILE instead")
    overlay: dict[str, Any] = {"accounts": {account: {"password_hash": hashed}}}
    if machine_type:
        overlay["machine_types"] = {machine_type: {
            "platform": {"os": "linux", "architecture": "amd64"},
            "features": ["cpu:broadwell", "nvcap:5.2"]}}
        overlay["accounts"][account]["machine_types"] = [machine_type]
    return overlay


# --- the run -----------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, settings: Settings, workdir: Path, stack: ExitStack, log: Callable[[str], None]) -> None:
        self.settings = settings
        self.workdir = workdir
        self.stack = stack
        self.log = log
        self.results = Results(settings={k: str(v) for k, v in asdict(settings).items()
                                         if k not in ("metahub_overlay", "user")},
                               machine=machine.describe())
        self.samples: dict[str, dict[str, list[Any]]] = {}
        self.client = Client(settings.verify, settings.client_timeout)

    # setup

    def start(self) -> None:
        self.log("starting the upstream registry, relays, metahub and distribution")
        self.upstream = self.stack.enter_context(Registry(self.workdir / "upstream"))
        self.relay_metahub = self.stack.enter_context(Relay(self.upstream.url))
        self.relay_distribution = self.stack.enter_context(Relay(self.upstream.url))
        self.relay_direct = self.stack.enter_context(Relay(self.upstream.url))
        overlay = dict(self.settings.metahub_overlay)
        if self.settings.user is None:
            self.settings.user = f"bench-amd64:{secrets.token_urlsafe(12)}"
        # --anonymous still configures the account: with accounts, metahub challenges anonymous
        # clients too, and they answer with an anonymous token, so that path is what is measured.
        self.load_user = None if self.settings.anonymous else self.settings.user
        self.client = Client(self.settings.verify, self.settings.client_timeout, self.load_user)
        if "accounts" not in overlay:
            overlay = {**overlay, **metahub_auth_overlay(self.settings.user)}
        self.metahub = MetahubServer(self.workdir / "metahub", self.relay_metahub.url, overlay)
        self.stack.callback(self.metahub.stop)
        self.distribution = DistributionServer(self.workdir / "distribution", self.relay_distribution.url)
        self.stack.callback(self.distribution.stop)
        self.servers = {"metahub": self.metahub, "distribution": self.distribution}
        self.relays = {"metahub": self.relay_metahub, "distribution": self.relay_distribution}
        notes = self.results.notes
        notes.append(f"metahub access log: {'off' if self.metahub.access_log_off else 'ON (metahub has no access_log setting yet)'}; "
                     "distribution access log: off")
        notes.append(f"sizes: cached blob {self.settings.cached_mib} MiB, cold blobs {self.settings.cold_mib} MiB, "
                     f"{self.settings.clients} fan-in clients, {self.settings.connections} connections x "
                     f"{self.settings.load_seconds:g} s for small requests, {self.settings.rounds} round(s) per scenario "
                     "(figures are medians)")
        notes.append("MB = 10^6 bytes; upstream fetches go through a counting Python relay "
                     "(the 'direct' reference of scenario 5 too)")
        with open("/proc/loadavg") as loadavg:
            notes.append(f"load average before the run: {' '.join(loadavg.read().split()[:3])} "
                         "(anything else running on the machine makes the figures noisy)")

    def order(self, round_number: int) -> list[str]:
        return ["metahub", "distribution"] if round_number % 2 == 0 else ["distribution", "metahub"]

    def sample(self, scenario: str, who: str, value: Any) -> None:
        self.samples.setdefault(scenario, {}).setdefault(who, []).append(value)

    def values(self, scenario: str, who: str, key: str | None = None) -> list[float]:
        found = self.samples.get(scenario, {}).get(who, [])
        return [item[key] if key else item for item in found]

    @contextmanager
    def server_use(self, scenario: str) -> Iterator[None]:
        """Peak RSS and CPU time of both servers over one scenario."""
        cpu_before = {}
        for who, server in self.servers.items():
            reset_peak_rss(server.pid)
            cpu_before[who] = cpu_seconds(server.pid)
        yield
        for who, server in self.servers.items():
            self.sample(f"rss{scenario}", who, peak_rss_mb(server.pid))
            self.sample(f"cpu{scenario}", who, cpu_seconds(server.pid) - cpu_before[who])

    def attempt(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # one failed measurement must not lose the others
            self.results.problems.append(f"{what}: {error}")
            self.log(f"  FAILED {what}: {error}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()

    # scenario 1

    def scenario_cached(self) -> None:
        settings = self.settings
        self.log(f"scenario 1: seeding a {settings.cached_mib} MiB blob and caching it in both proxies")
        self.big = push_random_blob(self.upstream.host, BIG_REPO, settings.cached_mib * MiB)
        for who, server in self.servers.items():
            self.client.download(server.url, self.big, f"caching the big blob in {who}")
        # distribution stores a proxied blob in a goroutine of its own, after the client has it.
        for who, server in self.servers.items():
            stored = server.blob_path(self.big.digest)
            deadline = time.monotonic() + 120
            while not (stored.exists() and stored.stat().st_size == self.big.size):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{who} never stored the cached blob at {stored}")
                time.sleep(0.1)
        fetched_before = {who: relay.blob_gets(BIG_REPO, self.big.digest) for who, relay in self.relays.items()}
        path = self.metahub.blob_path(self.big.digest)
        sendfile = SendfileServer(path, self.workdir / "sendfile")
        self.stack.callback(sendfile.stop)
        with self.server_use("1"):
            for number in range(settings.rounds):
                for who in self.order(number) + ["sendfile"]:
                    url = sendfile.url if who == "sendfile" else self.servers[who].url
                    self.attempt(f"scenario 1, {who}, round {number + 1}", lambda: self.sample(
                        "1", who, self.client.download(url, self.big, f"scenario 1 {who}")))
                    self.attempt(f"scenario 1 curl, {who}, round {number + 1}", lambda: self.sample(
                        "1curl", who, scenario_huge.curl_download(self, url, self.big)))
        for who, relay in self.relays.items():
            fetched = relay.blob_gets(BIG_REPO, self.big.digest) - fetched_before[who]
            if fetched:
                self.results.problems.append(f"scenario 1: {who} fetched the cached blob from upstream "
                                             f"{fetched} more times while timed")
        self.results.samples["1-upstream-gets-to-cache"] = fetched_before
        mbps = {who: _median([r["bytes"] / r["total"] / 1e6 for r in self.values("1", who)])
                for who in ("metahub", "distribution", "sendfile")}
        m, d, s = mbps["metahub"], mbps["distribution"], mbps["sendfile"]
        met = None if None in (m, d, s) else (m >= 2.0 * d and m >= 0.8 * s)
        self.results.rows.append(Row(
            f"1 cached {settings.cached_mib} MiB blob, 1 client", "MB/s", m, d,
            f"sendfile {_fmt(s)} (m/s {m / s:.2f})" if m and s else f"sendfile {_fmt(s)}",
            ">=2.0x dist, >=0.8x sendfile", met))
        self.results.rows.append(scenario_huge.sendfile_row(
            f"1 cached {settings.cached_mib} MiB blob, curl",
            {who: scenario_huge.mbps_of(self.values("1curl", who)) for who in ("metahub", "distribution", "sendfile")}))

    # scenario 2

    def scenario_fan_in(self) -> None:
        settings = self.settings
        self.log(f"scenario 2: {settings.clients} clients, one cold {settings.cold_mib} MiB blob")
        with self.server_use("2"):
            for number in range(settings.rounds):
                for who in self.order(number):
                    self.attempt(f"scenario 2, {who}, round {number + 1}", lambda: self._fan_in_once(who))
        m = _median(self.values("2", "metahub", "wall"))
        d = _median(self.values("2", "distribution", "wall"))
        self.results.rows.append(Row(
            f"2 cold fan-in, {settings.clients} clients x {settings.cold_mib} MiB", "s wall", m, d, "",
            "<= dist", None if None in (m, d) else m <= d))
        m = _median(self.values("2", "metahub", "upstream"))
        d = _median(self.values("2", "distribution", "upstream"))
        self.results.rows.append(Row(
            "2 cold fan-in, upstream bytes", "x blob", m, d, "",
            "= 1.0x blob", None if m is None else max(self.values("2", "metahub", "upstream")) == 1.0))

    def _fan_in_once(self, who: str, record: bool = True) -> None:
        blob = push_random_blob(self.upstream.host, COLD_REPO, self.settings.cold_mib * MiB)
        wall, late = self.client.fan_in(self.servers[who].url, blob, self.settings.clients,
                                        f"scenario 2 {who}")
        relay = self.relays[who]
        time.sleep(0.2)  # let the relay's last write be counted
        upstream = relay.bytes_by_path[blob.path()] / blob.size
        if record:
            self.sample("2", who, {"wall": wall, "late_start": late, "upstream": upstream,
                                   "upstream_gets": relay.blob_gets(COLD_REPO, blob.digest)})

    # scenario 3

    def scenario_small(self) -> None:
        settings = self.settings
        self.log(f"scenario 3: manifest by tag, {settings.connections} connections")
        layout = self.workdir / "layout"
        make_bench_index(layout, APP_TAG, layers=[1000])
        skopeo.push(layout, APP_TAG, f"{self.upstream.host}/{APP_REPO}:{APP_TAG}")
        path = f"/v2/{APP_REPO}/manifests/{APP_TAG}"
        # distribution revalidates a tag upstream on every request; through the Python relay that
        # hop would be charged to distribution, so its figure here comes from a proxy of its own
        # pointed straight at the upstream (metahub answers from its cache, upstream is idle).
        direct = DistributionServer(self.workdir / "distribution-direct", self.upstream.url)
        self.stack.callback(direct.stop)
        targets = {"metahub": self.metahub.url, "distribution": direct.url, "origin": self.upstream.url}
        servers, self.servers = self.servers, {"metahub": self.metahub, "distribution": direct}
        for who, base in targets.items():
            headers = self._load_headers(who, base)
            status, answer, body = _get(base + path, headers)
            if status != 200:
                raise RuntimeError(f"scenario 3: {who} answered {status} to GET {path}: {body[:200]!r}")
            self.results.samples.setdefault("3-media-type", {})[who] = answer.get("content-type")
        try:
            with self.server_use("3"):
                for number in range(settings.rounds):
                    for who in self.order(number) + ["origin"]:
                        self.attempt(f"scenario 3, {who}, round {number + 1}",
                                     lambda: self.sample("3", who, asdict(self._load(who, targets[who] + path))))
        finally:
            self.servers = servers
            direct.stop()
        rps = {who: _median(self.values("3", who, "requests_per_second")) for who in targets}
        p99 = {who: _median(self.values("3", who, "p99_ms")) for who in targets}
        generators = {r["generator"] for who in targets for r in self.values("3", who)}
        self.results.notes.append(
            f"scenario 3: load from {', '.join(sorted(generators)) or '-'} ({settings.load_threads} thread(s)); "
            f"metahub {'logged in as ' + settings.user.split(':')[0] if self.load_user else 'anonymous (with a token from its realm)'}, "
            f"answering the index tag with {self.results.samples['3-media-type'].get('metahub')} "
            f"(distribution: {self.results.samples['3-media-type'].get('distribution')}); "
            "distribution's proxy for it points straight at the upstream (no relay)")
        m, d, o = rps["metahub"], rps["distribution"], rps["origin"]
        self.results.rows.append(Row(
            f"3 manifest by tag, {settings.connections} conns", "req/s", m, d,
            f"origin {_fmt(o)} (m/o {m / o:.2f})" if m and o else f"origin {_fmt(o)}",
            ">=3x dist, >=1.0x origin", None if None in (m, d, o) else m >= 3 * d and m >= o))
        self.results.rows.append(Row(
            "3 manifest by tag, p99 latency", "ms", p99["metahub"], p99["distribution"],
            f"origin {_fmt(p99['origin'])}", "", None))

    def _load_headers(self, who: str, base: str) -> dict[str, str]:
        headers = {"Accept": ACCEPT}
        if who == "metahub":
            headers.update(login_headers(base, self.load_user, APP_REPO))
        return headers

    def _load(self, who: str, url: str) -> LoadResult:
        base = url.split("/v2/")[0]
        result = run_load(url, self._load_headers(who, base), self.settings.connections,
                          self.settings.load_seconds, self.settings.load_threads)
        if result.errors:
            raise RuntimeError(f"{result.errors} of {result.requests} requests failed")
        return result

    # scenario 5

    def scenario_cold_single(self) -> None:
        settings = self.settings
        self.log(f"scenario 5: one client, one cold {settings.cold_mib} MiB blob")
        with self.server_use("5"):
            for number in range(settings.rounds):
                for who in self.order(number):
                    self.attempt(f"scenario 5, {who}, round {number + 1}", lambda: self._cold_once(who))
        ttfb = {who: _median([r["ttfb"] * 1e3 for r in self.values("5", who)])
                for who in ("metahub", "distribution", "direct")}
        total = {who: _median([r["total"] for r in self.values("5", who)])
                 for who in ("metahub", "distribution", "direct")}
        m, x = ttfb["metahub"], ttfb["direct"]
        self.results.rows.append(Row(
            f"5 cold single pull {settings.cold_mib} MiB, TTFB", "ms", m, ttfb["distribution"],
            f"direct {_fmt(x)}", "<= direct + 50 ms", None if None in (m, x) else m <= x + 50))
        m, x = total["metahub"], total["direct"]
        self.results.rows.append(Row(
            f"5 cold single pull {settings.cold_mib} MiB, total", "s", m, total["distribution"],
            f"direct {_fmt(x)}", "<= 1.1x direct", None if None in (m, x) else m <= 1.1 * x))

    def _cold_once(self, who: str, record: bool = True) -> None:
        blob = push_random_blob(self.upstream.host, COLD_REPO, self.settings.cold_mib * MiB)
        direct = self.client.download(self.relay_direct.url, blob, "scenario 5 direct")
        proxied = self.client.download(self.servers[who].url, blob, f"scenario 5 {who}")
        if record:
            self.sample("5", "direct", direct)
            self.sample("5", who, proxied)

    # scenario 4

    def cpu_note(self) -> None:
        """CPU per unit of work: scenario 1 per GB served, 3 per request, 2, 5 and 10 per round."""
        parts = []
        units = (("1", "s/GB"), ("2", "s per fan-in"), ("3", "us/request"), ("5", "s per pull"), ("10", "s per pull"))
        for scenario, unit in units:
            figures = []
            for who in ("metahub", "distribution"):
                cpu = sum(self.values(f"cpu{scenario}", who))
                done = self.values(scenario, who)
                if not done or not cpu:
                    figures.append("-")
                    continue
                if scenario == "1":
                    work = sum(result["bytes"] for result in done) / 1e9
                elif scenario == "3":
                    work = sum(result["requests"] for result in done) / 1e6
                else:
                    work = len(done)
                figures.append(f"{cpu / work:.2f}" if scenario != "3" else f"{cpu / work:.0f}")
            parts.append(f"{scenario}: {figures[0]} vs {figures[1]} {unit}")
        if parts:
            self.results.notes.append("server CPU (user+sys, all threads), metahub vs distribution: " + "; ".join(parts))

    def rss_rows(self) -> None:
        for scenario in (number for number in ("1", "2", "3", "5") if number in self.settings.scenarios):
            m = max(self.values(f"rss{scenario}", "metahub"), default=None)
            d = max(self.values(f"rss{scenario}", "distribution"), default=None)
            self.results.rows.append(Row(
                f"4 peak RSS during scenario {scenario}", "MB", m, d, "", f"metahub < {RSS_LIMIT_MB:.0f} MB",
                None if m is None else m < RSS_LIMIT_MB))

    # profiles

    def profile(self) -> None:
        directory = self.settings.profile_dir
        assert directory is not None
        directory.mkdir(parents=True, exist_ok=True)
        if py_spy() is None:
            self.results.problems.append("--profile: py-spy is not installed (.venv/bin/pip install py-spy)")
            return
        self.log("profiling metahub with py-spy (extra runs, not part of the figures)")
        repeat = range(max(1, self.settings.rounds))
        runs: dict[str, Callable[[], None]] = {
            "scenario 1 (cached blob)": lambda: [self.client.download(self.metahub.url, self.big, "profile 1")
                                                 for _ in repeat],
            "scenario 2 (cold fan-in)": lambda: self._fan_in_once("metahub", record=False),
            "scenario 3 (manifest by tag)": lambda: self._load(
                "metahub", f"{self.metahub.url}/v2/{APP_REPO}/manifests/{APP_TAG}"),
            "scenario 5 (cold single pull)": lambda: [self._cold_once("metahub", record=False) for _ in repeat],
        }
        for name, action in runs.items():
            if name.split()[1] not in self.settings.scenarios or (name.startswith("scenario 1") and not hasattr(self, "big")):
                continue
            output = directory / (name.split(" (")[0].replace(" ", "-") + ".txt")
            profiler = Profiler(self.metahub.pid, output)
            time.sleep(0.5)  # py-spy attaches
            try:
                self.attempt(f"profile {name}", action)
            finally:
                profiler.stop()
            summary = summarise(output)
            self.results.profiles[name] = summary.lines()
            (directory / (output.stem + "-summary.txt")).write_text("\n".join(summary.lines(40)) + "\n")

    def run(self) -> Results:
        self.start()
        scenarios = {"1": self.scenario_cached, "2": self.scenario_fan_in, "3": self.scenario_small,
                     "5": self.scenario_cold_single}
        scenarios["6"] = lambda: scenario_image.scenario_image(self)
        scenarios["7"] = lambda: scenario_connections.scenario_connections(self)
        scenarios["8"] = lambda: scenario_huge.scenario_huge(self)
        scenarios.update(scenarios_store.register(self, Row))
        for number, scenario in scenarios.items():
            if number in self.settings.scenarios:
                self.attempt(f"scenario {number}", scenario)
        self.rss_rows()
        self.cpu_note()
        with open("/proc/loadavg") as loadavg:
            self.results.notes.append(f"load average after the measurements: {' '.join(loadavg.read().split()[:3])}")
        if self.settings.profile_dir is not None:
            self.profile()
        self.results.samples.update(self.samples)
        return self.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round, 1 s load: the smoke run (under a minute)")
    parser.add_argument("--size-mb", dest="cached_mib", type=int, help="cached blob, MiB (default 1024)")
    parser.add_argument("--cold-mb", dest="cold_mib", type=int, help="cold blobs, MiB (default 200)")
    parser.add_argument("--clients", type=int, help="fan-in clients (default 20)")
    parser.add_argument("--connections", type=int, help="connections for small requests (default 16)")
    parser.add_argument("--seconds", dest="load_seconds", type=float, help="load duration per run (default 10)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario, alternating who goes first (default 3)")
    parser.add_argument("--user", help="ACCOUNT-TYPE:PASSWORD metahub is logged in as for scenario 3 "
                        "(default: a generated bench-amd64 login with its account in the config)")
    parser.add_argument("--anonymous", action="store_true", help="scenario 3 without logging in to metahub")
    parser.add_argument("--metahub-config", help="YAML merged into metahub's generated config (accounts, ...)")
    parser.add_argument("--scenarios", metavar="LIST", help="run only these, e.g. 1,3 (default 1,2,3,5,6,7,8,9,10)")
    parser.add_argument("--huge-mb", dest="huge_mib", type=int, help="scenario 8's layer, MiB (default 4096)")
    parser.add_argument("--store-blobs", type=int, help="blobs in scenario 9's store (default 100000, a tenth as many tags)")
    parser.add_argument("--profile", metavar="DIR", help="also profile metahub with py-spy; stacks go to DIR")
    parser.add_argument("--json", metavar="FILE", help="write every figure and sample as JSON")
    parser.add_argument("--workdir", help="where servers keep their data (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    args = parser.parse_args(argv)

    missing = missing_programs()
    if missing:
        print(f"bench: missing peer programs: {', '.join(missing)} (scripts/test installs them as root)",
              file=sys.stderr)
        return 2
    settings = settings_from(args)
    # Scenario 7's thousand connections need descriptors in the servers, which inherit this limit.
    scenario_connections.raise_fd_limit()
    # A harness stopped with SIGTERM (a test's timeout, a CI runner) still stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="metahub-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    try:
        with ExitStack() as stack:
            results = Bench(settings, workdir, stack, log).run()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results.notes.append(f"run took {time.monotonic() - started:.0f} s")
    print(report(results), flush=True)
    if args.json:
        data = asdict(results)
        for row, raw in zip(data["rows"], results.rows):
            row["ratio"] = raw.ratio
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    if args.keep:
        print(f"\nwork directory kept: {workdir}")
    return 1 if results.problems else 0


if __name__ == "__main__":
    sys.exit(main())
