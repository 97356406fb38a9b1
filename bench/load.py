"""Many small requests over keep-alive connections: wrk when installed, else a Python fallback.

The fallback exists so the harness still runs where wrk is missing; its figures are bounded by the
client's own GIL long before a fast server's, so the table says which generator produced them.
"""
from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class LoadResult:
    requests_per_second: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers and socket errors
    generator: str


class LoadError(RuntimeError):
    pass


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise LoadError(f"cannot read a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p99 = re.search(r"^\s*99(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or p99 is None or total is None:
        raise LoadError(f"cannot read wrk's output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return LoadResult(float(rps.group(1)), _ms(p99.group(1)), int(total.group(1)), errors, "wrk")


def wrk(url: str, headers: dict[str, str], connections: int, seconds: float, threads: int) -> LoadResult:
    binary = shutil.which("wrk")
    if binary is None:
        raise LoadError("wrk is not installed")
    argv = [binary, "--latency", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    result = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60)
    if result.returncode != 0:
        raise LoadError(f"wrk failed ({result.returncode}): {result.stderr.strip()}")
    return parse_wrk(result.stdout)


def python_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> LoadResult:
    """One thread per connection, each sending requests back to back until the time is up."""
    split = urllib.parse.urlsplit(url)
    target = split.path + (f"?{split.query}" if split.query else "")
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        mine: list[float] = []
        failed = 0
        connection = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status >= 400:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                connection.close()
                connection = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
                continue
            mine.append(time.monotonic() - start)
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    started = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - started
    if not latencies:
        raise LoadError(f"no request to {url} succeeded")
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
    return LoadResult(len(latencies) / elapsed, p99, len(latencies), errors[0], "python")


def run_load(url: str, headers: dict[str, str], connections: int, seconds: float,
             threads: int = 2) -> LoadResult:
    if shutil.which("wrk"):
        return wrk(url, headers, connections, seconds, threads)
    return python_load(url, headers, connections, seconds)
