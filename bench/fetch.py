"""The download client for blob scenarios, run as its own process: ``python -m bench.fetch URL``.

Why not curl: on this kind of machine ``curl -o /dev/null`` tops out near 1.1 GB/s on loopback
(16 KiB reads), below what a sendfile server delivers; ``recv_into`` an 8 MiB buffer reaches
1.5-2 GB/s, so the client is not what the figure measures. Why a process of its own: the counting
relay runs threads in the harness, and a client sharing their GIL would slow both.

Prints one JSON object: ``status``, ``bytes``, ``ttfb`` (request start to the first response byte,
connect included, like curl's time_starttransfer), ``total`` (to the last byte) and ``start`` /
``end`` on the system-wide monotonic clock, so the harness can take the wall time of many clients.
``--clients N`` forks N clients that send their requests at the same instant (one JSON line each,
with ``start_at``, the instant they were started at). ``--sha256`` also hashes the body and fails
on a mismatch (used by the smoke run; off for timing, hashing costs about as much as loopback).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
import urllib.parse

BUFFER = 8 << 20
DEFAULT_TIMEOUT = 120.0


def fetch(url: str, headers: list[str], expect_sha256: str | None,
          start_at: float | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, object]:
    """Download ``url`` (at monotonic time ``start_at``, if given) into a discarded buffer; a
    server silent for ``timeout`` seconds is an error, never a hung benchmark."""
    split = urllib.parse.urlsplit(url)
    target = split.path + (f"?{split.query}" if split.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {split.netloc}\r\nUser-Agent: metahub-bench\r\n"
    request += "".join(f"{header}\r\n" for header in headers) + "Connection: close\r\n\r\n"
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    view[::4096] = b"\1" * len(view[::4096])  # touch every page now, not on the clock
    sha256 = hashlib.sha256() if expect_sha256 else None
    if start_at is not None and start_at > time.monotonic():
        time.sleep(start_at - time.monotonic())

    start = time.monotonic()
    sock = socket.create_connection((split.hostname, split.port or 80), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(request.encode("latin-1"))
    head = b""
    ttfb = None
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        if ttfb is None:
            ttfb = time.monotonic() - start
        if not data:
            raise SystemExit(f"bench.fetch: {url}: connection closed before the response head")
        head += data
    head, _, body = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].strip()
              for line in lines[1:] if ":" in line}
    if "chunked" in fields.get("transfer-encoding", ""):
        raise SystemExit(f"bench.fetch: {url}: chunked responses are not supported")
    length = int(fields["content-length"]) if "content-length" in fields else None
    received = len(body)
    if sha256 is not None:
        sha256.update(body)
    while length is None or received < length:
        n = sock.recv_into(view)
        if n == 0:
            break
        received += n
        if sha256 is not None:
            sha256.update(view[:n])
    end = time.monotonic()
    sock.close()
    result: dict[str, object] = {"status": status, "bytes": received, "length": length,
                                 "ttfb": ttfb, "total": end - start, "start": start, "end": end}
    if sha256 is not None:
        result["sha256_ok"] = "sha256:" + sha256.hexdigest() == expect_sha256
    return result


def _run_clients(args: argparse.Namespace) -> int:
    """Fork ``--clients`` copies that start at one instant: a fork costs a millisecond where a new
    interpreter costs tens, so twenty clients really do ask at once on a two-core machine."""
    start_at = time.monotonic() + 0.1 + 0.02 * args.clients
    children = []
    for _ in range(args.clients):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                result = fetch(args.url, args.header, args.sha256, start_at, args.timeout)
                result["start_at"] = start_at
                os.write(1, (json.dumps(result) + "\n").encode())
                status = 0
            except BaseException as error:  # report and leave; never return into the parent's loop
                os.write(2, f"bench.fetch: {args.url}: {error!r}\n".encode())
            finally:
                os._exit(status)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--header", "-H", action="append", default=[])
    parser.add_argument("--clients", type=int, default=1,
                        help="this many clients in forked processes, starting together")
    parser.add_argument("--sha256", default=None, help="expected digest sha256:HEX of the body")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds a server may stay silent before the download fails")
    args = parser.parse_args(argv)
    if args.clients > 1:
        return _run_clients(args)
    result = fetch(args.url, args.header, args.sha256, timeout=args.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
