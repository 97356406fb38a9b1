"""Test blobs for the benchmark, pushed straight into the upstream registry through its API.

Each blob is a unique 64-byte random prefix followed by a repeated pool of random bytes: unique
digests (so no proxy can have a "fresh" blob cached already) at the speed of memcpy. /dev/urandom
makes about 120 MB/s on the VMs we run on, which would make a 1 GiB blob cost nine seconds; nothing
in the path compresses or deduplicates below the blob level, so repeating the pool changes nothing
the benchmark measures.

Upload is the registry API's streamed form (POST, one PATCH with the body, PUT with the digest), so
a blob is generated and hashed in a single pass and never lands on the harness's disk.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 1 << 20
_POOL_SIZE = 8 << 20
_pool: bytes | None = None


def _random_pool() -> bytes:
    global _pool
    if _pool is None:
        _pool = os.urandom(_POOL_SIZE)
    return _pool


def chunks(size: int, prefix: bytes) -> Iterator[memoryview]:
    """The blob's bytes: ``prefix`` then the pool, over and over, ``size`` bytes in all."""
    pool = memoryview(_random_pool())
    head = memoryview(prefix)[:size]
    yield head
    remaining = size - len(head)
    offset = 0
    while remaining > 0:
        piece = pool[offset:offset + min(CHUNK, remaining, len(pool) - offset)]
        yield piece
        remaining -= len(piece)
        offset = (offset + len(piece)) % len(pool)


@dataclass(frozen=True)
class PushedBlob:
    repository: str
    digest: str
    size: int

    def path(self) -> str:
        return f"/v2/{self.repository}/blobs/{self.digest}"


class UploadError(RuntimeError):
    pass


def _connection(host: str) -> http.client.HTTPConnection:
    address, port = host.rsplit(":", 1)
    return http.client.HTTPConnection(address, int(port), timeout=120)


def _location(response: http.client.HTTPResponse, host: str) -> str:
    location = response.getheader("Location")
    if not location:
        raise UploadError(f"registry at {host} answered {response.status} without a Location")
    split = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(("", "", split.path, split.query, ""))


def _expect(response: http.client.HTTPResponse, status: int, what: str) -> None:
    body = response.read()
    if response.status != status:
        raise UploadError(f"{what}: {response.status} {response.reason}: {body[:300]!r}")


def push_random_blob(host: str, repository: str, size: int) -> PushedBlob:
    """Upload ``size`` fresh random bytes to ``repository`` on the registry at ``host``."""
    connection = _connection(host)
    try:
        connection.request("POST", f"/v2/{repository}/blobs/uploads/", headers={"Content-Length": "0"})
        response = connection.getresponse()
        _expect(response, 202, "starting an upload")
        location = _location(response, host)

        sha256 = hashlib.sha256()
        connection.putrequest("PATCH", location)
        connection.putheader("Content-Type", "application/octet-stream")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        for piece in chunks(size, os.urandom(64)):
            sha256.update(piece)
            connection.send(piece)
        response = connection.getresponse()
        _expect(response, 202, "sending the blob")
        location = _location(response, host)

        digest = "sha256:" + sha256.hexdigest()
        separator = "&" if "?" in location else "?"
        connection.request("PUT", f"{location}{separator}digest={urllib.parse.quote(digest)}",
                           headers={"Content-Length": "0"})
        response = connection.getresponse()
        _expect(response, 201, "committing the blob")
    finally:
        connection.close()
    return PushedBlob(repository, digest, size)
