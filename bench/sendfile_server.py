"""The practical limit of this machine for serving a file: a tiny HTTP server using ``os.sendfile``.

Scenario 1 times it on the very file metahub serves, so "x MB/s" can be read against what the
kernel does with no user-space copy at all. It answers every ``GET`` with the whole file and keeps
connections alive; one thread per connection, no parsing beyond the request head.

Run: ``python -m bench.sendfile_server FILE`` prints ``PORT`` on its first line, then serves until
killed.
"""
from __future__ import annotations

import os
import socket
import sys
import threading

LOOPBACK = "127.0.0.1"


def _serve(connection: socket.socket, path: str) -> None:
    with connection:
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                data = connection.recv(65536)
                if not data:
                    return
                buffered += data
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            method = head.split(b" ", 1)[0]
            with open(path, "rb") as source:
                size = os.fstat(source.fileno()).st_size
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                   b"Content-Length: %d\r\n\r\n" % size)
                if method == b"HEAD":
                    continue
                offset = 0
                while offset < size:
                    sent = os.sendfile(connection.fileno(), source.fileno(), offset, size - offset)
                    if sent == 0:
                        return
                    offset += sent


def main(argv: list[str]) -> int:
    path = argv[1]
    listener = socket.create_server((LOOPBACK, 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=_serve, args=(connection, path), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
