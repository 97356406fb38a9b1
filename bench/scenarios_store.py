"""Scenarios 9 and 10 of issue 14: a long-lived store, and a cold pull against the machine's limit.

:func:`register` hands ``bench.run`` the two scenarios; they print into its one table with the
:class:`~bench.run.Row` type it passes in (this module cannot import ``bench.run``: that module is
``__main__`` under ``python -m bench.run``, and a second copy of it would be imported instead).

Scenario 9 has no distribution figure (its proxy has no index, no ``cache`` commands and no store
of its own to grow): the reference is metahub's own empty store, in the same run.

* A store of ``--store-blobs`` blobs (10^5, with a tenth as many tags) is made by
  :mod:`bench.store_fill` through ``storage``'s API. At a tenth, half and all of it,
  ``metahub cache stats``, ``cache gc`` and ``cache verify`` are timed (best of ``--rounds``), each
  round on the store and on an empty one in turn: what a command costs beyond the empty store's
  run beside it is its work on the blobs, the fixed cost of starting it (half a second) taken in
  the same minute, so a neighbour's load moves both. Linearity is judged on the marginal CPU time
  per 10^4 blobs over two wide spans, zero to half the store and half to all of it (each a
  difference over half the blobs): linear growth gives the same figure twice, quadratic growth
  three times as much over the second half. CPU time, because a shared machine moves wall time by
  tens of percent and CPU time much less; wide spans, because a tenth of the store is a tenth of a
  second of work, and noise dominates it. The tenth is still timed and printed, with each step's
  average from zero and the empty store's time.
  ``gc`` runs with ``max_size: 1`` and the default one-hour grace: every blob is recent, so it
  scans, sorts and walks the whole store and removes nothing (checked), which is what a
  collection costs short of unlinking. The LMDB index's size on disk (allocated blocks) is
  printed per step.
* Two fresh metahubs, one on an empty store and one on the filled store, serve the same image
  index by tag to ``wrk`` (logged in as a machine type, as in scenario 3), alternating rounds;
  requests/s, p99 and each server's CPU time per request.

Scenario 10 pushes one fresh ``--cold-mb`` blob per round and, one after the other with ``sync``
between them so no one's writeback lands on the next: downloads it directly from the upstream
(through its relay, as scenario 5), writes the same bytes to the store's filesystem with
:mod:`bench.write_fsync`, and pulls it cold through metahub and distribution (alternating which
first). The limit of a verified, durable cache is the slower of the direct pull and the write.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.peers import skopeo
from tests.peers.oci import make_bench_index

from .blobs import push_random_blob
from .profile import Profiler, py_spy, summarise
from .servers import (
    METAHUB_CLI,
    DistributionServer,
    MetahubServer,
    cpu_seconds,
    deep_merge,
)
from .store_fill import BLOBS_PER_IMAGE, FillTiming, StoreFiller, image

if TYPE_CHECKING:
    from .run import Bench, Row

MiB = 1 << 20
STORE_APP_REPO = "bench/store-app"
STORE_APP_TAG = "1.0"
LIMIT_REPO = "bench/limit"
CLI_COMMANDS = ("stats", "gc", "verify")
#: ``{command: {"wall": seconds, "cpu": seconds}}``: the best of a step's rounds.
CliTimes = dict[str, dict[str, float]]
#: The marginal CPU time per 10^4 blobs from half the store to all of it may exceed the one from
#: zero to half by this much and still count as linear: on the shared machine each span's figure
#: moves by a fifth or so between runs, and quadratic growth would show as 3x (n log n as 1.06x).
LINEAR_SLACK = 1.5
RATIO_EMPTY_STORE = 0.9
LIMIT_FACTOR = 1.15
TTFB_SLACK_MS = 20.0


def register(bench: Bench, row: type[Row]) -> dict[str, Callable[[], None]]:
    """Scenarios 9 and 10 by number, for ``Bench.run``."""
    scenarios = StoreScenarios(bench, row)
    return {"9": scenarios.big_store, "10": scenarios.machine_limit}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _count(blobs: int) -> str:
    return f"{blobs // 1000}k" if blobs >= 1000 and blobs % 1000 == 0 else str(blobs)


def _disk_mb(directory: Path) -> float:
    """Bytes allocated on disk (not the apparent size) by the files of ``directory``, in MB."""
    return sum(entry.stat().st_blocks * 512 for entry in directory.iterdir() if entry.is_file()) / 1e6


def _cli_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _upstream_blob(storage: Path, digest: str) -> Path:
    """Where docker-registry keeps a blob's bytes under its storage directory."""
    hex_digest = digest.split(":", 1)[1]
    return storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_digest[:2] / hex_digest / "data"


