"""What runs on what: the feature families that know compatibility (design.md, "Feature families").

- ``cpu:A`` runs on ``cpu:H`` when archspec says H is A or descends from it
  (``TARGETS[H] >= TARGETS[A]``); a name archspec does not know matches only itself.
- ``nvcap:X.Y`` runs on ``nvcap:X.Z`` when Z >= Y: CUDA binaries are compatible upward within a
  major version only.
- Any other feature is a label, matched literally.

The strings themselves are read by :mod:`metahub.config.features`, which the configuration also
uses to refuse a machine type that names hardware nobody knows.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import archspec.cpu

from metahub.config.features import (
    AMD64_LEVELS,
    CPU,
    NVCAP,
    amd64_level,
    cpu_target,
    family,
    nvcap,
)

__all__ = ["level_of", "needs", "runs_on", "satisfied", "specificity"]

#: How many names of newer CPUs a sentence lists before it says "...".
_NAMES_IN_WORDS = 6


@lru_cache(maxsize=4096)
def satisfied(feature: str, machine_features: tuple[str, ...]) -> bool:
    """Whether hardware described by ``machine_features`` runs a build that needs ``feature``.

    Cached: machine types and the features indexes use are few, and archspec's ancestor walk is
    the costly part of resolving a tag.
    """
    if feature in machine_features:
        return True
    target = cpu_target(feature)
    if target is not None:
        return any(host is not None and host >= target for host in map(cpu_target, machine_features))
    needed = nvcap(feature)
    if needed is not None:
        return any(has is not None and has[0] == needed[0] and has[1] >= needed[1]
                   for has in map(nvcap, machine_features))
    return False


@lru_cache(maxsize=4096)
def specificity(feature: str) -> int:
    """How specific a build of the feature's family is: more ancestors, or a higher capability."""
    target = cpu_target(feature)
    if target is not None:
        return len(target.ancestors)
    capability = nvcap(feature)
    if capability is not None:
        return capability[0] * 1000 + capability[1]
    return 0


@lru_cache(maxsize=1024)
def level_of(machine_features: tuple[str, ...], variant: str | None) -> int:
    """An amd64 machine's level: its variant if set, else the highest x86_64_vN its CPU descends from."""
    if variant is not None:
        return amd64_level(variant) or 1
    best = 1
    for feature in machine_features:
        target = cpu_target(feature)
        if target is None:
            continue
        for known in (target, *target.ancestors):
            if known.name.startswith("x86_64_v") and known.name[len("x86_64_"):] in AMD64_LEVELS:
                best = max(best, AMD64_LEVELS.index(known.name[len("x86_64_"):]) + 1)
    return best


@lru_cache(maxsize=1024)
def runs_on(feature: str) -> tuple[str, ...]:
    """The archspec targets that run a ``cpu:`` build, the oldest (fewest ancestors) first."""
    target = cpu_target(feature)
    if target is None:
        return ()
    newer = [name for name, other in archspec.cpu.TARGETS.items() if other >= target and other != target]
    return tuple(sorted(newer, key=lambda name: (len(archspec.cpu.TARGETS[name].ancestors), name)))


def needs(features: Iterable[str]) -> list[str]:
    """Each feature as the hardware it needs, in words, sorted by feature."""
    return [_words(feature) for feature in sorted(features)]


def _words(feature: str) -> str:
    target = cpu_target(feature)
    if target is not None:
        newer = runs_on(feature)
        if not newer:
            return f"cpu {target.name} (nothing newer is known)"
        listed = ", ".join(newer[:_NAMES_IN_WORDS]) + (", ..." if len(newer) > _NAMES_IN_WORDS else "")
        return f"cpu {target.name} or newer: {listed}"
    capability = nvcap(feature)
    if capability is not None:
        major, minor = capability
        return f"nvcap {major}.x ≥ {major}.{minor}"
    if family(feature) == CPU:
        return f"{feature} (a CPU archspec does not know: only a machine type listing {feature} runs it)"
    if family(feature) == NVCAP:
        return f"{feature} (not MAJOR.MINOR: only a machine type listing {feature} runs it)"
    return f"{feature} (listed by the machine type)"
