"""``metahub detect`` on this host, and with a fake ``nvidia-smi`` on PATH for the GPU part."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import archspec.cpu
import pytest
import yaml

from metahub.config.file import parse_config
from metahub.hardware import detect
from metahub.hardware.machine import MachineType

CLI = Path(sys.executable).with_name("metahub")
HOST_CPU = f"cpu:{archspec.cpu.host().name}"


def fake_nvidia_smi(directory: Path, output: str, status: int = 0) -> Path:
    """An ``nvidia-smi`` that answers the compute-capability query as a host with those GPUs would."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      '[ "$*" = "--query-gpu=compute_cap --format=csv,noheader" ] || exit 64\n'
                      f"printf '{output}'\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory


def run(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # Only the fake (if any) and the system's tools: a real nvidia-smi must not leak in.
    env["PATH"] = os.pathsep.join([*([str(path)] if path else []), "/usr/bin", "/bin"])
    return subprocess.run([str(CLI), "detect", *args], capture_output=True, text=True, env=env, timeout=60)


def config_file(tmp_path: Path, machine_types: dict[str, object]) -> Path:
    path = tmp_path / "metahub.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"path": str(tmp_path / "s"), "index": str(tmp_path / "i")},
        "upstreams": {"up": {"url": "https://registry.example"}},
        "machine_types": machine_types,
    }))
    return path


def test_this_host_prints_as_a_machine_type_that_loads(tmp_path: Path) -> None:
    result = run()
    assert result.returncode == 0 and result.stderr == ""
    printed = yaml.safe_load(result.stdout)
    assert printed["features"] == [HOST_CPU]  # this host's archspec name, and no GPU here
    if printed["platform"]["architecture"] == "amd64":
        assert printed["platform"]["variant"] in ("v1", "v2", "v3", "v4")
    # Pasted under machine_types, it is a valid machine type.
    config = parse_config({"storage": {"path": str(tmp_path / "s"), "index": str(tmp_path / "i")},
                           "upstreams": {"up": {"url": "https://registry.example"}},
                           "machine_types": {"here": printed}}, str(tmp_path))
    assert config.machine_types["here"].features == (HOST_CPU,)


def test_a_gpu_adds_the_lowest_compute_capability(tmp_path: Path) -> None:
    gpus = fake_nvidia_smi(tmp_path / "bin", "8.6\\n8.0\\n8.6\\n")
    result = run(path=gpus)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["features"] == [HOST_CPU, "nvcap:8.0"]


def test_a_failing_gpu_tool_is_a_note_not_an_error(tmp_path: Path) -> None:
    broken = fake_nvidia_smi(tmp_path / "bin", "NVIDIA-SMI has failed", status=9)
    result = run(path=broken)
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["features"] == [HOST_CPU]
    assert "nvidia-smi exited with 9" in result.stderr


@pytest.mark.parametrize(("lines", "expected"), [
    (["8.6", "8.0"], "nvcap:8.0"), (["9.0", "8.9"], "nvcap:8.9"), (["7.10", "7.5"], "nvcap:7.5"),
    (["[N/A]", " 8.6 "], "nvcap:8.6"), ([], None), (["garbage"], None),
])
def test_lowest_capability(lines: list[str], expected: str | None) -> None:
    assert detect.lowest_capability(lines) == expected


def test_with_a_config_the_types_this_host_serves_best_first(tmp_path: Path) -> None:
    host, _ = detect.host_machine_type()
    parents = [a.name for a in archspec.cpu.host().parents]
    types = {
        "older": {"platform": {"os": host.os, "architecture": host.architecture}, "features": [f"cpu:{parents[0]}"]}
        if parents else {"platform": {"os": host.os, "architecture": host.architecture}},
        "exact": {"platform": {"os": host.os, "architecture": host.architecture}, "features": [HOST_CPU]},
        "plain": {"platform": {"os": host.os, "architecture": host.architecture}},
        "gpu": {"platform": {"os": host.os, "architecture": host.architecture}, "features": [HOST_CPU, "nvcap:8.6"]},
        "elsewhere": {"platform": {"os": "windows", "architecture": host.architecture}},
    }
    config = config_file(tmp_path, types)
    result = run("--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "this host can serve, best first: exact, older, plain" in result.stdout
    assert "not gpu: needs nvcap:8.6, which this host does not run" in result.stdout
    assert "not elsewhere:" in result.stdout
    assert run("--config", str(config), "--best").stdout == "exact\n"
    # With the GPU the fake reports, the GPU type fits and wins on its extra feature.
    gpus = fake_nvidia_smi(tmp_path / "bin", "8.9\n")
    assert run("--config", str(config), "--best", path=gpus).stdout == "gpu\n"


def test_best_when_nothing_fits_fails_with_one_line(tmp_path: Path) -> None:
    config = config_file(tmp_path, {"win": {"platform": {"os": "windows", "architecture": "amd64"}}})
    result = run("--config", str(config), "--best")
    assert result.returncode == 1 and result.stdout == ""
    assert "can serve none of the machine types" in result.stderr and "Traceback" not in result.stderr
    assert run("--best").returncode != 0  # --best needs a config to choose from


def test_fitting_is_the_resolution_rule_with_the_host_as_machine_type() -> None:
    host = MachineType("h", "linux", "amd64", "v3", ("cpu:broadwell", "nvcap:8.6"))
    types = [MachineType("v4", "linux", "amd64", "v4"), MachineType("hw", "linux", "amd64", None, ("cpu:haswell",)),
             MachineType("sky", "linux", "amd64", None, ("cpu:skylake",)),
             MachineType("hw80", "linux", "amd64", None, ("cpu:haswell", "nvcap:8.0"))]
    decision = detect.fitting(host, types)
    assert [e.digest for e in decision.candidates] == ["hw80", "hw"]
    assert {e.digest: why for e, why in decision.refused} == {
        "v4": "needs amd64 level v4, h has v3", "sky": "needs cpu:skylake, which h does not run"}