class StoreScenarios:
    def __init__(self, bench: Bench, row: type[Row]) -> None:
        self.bench = bench
        self.row = row

    # scenario 9 ----------------------------------------------------------------------------

    def big_store(self) -> None:
        bench, settings = self.bench, self.bench.settings
        total = settings.store_blobs
        steps = sorted({max(BLOBS_PER_IMAGE, round(total * fraction)) for fraction in settings.store_steps})
        bench.log(f"scenario 9: a store of {total} blobs and {total // BLOBS_PER_IMAGE} tags, "
                  f"cache commands at {', '.join(map(str, steps))} blobs")
        base = bench.workdir / "scenario9"
        full_store, full_index = base / "full" / "store", base / "full" / "index"
        upstream = bench.metahub.config["default_upstream"]
        cli_full = self._cli_config(base / "cli-full.yaml", full_store, full_index)
        cli_empty = self._cli_config(base / "cli-empty.yaml", base / "cli-empty" / "store",
                                     base / "cli-empty" / "index")
        filler = StoreFiller(str(full_store), str(full_index), upstream)
        for command in CLI_COMMANDS:  # untimed: the first runs create the empty store's index and folders
            self._run_cli(command, cli_empty)

        timings: dict[int, CliTimes] = {}
        empty_timings: dict[int, CliTimes] = {}
        index_mb = {}
        for step in steps:
            filler.fill_to(step)
            bench.log(f"  {filler.blobs} blobs: filled at {filler.timing.blobs_per_second:.0f} blobs/s")
            timings[filler.blobs], empty_timings[filler.blobs] = self._time_cli(cli_full, cli_empty)
            index_mb[filler.blobs] = _disk_mb(full_index)
        fill = filler.timing
        bench.results.samples["9-fill"] = asdict(fill)
        bench.results.samples["9-cli-seconds"] = timings
        bench.results.samples["9-cli-empty-seconds"] = empty_timings
        bench.results.samples["9-index-mb"] = index_mb

        self._push_app_image()
        path = f"/v2/{STORE_APP_REPO}/manifests/{STORE_APP_TAG}"
        servers = {"empty": self._metahub(base / "empty", None),
                   "full": self._metahub(base / "full", (full_store, full_index))}
        try:
            for server in servers.values():  # warm: the index, its child manifest, the resolution
                self._get(server.url + path)
            # The last image filled, by its tag: served from the store (the upstream has no such
            # tag), so the fill is what metahub reads.
            last = image(filler.images - 1)
            digest = self._get(f"{servers['full'].url}/v2/{last.repository}/manifests/{last.tag}")
            if digest != last.digest:
                raise RuntimeError(f"the filled store answered {last.repository}:{last.tag} with {digest!r}")
            for number in range(settings.rounds):
                order = ["empty", "full"] if number % 2 == 0 else ["full", "empty"]
                for who in order:
                    bench.attempt(f"scenario 9, {who} store, round {number + 1}",
                                  lambda: bench.sample("9", who, self._load(servers[who], path)))
            if settings.profile_dir is not None:
                def load_full() -> None:
                    bench._load("metahub", servers["full"].url + path)
                self._profile("scenario 9 (manifest by tag, full store)", servers["full"].pid, load_full)
        finally:
            for server in servers.values():
                server.stop()
        self._store_rows(fill, timings, empty_timings, index_mb)

    def _store_rows(self, fill: FillTiming, timings: dict[int, CliTimes], empty_timings: dict[int, CliTimes],
                    index_mb: dict[int, float]) -> None:
        bench, row = self.bench, self.row
        add = bench.results.rows.append
        blobs = fill.blobs
        tags = blobs // BLOBS_PER_IMAGE
        add(row(f"9 store fill, {blobs} blobs via storage's API", "blobs/s", fill.blobs_per_second, None,
                f"index {fill.index_records_per_second:.0f} records/s in {fill.index_transactions} txns "
                f"({fill.index_transactions_per_second:.0f} txn/s)", "", None,
                distribution_applies=False))
        rps = {who: _median(bench.values("9", who, "requests_per_second")) for who in ("full", "empty")}
        p99 = {who: _median(bench.values("9", who, "p99_ms")) for who in ("full", "empty")}
        full, empty = rps["full"], rps["empty"]
        add(row(f"9 manifest by tag, store of {blobs} blobs/{tags} tags", "req/s", full, None,
                f"empty store {empty:.0f} (f/e {full / empty:.2f})" if full and empty else "empty store error",
                f">={RATIO_EMPTY_STORE}x empty store",
                None if full is None or empty is None else full >= RATIO_EMPTY_STORE * empty,
                distribution_applies=False))
        add(row("9 manifest by tag on that store, p99 latency", "ms", p99["full"], None,
                f"empty store {p99['empty']:.2f}" if p99["empty"] is not None else "empty store error", "", None,
                distribution_applies=False))
        cpu = {who: _median(bench.values("9", who, "cpu_us_per_request")) for who in ("full", "empty")}
        add(row("9 manifest by tag on that store, server CPU", "us/req", cpu["full"], None,
                f"empty store {cpu['empty']:.0f}" if cpu["empty"] is not None else "empty store error", "", None,
                distribution_applies=False))
        for command in CLI_COMMANDS:
            add(self._cli_row(command, timings, empty_timings))
        largest = max(index_mb)
        add(row(f"9 LMDB index on disk, {largest} blobs", "MB", index_mb[largest], None,
                ", ".join(f"{_count(size)} {mb:.1f}" for size, mb in sorted(index_mb.items())), "", None,
                distribution_applies=False))

    def _cli_row(self, command: str, timings: dict[int, CliTimes], empty_timings: dict[int, CliTimes]) -> Row:
        """``command``'s row: marginal CPU per 10^4 blobs over zero to half and half to all of the
        store, judged against each other; each step's average from zero for the reader."""
        sizes = sorted(timings)
        largest = sizes[-1]
        half = min([0, *sizes[:-1]], key=lambda size: abs(size - largest / 2))

        def work(kind: str, size: int) -> float:
            """Beyond the empty store's run beside it: the command's work on ``size`` blobs."""
            return timings[size][command][kind] - empty_timings[size][command][kind] if size else 0.0

        def marginal(kind: str, start: int, end: int) -> float:
            return (work(kind, end) - work(kind, start)) * 1e4 / (end - start)

        averages = ", ".join(f"{_count(size)} {marginal('cpu', 0, size):.3f}" for size in sizes)
        empty = [empty_timings[size][command]["cpu"] for size in sizes]
        fixed_note = f"empty store {min(empty):.2f}-{max(empty):.2f} s CPU"
        second = marginal("cpu", half, largest)
        if half == 0:  # a single step: nothing to compare the growth with
            return self.row(f"9 cache {command}, CPU per 10^4 blobs 0-{_count(largest)}", "s", second, None,
                            f"wall {marginal('wall', 0, largest):.3f}; {fixed_note}", "", None,
                            distribution_applies=False)
        first = marginal("cpu", 0, half)
        # A span that does not come out positive measured noise, not work: no ratio, and not linear.
        growth = f"x{second / first:.2f}" if first > 0 else "first span not positive"
        return self.row(
            f"9 cache {command}, CPU per 10^4 blobs {_count(half)}-{_count(largest)}", "s", second, None,
            f"0-{_count(half)} {first:.3f} ({growth}); wall {marginal('wall', 0, half):.3f}, "
            f"{marginal('wall', half, largest):.3f}; CPU from 0: {averages}; {fixed_note}",
            f"CPU linear: <={LINEAR_SLACK}x 0-{_count(half)}", 0 < first and 0 < second <= LINEAR_SLACK * first,
            distribution_applies=False)

    def _load(self, server: MetahubServer, path: str) -> dict[str, Any]:
        """Scenario 3's load on ``server``, with the server's CPU time per request: on a shared
        machine, what moves least with the neighbours' load."""
        before = cpu_seconds(server.pid)
        result = asdict(self.bench._load("metahub", server.url + path))
        result["cpu_us_per_request"] = (cpu_seconds(server.pid) - before) / result["requests"] * 1e6
        return result

    def _cli_config(self, path: Path, store: Path, index: Path) -> Path:
        """The CLI's configuration at ``path``: the servers' plus a bound, so that ``cache gc`` has work."""
        config = deep_merge(self.bench.metahub.config, {"storage": {
            "path": str(store), "index": str(index), "max_size": 1, "gc_grace": "1h"}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def _time_cli(self, full: Path, empty: Path) -> tuple[CliTimes, CliTimes]:
        """Best of ``rounds`` wall and CPU times of each ``metahub cache`` command with the
        configuration ``full`` and, beside it, ``empty``. Each round runs a command on both,
        alternating which goes first, so that the neighbours' load lands on both alike."""
        runs: dict[Path, dict[str, list[tuple[float, float]]]] = {
            config: {command: [] for command in CLI_COMMANDS} for config in (full, empty)}
        for number in range(max(1, self.bench.settings.rounds)):
            for command in CLI_COMMANDS:
                for config in (empty, full) if number % 2 == 0 else (full, empty):
                    runs[config][command].append(self._run_cli(command, config))
        best = {config: {command: {"wall": min(wall for wall, _ in times), "cpu": min(cpu for _, cpu in times)}
                         for command, times in by_command.items()} for config, by_command in runs.items()}
        return best[full], best[empty]

    def _run_cli(self, command: str, config: Path) -> tuple[float, float]:
        """One ``metahub cache`` command's wall and CPU (user + system) time, in seconds."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        done = subprocess.run([str(METAHUB_CLI), "cache", command, "--config", str(config)],
                              capture_output=True, text=True, env=_cli_env(),
                              stdin=subprocess.DEVNULL, timeout=900)
        wall = time.monotonic() - started
        # The harness reaps no other child meanwhile (servers are reaped when they stop).
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"metahub cache {command} exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
        if command == "gc" and not done.stdout.startswith("removed 0 blobs"):
            raise RuntimeError(f"metahub cache gc removed blobs (all should be recent): {done.stdout}")
        return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    def _push_app_image(self) -> None:
        layout = self.bench.workdir / "scenario9" / "layout"
        make_bench_index(layout, STORE_APP_TAG, layers=[1000])
        skopeo.push(layout, STORE_APP_TAG, f"{self.bench.upstream.host}/{STORE_APP_REPO}:{STORE_APP_TAG}")

    def _metahub(self, workdir: Path, store: tuple[Path, Path] | None) -> MetahubServer:
        """A metahub like the run's own (same accounts, same upstream), on a store of its own."""
        overlay: dict[str, Any] = {key: value for key, value in self.bench.metahub.config.items()
                                   if key != "storage"}
        if store is not None:
            overlay["storage"] = {"path": str(store[0]), "index": str(store[1])}
        server = MetahubServer(workdir, overlay["upstreams"][overlay["default_upstream"]]["url"], overlay)
        self.bench.stack.callback(server.stop)
        return server

    def _get(self, url: str) -> str:
        """GET a manifest as the load does; its Docker-Content-Digest."""
        headers = self.bench._load_headers("metahub", url.split("/v2/")[0])
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as answer:
            answer.read()
            return str(answer.headers.get("Docker-Content-Digest", ""))

    def _profile(self, name: str, pid: int, action: Callable[[], None]) -> None:
        directory = self.bench.settings.profile_dir
        assert directory is not None
        if py_spy() is None:
            return  # Bench.profile reports the missing py-spy once
        directory.mkdir(parents=True, exist_ok=True)
        output = directory / (name.split(" (")[0].replace(" ", "-") + ".txt")
        profiler = Profiler(pid, output)
        time.sleep(0.5)  # py-spy attaches
        try:
            self.bench.attempt(f"profile {name}", action)
        finally:
            profiler.stop()
        summary = summarise(output)
        self.bench.results.profiles[name] = summary.lines()
        (directory / (output.stem + "-summary.txt")).write_text("\n".join(summary.lines(40)) + "\n")

    # scenario 10 ---------------------------------------------------------------------------

    def machine_limit(self) -> None:
        bench, settings = self.bench, self.bench.settings
        bench.log(f"scenario 10: one cold {settings.cold_mib} MiB blob against the machine's limit")
        for number in range(settings.rounds):
            bench.attempt(f"scenario 10, round {number + 1}", lambda: self._limit_once(bench.order(number)))
        if settings.profile_dir is not None:
            self._profile("scenario 10 (cold pull against the limit)", bench.metahub.pid,
                          lambda: self._limit_once(["metahub"], record=False))
        self._limit_rows()

    def _limit_once(self, order: list[str], record: bool = True) -> None:
        bench = self.bench
        blob = push_random_blob(bench.upstream.host, LIMIT_REPO, bench.settings.cold_mib * MiB)
        os.sync()
        direct = bench.client.download(bench.relay_direct.url, blob, "scenario 10 direct")
        os.sync()
        written = self._write_fsync(_upstream_blob(bench.upstream.storage, blob.digest),
                                    Path(bench.metahub.config["storage"]["path"]))
        if written["bytes"] != blob.size:
            raise RuntimeError(f"scenario 10: wrote {written['bytes']} of {blob.size} bytes")
        servers: dict[str, MetahubServer | DistributionServer] = {
            "metahub": bench.metahub, "distribution": bench.distribution}
        pulled, cpu = {}, {}
        for who in order:
            os.sync()
            before = cpu_seconds(servers[who].pid)
            pulled[who] = bench.client.download(servers[who].url, blob, f"scenario 10 {who}")
            cpu[who] = cpu_seconds(servers[who].pid) - before  # moves least with the machine's load
        if record:
            bench.sample("10", "direct", direct)
            bench.sample("10", "write", written)
            for who, result in pulled.items():
                bench.sample("10", who, result)
                bench.sample("cpu10", who, cpu[who])

    def _write_fsync(self, source: Path, directory: Path) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "bench.write_fsync", str(source), str(directory)],
                              capture_output=True, text=True, env=_cli_env(), stdin=subprocess.DEVNULL,
                              timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"bench.write_fsync exited {done.returncode}: {done.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def _samples(self, who: str) -> list[dict[str, Any]]:
        return self.bench.samples.get("10", {}).get(who, [])

    def _limit_rows(self) -> None:
        bench, row = self.bench, self.row
        size = bench.settings.cold_mib
        direct, written = self._samples("direct"), self._samples("write")
        limits = [max(d["total"], w["seconds"]) for d, w in zip(direct, written)]
        limit = _median(limits)
        total = {who: _median([r["total"] for r in self._samples(who)]) for who in ("metahub", "distribution")}
        m = total["metahub"]
        d_total = _median([r["total"] for r in direct])
        w_total = _median([w["seconds"] for w in written])
        reference = (f"limit {limit:.3f} (direct {d_total:.3f}, write+fsync {w_total:.3f}"
                     + (f"; m/limit {m / limit:.2f})" if m and limit else ")")
                     if limit is not None and d_total is not None and w_total is not None else "limit error")
        bench.results.rows.append(row(
            f"10 cold pull vs machine limit {size} MiB, total", "s", m, total["distribution"], reference,
            f"<= {LIMIT_FACTOR}x limit", None if m is None or limit is None else m <= LIMIT_FACTOR * limit))
        ttfb = {who: _median([r["ttfb"] * 1e3 for r in self._samples(who)])
                for who in ("metahub", "distribution", "direct")}
        m, x = ttfb["metahub"], ttfb["direct"]
        bench.results.rows.append(row(
            f"10 cold pull vs machine limit {size} MiB, TTFB", "ms", m, ttfb["distribution"],
            f"direct {x:.1f}" if x is not None else "direct error", f"<= direct + {TTFB_SLACK_MS:.0f} ms",
            None if m is None or x is None else m <= x + TTFB_SLACK_MS))
