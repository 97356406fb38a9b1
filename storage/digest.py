"""Digest strings: the only thing from a request that ever becomes part of a store path, and the
one place that knows how a digest is spelled (``algorithm:hex``).

The store keeps ``sha256:`` followed by exactly 64 lowercase hex characters, and nothing else. The
check is a full-string match, so nothing like ``/``, ``..`` or a newline can reach the filesystem.
An upstream may still name a manifest by another digest the OCI image spec registers (sha512):
:func:`matches` checks a body against any of those.
"""
from __future__ import annotations

import hashlib
import re

#: The one algorithm the store keeps blobs by.
ALGORITHM = "sha256"
#: The digest algorithms the OCI image spec registers.
ALGORITHMS = frozenset({"sha256", "sha512"})

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


class InvalidDigest(ValueError):
    """The string is not a digest this store accepts (``sha256:`` + 64 lowercase hex)."""


def parse_digest(digest: str) -> str:
    """Return the 64-hex part of a valid sha256 digest, or raise :class:`InvalidDigest`."""
    match = _SHA256.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise InvalidDigest(f"not a sha256 digest: {digest!r:.100}")
    return match.group(1)


def is_digest(value: str) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def from_hex(hex_: str) -> str:
    """The digest string of a sha256 hex digest (what ``hashlib``'s ``hexdigest()`` gives)."""
    return f"{ALGORITHM}:{hex_}"


def sha256_digest(data: bytes) -> str:
    """The digest string of ``data``."""
    return from_hex(hashlib.sha256(data).hexdigest())


def algorithm_of(digest: str) -> str:
    """The algorithm a digest string names (``sha256`` for ``sha256:…``)."""
    return digest.partition(":")[0]


def matches(digest: str, data: bytes) -> bool:
    """Whether ``data`` hashes to ``digest`` by the algorithm ``digest`` names, one of
    :data:`ALGORITHMS` (another raises :class:`InvalidDigest`)."""
    algorithm = algorithm_of(digest)
    if algorithm not in ALGORITHMS:
        raise InvalidDigest(f"not a registered digest algorithm: {algorithm!r:.100}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" == digest
