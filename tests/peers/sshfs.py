"""A directory shared over sshfs, as a second "node" would see the shared blob store.

``SshfsMount(source_dir, workdir)`` starts a private ``sshd`` on 127.0.0.1 (its own host key,
authorized key, pid file and config, all in ``workdir``; the system's sshd and /root/.ssh are never
used) and mounts ``source_dir`` at ``workdir/mnt`` with ``sshfs -f`` as a ``Daemon``. ``stop()``
unmounts (``fusermount3 -u``, lazily with ``-z`` if that fails), then stops sshfs and sshd. ``stall()`` stops
the sshfs client, or with ``server=True`` the sshd session running the sftp server (SIGSTOP), so
every call through the mount hangs in the kernel as on a stalled NFS server, until ``unstall()``
(SIGCONT); a clean ``stop()`` unstalls first.

Caching is turned down as far as sshfs 3.7 allows (``dir_cache=no`` and zero FUSE attr/entry/
negative timeouts), so a change made at the source is seen through the mount on the next call, as
another node would see it. File contents are read afresh on every ``open`` (no ``kernel_cache``);
``direct_io`` is left off so that mmap keeps working. sshfs 3 rejects ``hard_remove`` and accepts
``cache=no`` only as an old spelling of ``dir_cache=no``.

What differs from a local filesystem (OpenSSH 9.2 sftp-server, sshfs 3.7.3, FUSE 3.14):

- Timestamps go over SFTP v3 as whole seconds: ``os.utime(ns=...)`` through the mount stores the
  mtime truncated to the second, and ``st_mtime_ns`` read through the mount has no fraction even
  when the source file has one.
- ``st_nlink`` through the mount is always 1 and ``st_ino`` is FUSE's own number, so hard links
  made with ``os.link`` (which works, via OpenSSH's hardlink extension) are only recognisable at
  the source.
- ``flock``/``fcntl`` locks stay inside one mount: a second mount, or the source, gets the same
  exclusive lock at the same time. Only ``O_CREAT|O_EXCL``, ``link`` and ``mkdir`` are atomic
  across mounts (they are done by the server).
- Rename onto an existing name works without ``workaround=rename`` (OpenSSH's posix-rename
  extension). A file unlinked, or renamed over, while still open through the mount is kept as
  ``.fuse_hiddenNNNN`` in its directory until the last close has been processed (a moment after
  ``close`` returns), so directory listings of the share can show such names.

Login is as the current user with an ed25519 key; as root this relies on ``PermitRootLogin
prohibit-password``, and with ``UsePAM no`` sshd refuses an account whose password is locked
with ``!`` (the sshd log then says so).
"""
import os
import pwd
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from .ports import LOOPBACK, free_port
from .process import Daemon, PeerError, run
from .require import missing, require_binary

STARTUP_ATTEMPTS = 3
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without its privilege separation dir

SSH_OPTIONS = ("IdentitiesOnly=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
               "BatchMode=yes", "ConnectTimeout=10", "LogLevel=ERROR")
SSHFS_OPTIONS = ("reconnect", "dir_cache=no", "attr_timeout=0", "entry_timeout=0",
                 "negative_timeout=0")


