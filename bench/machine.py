"""What machine a benchmark ran on, for the table's header and docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _registry_version() -> str:
    try:
        out = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.split()
        return out[-1] if out else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _virtualisation() -> str:
    """``vm: kvm, container: docker`` style; loopback figures differ a lot between bare metal and VMs."""
    found = []
    for kind in ("vm", "container"):
        try:
            out = subprocess.run(["systemd-detect-virt", f"--{kind}"], capture_output=True,
                                 text=True, timeout=5)
            found.append(f"{kind}: {out.stdout.strip() or 'none'}")
        except (OSError, subprocess.TimeoutExpired):
            found.append(f"{kind}: unknown")
    return ", ".join(found)


def describe() -> dict[str, str]:
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_memory_gib():.1f} GiB",
        "kernel": platform.release(),
        "virtualisation": _virtualisation(),
        "python": platform.python_version(),
        "twisted": _version("twisted"),
        "docker-registry": _registry_version(),
    }
