"""Byte counts for people: logs, the status page and the CLI write sizes one way.

It sits in the lowest layer because config (which describes ``max_size``) and the layers above
it all print sizes, and config may import nothing but this layer.
"""
from __future__ import annotations

_IEC_UNITS = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_size(size: float) -> str:
    """The largest IEC unit that keeps at least 1, as the config file writes sizes
    (``214748364800`` -> ``200GiB``), so a size shown can be pasted into the config."""
    for unit, factor in _IEC_UNITS:
        if size >= factor:
            return f"{size / factor:.4g}{unit}"
    return f"{size:.0f}B"
