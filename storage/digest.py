"""Digest strings: the only thing from a request that ever becomes part of a store path.

Only ``sha256:`` followed by exactly 64 lowercase hex characters is accepted. The check is a
full-string match, so nothing like ``/``, ``..`` or a newline can reach the filesystem.
"""
from __future__ import annotations

import hashlib
import re

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


def sha256_digest(data: bytes) -> str:
    """The digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
