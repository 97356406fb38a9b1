"""Scenario 10's floor, in a plain program: what a verifying, durable cache must do for one cold
blob, on this machine, with nothing of metahub's or Twisted's around it.

Three processes, as in the bench: an upstream that sends a file over HTTP/1.0 from memory, a
"proxy" that reads it in 1 MiB pieces, hashes each (sha256), writes it to a file and sends it on
to its client at once, then fsyncs, and a client that reads everything and discards it. The
proxy sends bytes before they are verified, which metahub must not do for the final byte, and
keeps no index, lease or follower: a floor, not a design. The same client also pulls straight
from the upstream (the direct reference), and a plain write + fsync of the same bytes is timed
(the disk's half of the limit).

    python -m bench.cold_floor [--mib 200] [--dir DIR] [--rounds 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import tempfile
import time
from multiprocessing import Process

from .blobs import chunks

PIECE = 1 << 20


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def _serve_upstream(server: socket.socket, data: bytes) -> None:
    while True:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)  # the request; its content does not matter here
            connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
            connection.sendall(data)


def _read_head(sock: socket.socket) -> bytes:
    """Read up to the end of the response head; what follows it is returned."""
    buffered = b""
    while b"\r\n\r\n" not in buffered:
        buffered += sock.recv(65536)
    return buffered.split(b"\r\n\r\n", 1)[1]


def _serve_proxy(server: socket.socket, upstream: int, directory: str) -> None:
    while True:
        client, _ = server.accept()
        with client, socket.create_connection(("127.0.0.1", upstream)) as source:
            client.recv(65536)
            source.sendall(b"GET / HTTP/1.0\r\n\r\n")
            first = _read_head(source)
            digest = hashlib.sha256()
            descriptor, path = tempfile.mkstemp(dir=directory)
            client.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
            piece = bytearray(PIECE)
            view = memoryview(piece)
            pending = [first] if first else []
            while True:
                for chunk in pending:
                    digest.update(chunk)
                    os.write(descriptor, chunk)
                    client.sendall(chunk)
                count = source.recv_into(view)
                if not count:
                    break
                pending = [view[:count]]
            os.fsync(descriptor)
            os.close(descriptor)
            os.unlink(path)


def _pull(port: int) -> tuple[float, float, int]:
    """Time to first byte, total time and body bytes of one GET."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        body = len(_read_head(sock))
        first = time.monotonic() - started
        buffer = bytearray(8 << 20)
        while count := sock.recv_into(buffer):
            body += count
    return first, time.monotonic() - started, body


def _write_fsync(data: bytes, directory: str) -> float:
    started = time.monotonic()
    descriptor, path = tempfile.mkstemp(dir=directory)
    view = memoryview(data)
    for offset in range(0, len(data), PIECE):
        os.write(descriptor, view[offset:offset + PIECE])
    os.fsync(descriptor)
    os.close(descriptor)
    took = time.monotonic() - started
    os.unlink(path)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the proxy and the write put their file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = b"".join(chunks(args.mib << 20, os.urandom(64)))
    upstream, proxy = _listener(), _listener()
    children = [Process(target=_serve_upstream, args=(upstream, data), daemon=True),
                Process(target=_serve_proxy, args=(proxy, upstream.getsockname()[1], args.dir), daemon=True)]
    for child in children:
        child.start()
    try:
        for number in range(args.rounds):
            os.sync()
            direct = _pull(upstream.getsockname()[1])
            os.sync()
            written = _write_fsync(data, args.dir)
            os.sync()
            proxied = _pull(proxy.getsockname()[1])
            assert direct[2] == proxied[2] == len(data), (direct, proxied)
            limit = max(direct[1], written)
            print(f"round {number + 1}: direct {direct[1]:.3f} s (TTFB {direct[0] * 1000:.1f} ms), "
                  f"write+fsync {written:.3f} s, limit {limit:.3f} s; floor proxy {proxied[1]:.3f} s "
                  f"(TTFB {proxied[0] * 1000:.1f} ms), {proxied[1] / limit:.2f}x the limit")
    finally:
        for child in children:
            child.terminate()


if __name__ == "__main__":
    main()
