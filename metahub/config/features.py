"""The vocabulary of machine-type features: which ``FAMILY:VALUE`` strings mean hardware.

Two families know compatibility (design.md, "Per-machine-type resolution"): ``cpu:NAME``, a
microarchitecture known to archspec, and ``nvcap:MAJOR.MINOR``, a CUDA compute capability. This
module only reads the strings; what runs on what is :mod:`metahub.hardware.families`. It lives in
the config layer because a machine type that names an unknown CPU is a configuration error, found
when the file is loaded rather than at the first pull.
"""
from __future__ import annotations

import difflib
import re

import archspec.cpu
from archspec.cpu import Microarchitecture

__all__ = ["AMD64_LEVELS", "CPU", "NVCAP", "amd64_level", "cpu_target", "family", "machine_feature_problem",
           "nvcap"]

CPU = "cpu"
NVCAP = "nvcap"
#: x86-64 micro-architecture levels as image variants (the containerd / AlmaLinux convention).
AMD64_LEVELS = ("v1", "v2", "v3", "v4")

_NVCAP = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})")


def family(feature: str) -> str:
    """``cpu`` for ``cpu:haswell``; a feature without a ``:`` is a family of its own."""
    return feature.partition(":")[0]


def cpu_target(feature: str) -> Microarchitecture | None:
    """The archspec target of a ``cpu:NAME`` feature, or None (other family, or a name archspec lacks)."""
    name, sep, value = feature.partition(":")
    if name != CPU or not sep:
        return None
    return archspec.cpu.TARGETS.get(value)


def nvcap(feature: str) -> tuple[int, int] | None:
    """``(8, 6)`` for ``nvcap:8.6``; None for another family or a malformed value."""
    name, sep, value = feature.partition(":")
    found = _NVCAP.fullmatch(value) if name == NVCAP and sep else None
    return (int(found.group(1)), int(found.group(2))) if found else None


def amd64_level(variant: str | None) -> int | None:
    """1..4 for an amd64 variant (none means v1); None for a variant that is not a level."""
    if variant is None:
        return 1
    return AMD64_LEVELS.index(variant) + 1 if variant in AMD64_LEVELS else None


def machine_feature_problem(feature: str) -> str | None:
    """Why a machine type may not list ``feature``, or None when it may.

    An index entry may carry any string (it only then matches that same string), but a machine type
    describes real hardware: a CPU archspec does not know would silently match nothing but itself.
    """
    name, _, value = feature.partition(":")
    if name == CPU and cpu_target(feature) is None:
        close = difflib.get_close_matches(value, list(archspec.cpu.TARGETS), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see archspec.cpu.TARGETS for the names)"
        return f"unknown CPU {value!r}{hint}"
    if name == NVCAP and nvcap(feature) is None:
        return f"malformed CUDA compute capability {value!r} (expected MAJOR.MINOR, e.g. nvcap:8.6)"
    return None
