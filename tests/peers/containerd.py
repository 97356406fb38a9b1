"""A private containerd daemon and ``ctr`` as a pulling client.

The daemon's root, state and sockets all live in directories the harness owns, so it never meets
the system's containerd. Plugins that need privileges or hardware (CRI, devmapper, btrfs, zfs,
aufs) are disabled; pulls unpack with the ``native`` snapshotter, which needs no mounts. Sockets go
in a short /tmp directory because unix socket paths are limited to 108 bytes and pytest's tmp paths
can be longer.

ctr quirks: ``--plain-http`` is needed for http registries unless a ``hosts.toml`` names an
``http://`` host; with ``--hosts-dir`` requests to a mirror carry ``?ns=ORIGINAL_HOST``, percent-
encoded (``?ns=upstream.test%3A5000``). At a token realm, containerd with credentials POSTs an
OAuth2 password grant (GET only if that fails); without credentials it GETs an anonymous token.
"""
import json
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from .process import Daemon, run
from .require import require_binary

DISABLED_PLUGINS = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs"]


def _accepts(socket_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(socket_path))
            return True
        except OSError:
            return False


class Containerd:
    """A running containerd; ``address`` is its gRPC socket for ``ctr --address``."""

    def __init__(self, workdir: Path) -> None:
        binary = require_binary("containerd")
        require_binary("ctr")
        workdir.mkdir(parents=True, exist_ok=True)
        self._daemon: Daemon | None = None
        self._sockets = Path(tempfile.mkdtemp(prefix="mh-ctrd-"))
        self.address = str(self._sockets / "containerd.sock")
        config = workdir / "config.toml"
        config.write_text(
            f'version = 2\nroot = "{workdir / "root"}"\nstate = "{workdir / "state"}"\n'
            f"disabled_plugins = {json.dumps(DISABLED_PLUGINS)}\n"
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self._sockets / "ttrpc.sock"}"\n'
            f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{workdir / "opt"}"\n')
        try:
            self._daemon = Daemon([binary, "--config", config], workdir / "containerd.log")
            self._daemon.wait_ready(lambda: _accepts(Path(self.address)))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill containerd and remove its sockets; safe to call twice."""
        if self._daemon is not None:
            self._daemon.stop()
        shutil.rmtree(self._sockets, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def ctr(address: str, *arguments: str | Path) -> bytes:
    """Run ``ctr`` against the daemon at ``address``; raise with its stderr on failure."""
    return run([require_binary("ctr"), "--address", address, *arguments])


def ctr_pull(address: str, ref: str, user: str | None = None, plain_http: bool = True,
             hosts_dir: Path | None = None, platform: str | None = None) -> None:
    """``ctr images pull`` (and unpack) ``ref``; ``user`` is ``user:pass``."""
    options: list[str | Path] = ["--snapshotter", "native"]
    options += ["--plain-http"] if plain_http else []
    options += ["--user", user] if user else []
    options += ["--hosts-dir", hosts_dir] if hosts_dir else []
    options += ["--platform", platform] if platform else []
    ctr(address, "images", "pull", *options, ref)


def image_digest(address: str, ref: str) -> str:
    """The digest containerd stored for ``ref`` (the index digest for a multi-platform pull)."""
    for line in ctr(address, "images", "ls").decode().splitlines()[1:]:
        name, _media_type, digest, *_ = line.split()
        if name == ref:
            return digest
    raise LookupError(f"containerd has no image {ref}")


def content(address: str, digest: str) -> bytes:
    """A blob from containerd's content store, exactly as it was pulled."""
    return ctr(address, "content", "get", digest)


def write_hosts_toml(hosts_dir: Path, host: str, mirror_url: str, server: str | None = None) -> Path:
    """Make ``mirror_url`` the mirror for registry ``host`` in a ``--hosts-dir`` tree.

    ``server`` is where containerd would go without the mirror; the default points at a closed
    port so that a test cannot silently pass by bypassing the mirror.
    """
    directory = hosts_dir / host
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(f'server = "{server or "http://127.0.0.1:9"}"\n\n'
                    f'[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n')
    return path
