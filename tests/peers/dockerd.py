"""A private Docker engine (Debian's ``docker.io``, dockerd 20.10) and the ``docker`` client.

Everything the daemon keeps lives in one short /tmp directory the harness owns: data root, exec
root, pid file, API socket (unix socket paths are limited to 108 bytes, pytest's tmp paths can be
longer) and its own ``daemon.json``, so the machine's /etc/docker/daemon.json never changes what a
test sees, and the trust key that dockerd would otherwise write to /etc/docker/key.json goes there
too. It has no networking of its own (no bridge, no iptables) and the vfs storage driver, so it
needs no mounts beyond the private bind mount of its data root that it undoes on exit.

Without ``--containerd`` dockerd starts a containerd of its own under its exec root, as its child
in a session of its own: dockerd stops it on a clean exit, the kernel kills it when dockerd is
killed, and ``stop`` kills it if it is somehow still there. Several engines can run one after
another (or side by side) because each one has its own sockets and containerd namespaces.

Engine quirks that shape the tests: every registry whose host resolves into 127.0.0.0/8 is
insecure to dockerd whatever its flags say, and for an insecure registry it skips certificate
verification (and tries plain HTTP after HTTPS). A TLS test that must prove verification therefore
names metahub by a host name that does not resolve and reaches it through ``https_proxy`` (see
tests/peers/connect_proxy.py). The CA for a registry is read from /etc/docker/certs.d/HOST:PORT/
only; dockerd 20.10 has no per-daemon option for that directory (as root). Logins and pulls are
made by the daemon; the client only passes them on and keeps credentials in its ``DOCKER_CONFIG``.
"""
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .process import Daemon, run
from .require import require_binary

STARTUP_TIMEOUT = 60.0  # dockerd boots its containerd first; slow on a loaded two-core machine
PULL_TIMEOUT = 180.0
CERTS_DIR = Path("/etc/docker/certs.d")


@dataclass(frozen=True)
class DockerImage:
    """What the engine recorded for a pulled image.

    ``repo_digests`` are ``NAME@DIGEST`` for the manifest (or list) the tag resolved to, which
    is how a test tells which build of a multi-platform image it got.
    """

    id: str
    repo_digests: list[str]
    architecture: str

    def digests(self) -> set[str]:
        """The bare digests of ``repo_digests``."""
        return {entry.split("@", 1)[1] for entry in self.repo_digests}


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP to the engine's API socket, for the readiness check."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__("localhost", timeout=2)
        self._socket_path = socket_path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._socket_path))


def _pings(socket_path: Path) -> bool:
    """The API answers ``GET /_ping``: the daemon has finished booting, not just bound its socket."""
    connection = _UnixHTTPConnection(socket_path)
    try:
        connection.request("GET", "/_ping")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _containerd_pid(root: Path) -> int | None:
    """The containerd that the dockerd under ``root`` started, if it is still running."""
    try:
        pid = int((root / "x" / "containerd" / "containerd.pid").read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(root).encode() in command else None


def _unmount_below(directory: Path) -> None:
    """Undo mounts dockerd left under ``directory`` (only after it was killed, not stopped)."""
    prefix = str(directory) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):  # the deepest first
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


