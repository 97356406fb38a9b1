"""This host as a machine type, and which configured machine types it can serve (``metahub detect``).

The CPU comes from archspec (the same names the ``cpu:`` family uses), the GPU from ``nvidia-smi``
when the host has it. Which configured types fit is decided by the resolution rule itself: each
machine type is read as an index entry and the host as the machine type pulling it, so a node's
bootstrap logs in as exactly the type whose builds this hardware runs best.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from collections.abc import Sequence

import archspec.cpu
import yaml

from metahub.config.features import nvcap
from metahub.hardware.families import level_of
from metahub.hardware.machine import MachineType
from metahub.hardware.resolve import Decision, Entry, decide

__all__ = ["GPU_QUERY", "fitting", "host_machine_type", "lowest_capability", "to_yaml"]

GPU_QUERY = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
#: platform.machine() spellings -> OCI architecture names.
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                  "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_machine_type(name: str = "this host") -> tuple[MachineType, list[str]]:
    """The host as a machine type, and notes on what could not be read (never an error)."""
    notes: list[str] = []
    machine = platform.machine()
    architecture = _ARCHITECTURES.get(machine.lower(), machine.lower())
    features = [f"cpu:{archspec.cpu.host().name}"]
    capability = _gpu_capability(notes)
    if capability is not None:
        features.append(capability)
    variant = f"v{level_of(tuple(features), None)}" if architecture == "amd64" else None
    return MachineType(name, platform.system().lower(), architecture, variant, tuple(features)), notes


def _gpu_capability(notes: list[str]) -> str | None:
    if shutil.which(GPU_QUERY[0]) is None:
        return None  # no NVIDIA tool: a CPU-only host, which is no error
    try:
        done = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        notes.append(f"nvidia-smi did not answer ({error}); no nvcap feature")
        return None
    if done.returncode != 0:
        notes.append(f"nvidia-smi exited with {done.returncode} ({done.stderr.strip()[:200]}); no nvcap feature")
        return None
    found = lowest_capability(done.stdout.splitlines())
    if found is None:
        notes.append(f"nvidia-smi printed no compute capability ({done.stdout.strip()[:200]!r}); no nvcap feature")
    return found


def lowest_capability(lines: Sequence[str]) -> str | None:
    """``nvcap:X.Y`` of the least capable GPU: a build must run on every GPU the host may give it."""
    found = [parsed for line in lines if (parsed := nvcap(f"nvcap:{line.strip()}")) is not None]
    if not found:
        return None
    major, minor = min(found)
    return f"nvcap:{major}.{minor}"


def fitting(host: MachineType, machine_types: Sequence[MachineType]) -> Decision:
    """The configured machine types as the host would rank them as builds: best first, refusals why."""
    # The entry's digest field carries the type's name: it only has to tell the entries apart.
    as_entries = [
        Entry(position, mt.name, "", 0, mt.os, mt.architecture, _level_variant(mt), frozenset(mt.features))
        for position, mt in enumerate(machine_types)
    ]
    return decide(as_entries, host)


def _level_variant(machine_type: MachineType) -> str | None:
    """An amd64 machine type's level as an entry's variant, so a v4 type never fits a v3 host."""
    if machine_type.architecture != "amd64":
        return machine_type.variant
    return f"v{level_of(machine_type.features, machine_type.variant)}"


def to_yaml(machine_type: MachineType) -> str:
    """The machine type as a ``machine_types.NAME`` mapping of the configuration file."""
    platform_: dict[str, str] = {"os": machine_type.os, "architecture": machine_type.architecture}
    if machine_type.variant:
        platform_["variant"] = machine_type.variant
    return str(yaml.safe_dump({"platform": platform_, "features": list(machine_type.features)}, sort_keys=False))