def require_sshd() -> str:
    """``sshd``'s path, also looked for in the sbin directories that are often not on PATH."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which("sshd", path=search) or require_binary("sshd")


def require_fuse() -> None:
    """Skip (fail when CI=true, as ``require_binary`` does) unless /dev/fuse can be opened."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
        return
    except OSError as error:
        missing(f"FUSE is not available here: cannot open /dev/fuse ({error.strerror})")


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point right now, according to /proc/self/mounts."""
    target = str(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as mounts:
        for line in mounts:
            point = line.split(" ")[1]
            # /proc escapes space, tab, newline and backslash as octal
            for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"),
                                 ("\\134", "\\")):
                point = point.replace(escape, char)
            if point == target:
                return True
    return False


class SshfsMount:
    """``source_dir`` mounted over sshfs at ``path`` (``workdir/mnt``); ``port`` is sshd's."""

    def __init__(self, source_dir: Path, workdir: Path) -> None:
        sshd = require_sshd()
        sshfs = require_binary("sshfs")
        require_binary("ssh")  # sshfs runs it
        keygen = require_binary("ssh-keygen")
        self._fusermount = shutil.which("fusermount3") or require_binary("fusermount")
        require_fuse()
        self.source = Path(source_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self.path = self.workdir / "mnt"
        self.port = 0
        self._sshd: Daemon | None = None
        self._sshfs: Daemon | None = None
        self._stalled: list[int] = []  # processes stall() stopped
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        self._user = pwd.getpwuid(os.getuid()).pw_name
        try:
            self._make_keys(keygen)
            self._start_sshd(sshd)
            self._mount(sshfs)
        except BaseException:
            self.stop()
            raise

    def _make_keys(self, keygen: str) -> None:
        for name in ("host_key", "client_key"):
            for stale in (self.workdir / name, self.workdir / f"{name}.pub"):
                stale.unlink(missing_ok=True)
            run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"metahub-test-{name}",
                 "-f", self.workdir / name])
        shutil.copyfile(self.workdir / "client_key.pub", self.workdir / "authorized_keys")

    def _start_sshd(self, binary: str) -> None:
        """Start on a free port, retrying if another process took the port in the meantime."""
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        log = self.workdir / "sshd.log"
        for attempt in range(STARTUP_ATTEMPTS):
            self.port = free_port()
            config = self.workdir / "sshd_config"
            config.write_text(
                f"ListenAddress {LOOPBACK}:{self.port}\n"
                f"HostKey {self.workdir / 'host_key'}\n"
                f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
                f"PidFile {self.workdir / 'sshd.pid'}\n"
                "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
                f"AllowUsers {self._user}\nAuthenticationMethods publickey\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "X11Forwarding no\nAllowTcpForwarding no\nAllowAgentForwarding no\n"
                "PrintMotd no\nSubsystem sftp internal-sftp\n")
            start = log.stat().st_size if log.exists() else 0
            self._sshd = Daemon([binary, "-D", "-e", "-f", config], log)
            listening = f"Server listening on {LOOPBACK} port {self.port}"
            try:
                self._sshd.wait_ready(lambda: listening in _read_from(log, start))
                return
            except PeerError as error:
                retry = "address already in use" in str(error).lower()
                if not retry or attempt + 1 == STARTUP_ATTEMPTS:
                    raise

    def _mount(self, binary: str) -> None:
        options = [f"IdentityFile={self.workdir / 'client_key'}", *SSH_OPTIONS, *SSHFS_OPTIONS]
        argv = [binary, "-f", "-F", "/dev/null", "-p", str(self.port), "-o", ",".join(options),
                f"{self._user}@{LOOPBACK}:{self.source}", self.path]
        self._sshfs = Daemon(argv, self.workdir / "sshfs.log")
        try:
            # sshfs 3.7 mounts before it logs in, and exits (the mount goes with it) if that
            # fails, so the mount is ready only once a call through it has been answered.
            self._sshfs.wait_ready(lambda: mounted(self.path) and _answers(self.path))
        except PeerError as error:
            assert self._sshd is not None
            raise PeerError(f"{error}\nsshd log {self._sshd.log_path}:\n"
                            f"{self._sshd.log_tail(10)}") from None

    def stall(self, server: bool = False) -> None:
        """Stop sshfs, or the sftp server's sshd session processes (SIGSTOP): calls through the
        mount hang until :meth:`unstall`."""
        assert self._sshfs is not None and self._sshd is not None
        self._stalled = _descendants(self._sshd.process.pid) if server else [self._sshfs.process.pid]
        assert self._stalled, "no sshd session serves the mount"
        for pid in self._stalled:
            os.kill(pid, signal.SIGSTOP)

    def unstall(self) -> None:
        """Let what :meth:`stall` stopped run again (SIGCONT): the hung calls complete."""
        for pid in self._stalled:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self._stalled = []

    def stop(self) -> None:
        """Unmount, then stop sshfs and sshd; safe to call twice. Raises if the mount survives."""
        self.unstall()
        problems: list[str] = []
        if mounted(self.path):
            for lazy in ([], ["-z"]):
                try:
                    run([self._fusermount, "-u", *lazy, self.path], timeout=15)
                except PeerError as error:
                    problems.append(str(error))
                if not mounted(self.path):
                    break
        if self._sshfs is not None:
            self._sshfs.stop()
        if self._sshd is not None:
            self._sshd.stop()
        _wait_until(lambda: not mounted(self.path), timeout=2)
        if mounted(self.path):
            raise PeerError(f"{self.path} is still mounted:\n" + "\n".join(problems))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _descendants(parent: int) -> list[int]:
    """The processes below ``parent`` (from /proc: each process's parent is in its stat line)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _answers(path: Path) -> bool:
    try:
        os.statvfs(path)  # blocks until sshfs has logged in; ENOTCONN once it has given up
        return True
    except OSError:
        return False


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