class Dockerd:
    """A running dockerd; ``docker(...)`` runs the client against it. A context manager.

    ``registry_mirrors`` and ``insecure_registries`` are the daemon flags of the same names;
    ``https_proxy`` is the daemon's proxy for HTTPS registries.
    """

    def __init__(self, workdir: Path, registry_mirrors: Sequence[str] = (),
                 insecure_registries: Sequence[str] = (), https_proxy: str | None = None) -> None:
        binary = require_binary("dockerd")
        self._client = require_binary("docker")
        workdir.mkdir(parents=True, exist_ok=True)
        self._daemon: Daemon | None = None
        self.root = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        self.socket = self.root / "d.sock"
        # Not the directory's name: mkdtemp's random part may hold "_" next to its "-", which
        # containerd refuses in a namespace ("dk-_u79olqy": separators must stand alone).
        namespace = "metahub-test-" + secrets.token_hex(6)
        config = self.root / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(self.root / "key.json")}))
        self._client_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                            "HOME": str(self.root / "home"),
                            "DOCKER_CONFIG": str(self.root / "client")}
        (self.root / "client").mkdir()
        argv: list[str | Path] = [
            binary, "--config-file", config, "--data-root", self.root / "root",
            "--exec-root", self.root / "x", "--pidfile", self.root / "pid",
            "-H", f"unix://{self.socket}", "--iptables=false", "--ip6tables=false",
            "--bridge=none", "--storage-driver=vfs", "--containerd-namespace", namespace,
            "--containerd-plugins-namespace", namespace + "p"]
        for mirror in registry_mirrors:
            argv += ["--registry-mirror", mirror]
        for registry in insecure_registries:
            argv += ["--insecure-registry", registry]
        # Only what the daemon needs: a developer's proxy settings must not reach loopback peers.
        env = {"PATH": self._client_env["PATH"], "HOME": str(self.root / "home")}
        if https_proxy is not None:
            env["HTTPS_PROXY"] = https_proxy
        try:
            self._daemon = Daemon(argv, workdir / "dockerd.log", env=env)
            self._daemon.wait_ready(lambda: _pings(self.socket), timeout=STARTUP_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def docker(self, *arguments: str, input: bytes | None = None,
               timeout: float = PULL_TIMEOUT) -> bytes:
        """Run the ``docker`` client against this daemon; raise with its stderr on failure."""
        return run([self._client, "-H", f"unix://{self.socket}", *arguments],
                   env=self._client_env, timeout=timeout, input=input)

    def login(self, host: str, user: str, password: str) -> None:
        """``docker login`` with the password on stdin, as scripts are told to do it."""
        self.docker("login", "--username", user, "--password-stdin", host, input=password.encode())

    def logout(self, host: str) -> None:
        self.docker("logout", host)

    def pull(self, ref: str) -> DockerImage:
        """``docker pull ref`` and what the engine then says about the image."""
        self.docker("pull", "--quiet", ref)
        return self.inspect(ref)

    def inspect(self, ref: str) -> DockerImage:
        [info] = json.loads(self.docker("image", "inspect", ref))
        return DockerImage(info["Id"], info["RepoDigests"], info["Architecture"])

    def log(self) -> str:
        return self._daemon.log_path.read_text(errors="replace") if self._daemon else ""

    def stop(self) -> None:
        """Stop dockerd and its containerd and remove everything it kept; safe to call twice."""
        if self._daemon is not None:
            self._daemon.stop()
        containerd = _containerd_pid(self.root)
        if containerd is not None:
            # Its own session, so not in the daemon's process group; dockerd stops it on a clean
            # exit and the kernel kills it when dockerd is killed (PDEATHSIG), this is the backstop.
            try:
                os.kill(containerd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


class TrustedCA:
    """The CA file dockerd reads for registry ``host`` (``HOST:PORT``), there while in use.

    dockerd 20.10 reads a registry's CA only from /etc/docker/certs.d/HOST:PORT/ca.crt, a
    machine-wide place; tests use a fresh port each time, so the directory is theirs alone, and it
    is removed on exit.
    """

    def __init__(self, host: str, ca_path: Path) -> None:
        self._made_certs_dir = not CERTS_DIR.exists()
        self.directory = CERTS_DIR / host
        self.directory.mkdir(parents=True, exist_ok=False)
        shutil.copyfile(ca_path, self.directory / "ca.crt")

    def remove(self) -> None:
        """Remove the host's directory, and /etc/docker/certs.d too if this made it."""
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._made_certs_dir:
            try:
                CERTS_DIR.rmdir()
            except OSError:
                pass  # someone else put a registry's CA there meanwhile

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.remove()
