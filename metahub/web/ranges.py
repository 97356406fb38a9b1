"""The ``Range`` header on blob requests: one byte range, as registries and their clients use it."""
from __future__ import annotations

import re

from metahub.oci import errors

#: A byte position has at most 19 digits (a signed 64-bit offset, far beyond any blob). A longer
#: number is no range we could serve, and Python's int() refuses numbers past 4300 digits anyway.
MAX_DIGITS = 19
_RANGE = re.compile(rf"[ \t]*bytes[ \t]*=[ \t]*([0-9]{{0,{MAX_DIGITS}}})[ \t]*-[ \t]*([0-9]{{0,{MAX_DIGITS}}})[ \t]*")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open byte range ``[start, end)`` a ``Range`` header asks of a blob of ``size`` bytes.

    None means "the whole blob": no header, or one that is not a single byte range of ASCII
    numbers of at most ``MAX_DIGITS`` digits, which RFC 9110 (14.2) lets a server ignore. A
    well-formed range that cannot be satisfied raises a 416.
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
            raise errors.range_invalid(header[:100], size)
        return max(0, size - length), size
    start = int(first)
    end = size if not last else int(last) + 1
    if last and end <= start:
        return None  # last < first: syntactically invalid, so ignored (RFC 9110 14.1.1)
    if start >= size:
        raise errors.range_invalid(header[:100], size)
    return start, min(end, size)


def content_range(start: int, end: int, size: int) -> str:
    return f"bytes {start}-{end - 1}/{size}"
