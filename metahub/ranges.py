"""The ``Range`` header on blob requests: one byte range, as registries and their clients use it."""
from __future__ import annotations

import re

from . import errors

_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open byte range ``[start, end)`` a ``Range`` header asks of a blob of ``size`` bytes.

    None means "the whole blob" (no header, or a header that is not a single byte range, which
    RFC 9110 lets a server ignore). A well-formed range that cannot be satisfied raises a 416.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise errors.range_invalid(header, size)
        return max(0, size - length), size
    start = int(first)
    end = size if not last else int(last) + 1
    if last and end <= start:
        return None  # last < first: syntactically invalid, so ignored (RFC 9110 14.1.1)
    if start >= size:
        raise errors.range_invalid(header, size)
    return start, min(end, size)


def content_range(start: int, end: int, size: int) -> str:
    return f"bytes {start}-{end - 1}/{size}"
