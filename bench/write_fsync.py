"""The disk's half of scenario 10's limit: ``python -m bench.write_fsync SOURCE DIRECTORY``.

Reads SOURCE (the blob as the upstream holds it) into memory, untimed, then writes it to a new file
in DIRECTORY in 1 MiB pieces and fsyncs it: the least a cache that answers only with durable,
verified bytes must do with a blob before its last byte goes out (no hashing, no rename, no
network). Prints one JSON object, ``bytes`` and ``seconds`` (first write to the end of the fsync),
and removes the file. Run in its own process so nothing of the harness shares its GIL.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

PIECE = 1 << 20


def write_fsync(data: bytes, directory: str) -> float:
    """Seconds to write ``data`` to a new file in ``directory`` in 1 MiB pieces and fsync it."""
    path = os.path.join(directory, f".bench-write-fsync-{secrets.token_hex(6)}")
    view = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        started = time.monotonic()
        for offset in range(0, len(view), PIECE):
            piece = view[offset:offset + PIECE]
            while piece:
                piece = piece[os.write(fd, piece):]
        os.fsync(fd)
        return time.monotonic() - started
    finally:
        os.close(fd)
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.write_fsync", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the bytes to write (read into memory first, untimed)")
    parser.add_argument("directory", help="where to write them: the store's filesystem")
    args = parser.parse_args(argv)
    with open(args.source, "rb") as source:
        data = source.read()
    print(json.dumps({"bytes": len(data), "seconds": write_fsync(data, args.directory)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
