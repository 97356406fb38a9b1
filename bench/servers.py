"""The servers a benchmark run starts: upstream, relays, both proxies, the sendfile reference.

The peers come from ``tests/peers`` (docker-registry with our own config, the counting relay, the
daemon runner); only metahub is started here rather than through ``tests/integration``, because the
benchmark needs its process id (for peak RSS and py-spy) and its access log switched off.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.peers.ports import LOOPBACK, free_port
from tests.peers.process import Daemon
from tests.peers.registry import Registry, v2_status

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
METAHUB_CLI = BIN / "metahub"

#: What the peers need, checked up front so a missing one is one clear line, not a traceback.
REQUIRED_PROGRAMS = ("docker-registry", "skopeo", "curl")

#: The configuration that switches metahub's access log off, used only if metahub accepts it.
ACCESS_LOG_OFF: dict[str, Any] = {"access_log": False}


def missing_programs() -> list[str]:
    return [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- memory ------------------------------------------------------------------------------------

def reset_peak_rss(pid: int) -> None:
    """Restart the kernel's high-water mark (VmHWM), so the next reading covers one scenario."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` in MB (10^6 bytes, like the throughput figures)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmHWM for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid``, all its threads, so far.

    CPU spent per byte or per request is what contention on a shared machine moves least; the
    wall-clock figures of the table are the ones the targets name.
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- metahub -----------------------------------------------------------------------------------

def _config_ok(config: dict[str, Any], path: Path) -> tuple[bool, str]:
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([str(METAHUB_CLI), "check-config", "--config", str(path)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return result.returncode == 0, (result.stderr or result.stdout).strip()


class MetahubServer:
    """``twistd -n metahub`` on a free loopback port, proxying one upstream named ``up``.

    The access log is switched off with :data:`ACCESS_LOG_OFF` when this metahub's configuration
    accepts it (``metahub check-config``); ``access_log_off`` says whether it did.
    """

    name = "metahub"

    def __init__(self, workdir: Path, upstream_url: str, overlay: dict[str, Any] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        config: dict[str, Any] = {
            "storage": {"path": str(workdir / "store"), "index": str(workdir / "index")},
            "upstreams": {"up": {"url": upstream_url}},
            "default_upstream": "up",
            "anonymous": "allow",
            "cache": {"tag_ttl": "1h"},
        }
        config = deep_merge(config, overlay or {})
        config_path = workdir / "metahub.yaml"
        self.access_log_off, _ = _config_ok(deep_merge(config, ACCESS_LOG_OFF), config_path)
        if self.access_log_off:
            config = deep_merge(config, ACCESS_LOG_OFF)
        ok, message = _config_ok(config, config_path)
        if not ok:
            raise RuntimeError(f"metahub rejects the benchmark's configuration: {message}")
        self.config = config
        self.port = free_port()
        argv = [TWISTD, "--nodaemon", "--pidfile=", "metahub", "--config", config_path,
                "--listen", f"tcp:{self.port}:interface={LOOPBACK}"]
        self._daemon = Daemon(argv, workdir / "metahub.log")
        self._daemon.wait_ready(lambda: v2_status(self.port) is not None)

    @property
    def pid(self) -> int:
        return self._daemon.process.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def blob_path(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return Path(self.config["storage"]["path"]) / "blobs" / "sha256" / hex_digest[:2] / hex_digest

    def log_tail(self) -> str:
        return self._daemon.log_tail()

    def stop(self) -> None:
        self._daemon.stop()


# --- distribution ------------------------------------------------------------------------------

class DistributionServer:
    """docker-registry (distribution 2.8) in proxy mode; access log off (tests/peers' config)."""

    name = "distribution"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        self.registry = Registry(workdir, proxy_of=upstream_url)

    @property
    def pid(self) -> int:
        assert self.registry._daemon is not None
        return self.registry._daemon.process.pid

    @property
    def url(self) -> str:
        return self.registry.url

    def blob_path(self, digest: str) -> Path:
        """Where distribution keeps a blob once its proxy has stored it locally."""
        hex_digest = digest.split(":", 1)[1]
        return (self.registry.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hex_digest[:2] / hex_digest / "data")

    def stop(self) -> None:
        self.registry.stop()


# --- the sendfile reference --------------------------------------------------------------------

class SendfileServer:
    """``bench/sendfile_server.py`` serving one file, in its own process."""

    name = "sendfile"

    def __init__(self, path: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.sendfile_server", str(path)], stdout=subprocess.PIPE,
            stderr=open(workdir / "sendfile.log", "ab"), stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"sendfile server did not start; see {workdir / 'sendfile.log'}")
        self.port = int(line)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
