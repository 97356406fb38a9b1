"""Machine types: the hardware a login stands for, what the matching rule and ``detect`` work on.

The configuration file describes them (:class:`metahub.config.file.MachineTypeEntry`, checked
there); this is the domain value the hardware layer owns, so the rule depends on no file format.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type: the matching rule never loads the config code
    from metahub.config.file import MachineTypeEntry

__all__ = ["MachineType", "machine_types"]


@dataclass(frozen=True)
class MachineType:
    name: str
    os: str
    architecture: str
    variant: str | None = None
    features: tuple[str, ...] = ()
    match: str = "compatible"  # or "subset" (literal features) or "exact" (the original MetaHub rule)


def machine_types(entries: Mapping[str, MachineTypeEntry]) -> dict[str, MachineType]:
    """The configured machine types (``config.machine_types``), by name, in the file's order."""
    return {
        name: MachineType(name, entry.platform.os, entry.platform.architecture, entry.platform.variant,
                          entry.features, entry.match)
        for name, entry in entries.items()
    }
