"""Cluster-wide leases: plain files in the shared store directory, one per lease.

Used for "fetch once per cluster" (the name is a digest's 64 hex) and "one node at a time runs gc"
(the name is ``gc``). Layout under the store root::

    leases/<name>.lease          a held lease: JSON {"holder": ..., "taken_at": ...}; mtime = heartbeat
    leases/<name>.break          held for milliseconds by the one node breaking a stale lease
    leases/<name>.<rand>.tomb    a lease or break file on its way out (leftovers: :meth:`Leases.clean`)

The protocol
------------

* **Take**: ``open(O_CREAT | O_EXCL)`` of ``<name>.lease``, then write the JSON, fsync, and stamp
  the mtime. Exactly one creator succeeds. The holder id (``node-pid-random``) is new for every take,
  so a process that takes the same name twice, or a forked child, is never mistaken for another.
* **Heartbeat**: open the lease, check that it still names us, and set its mtime on *that open file*
  (``futimens``), so a heartbeat can only ever refresh our own inode, never a successor's.
* **Liveness** of a lease is its mtime, stamped explicitly from the holder's clock (the injectable
  ``clock``; see "clocks" below) and compared with the observer's clock.
* **Take over** (:meth:`Leases.try_take` with ``stale_after``): a lease whose mtime is older than
  ``stale_after`` is broken by one node at a time: the breaker first takes ``<name>.break`` by
  exclusive create (the others give up), reads the lease again, and if it is still stale removes it
  with *remove-if-unchanged* and exclusively creates its own. So of several concurrent takers exactly
  one wins, and a lease that was refreshed or taken meanwhile is left alone.
* **Remove-if-unchanged** (used by release, takeover and clean): rename the file to a unique tomb
  name (atomic), then look at what was moved: if it is the very file we judged (same inode, mtime,
  size and content), unlink it; otherwise it is a newer file that appeared in between, and we put it
  back with ``link(tomb, name)`` (atomic, fails if the name was taken again meanwhile).
* **Release** removes the lease only if it still names us (read, then remove-if-unchanged).

Why this is safe on NFS and other shared filesystems: exclusive create is atomic on NFSv3 (the
EXCLUSIVE create mode with a verifier makes a retransmitted create idempotent) and NFSv4, and on
sshfs (SFTP ``SSH_FXF_EXCL``); rename within one directory is atomic on all of them; ``link`` is the
classic NFS lock-file primitive (and sshfs's ``hardlink@openssh.com``). Every read of a lease opens the
file before ``fstat``, so NFS close-to-open consistency revalidates its attributes rather than
trusting the attribute cache (``actimeo``): do not mount with ``nocto``. Mount with
``lookupcache=none`` (or at least ``positive``) so a lease created or removed by another node is not
hidden by a cached directory entry. sshfs must be mounted with ``dir_cache=no,attr_timeout=0,
entry_timeout=0,negative_timeout=0``: with its default 20-second directory cache a node sees leases
that another node removed long ago (and ``link``/``O_EXCL`` fail on them), which was observed in
testing; with those options, concurrent takers through sshfs and through the local path behaved
exactly like local ones. sshfs (SFTP v3) keeps whole-second mtimes, so ``stale_after`` must be
many seconds. A file is recognised by its content (the holder id is unique), size and mtime, not
only by its inode number, which FUSE filesystems do not preserve.

What is *not* guaranteed (and why that is acceptable)
------------------------------------------------------

Correctness of the store never depends on a lease: two nodes that fetch the same blob both verify
it and the result is one correct file; two concurrent collectors evict overlapping sets of old
blobs. A lease only saves work. The remaining windows:

* Release and takeover can, in a window of one rename, move away a lease that was replaced an
  instant earlier; it is put back with ``link``, and only if a *third* node created the lease in
  that same instant is the replaced lease lost. Its holder learns it at its next heartbeat
  (``heartbeat()`` returns False). Plain files offer no compare-and-unlink, so some window remains.
* A break file left by a node that died while breaking delays takeover by another ``stale_after``.
* A holder that stops heartbeating for ``stale_after`` (a stalled mount, a paused VM) loses its lease
  while still believing it holds it until its next heartbeat.
* Between the exclusive create and the stamp, a new lease briefly carries the mtime the server gave
  it at creation (fresh, if clocks agree); with NFSv3's exclusive create it is, until the client's
  follow-up SETATTR, the create verifier, which may look arbitrarily old. A taker that reads the
  lease in that instant may judge it stale; the break protocol re-reads it under the break file
  first, which almost always sees the stamped time, but this is not airtight. NFSv4.1 sets the
  attributes in the create itself.

Clocks: heartbeats are stamped with explicit times from ``clock`` (``os.utime(fd, (now, now))``),
not with the server's time (``os.utime(fd)``, which NFS turns into SET_TO_SERVER_TIME but FUSE
filesystems such as sshfs stamp from the client's clock), because staleness is judged by comparing
with the observer's own clock anyway: a server stamp would trade node-to-node skew for
node-to-server skew and gain nothing, while explicit times keep the clock injectable in tests. The
nodes' clocks (and the file server's, which stamps a file at creation) must therefore agree to well
within ``stale_after`` (run NTP); choose ``stale_after`` as several heartbeat intervals plus the
worst skew. An observer whose clock runs ahead takes over live leases early, and a holder whose
clock lags loses its lease early (duplicate work in both cases); the opposite skews delay takeover
of a dead holder's lease. Setting explicit times requires owning the file: all nodes must run as
the same uid.

All calls block on file I/O; call them from a thread when the directory may stall.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .files import fsync_dir, write_all
from .exclusive import create_exclusive

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_LEASE = ".lease"
_BREAK = ".break"
_TOMB = ".tomb"
_MAX_CONTENT = 4096


class InvalidLeaseName(ValueError):
    """Lease names are 1-128 of ``[A-Za-z0-9_-]``, starting with a letter or digit."""


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease file says, as read by anyone."""

    name: str
    holder: str | None  # None: the file is unreadable (being created, or its creator died first)
    taken_at: float | None
    heartbeat: float  # the file's mtime: taken_at, then the last heartbeat

    def age(self, now: float) -> float:
        return now - self.heartbeat


@dataclass(frozen=True)
class _Seen:
    """One look at a lease file: enough to recognise exactly that file later."""

    info: LeaseInfo
    identity: tuple[int, int, int, int, bytes]  # dev, ino, mtime_ns, size, content

    def stale(self, now: float, stale_after: float) -> bool:
        return self.info.age(now) > stale_after


def _gone(error: OSError) -> bool:
    return isinstance(error, FileNotFoundError) or error.errno == errno.ESTALE


def _parse(name: str, raw: bytes, st: os.stat_result) -> LeaseInfo:
    holder: str | None = None
    taken_at: float | None = None
    try:
        content = json.loads(raw)
        if isinstance(content, dict) and isinstance(content.get("holder"), str):
            holder = content["holder"]
            if isinstance(content.get("taken_at"), (int, float)):
                taken_at = float(content["taken_at"])
    except ValueError:
        pass
    return LeaseInfo(name, holder, taken_at, st.st_mtime)


def _read(path: str, name: str) -> _Seen | None:
    """Open (which revalidates NFS attributes), fstat and read a lease file; None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        if _gone(error):
            return None
        raise
    try:
        st = os.fstat(fd)
        raw = os.pread(fd, _MAX_CONTENT, 0)
    except OSError as error:
        if _gone(error):
            return None
        raise
    finally:
        os.close(fd)
    identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, raw)
    return _Seen(_parse(name, raw, st), identity)


def _create(path: str, holder: str, now: float) -> bool:
    """Exclusively create a lease file naming ``holder``; False if the name exists."""
    fd = create_exclusive(path)
    if fd is None:
        return False
    try:
        write_all(fd, json.dumps({"holder": holder, "taken_at": now}).encode())
        os.fsync(fd)
        # After the data is on the server, or a later flush would stamp the server's time.
        os.utime(fd, (now, now))
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    return True


class Lease:
    """A lease this process took. Use as a context manager to release it on exit."""

    def __init__(self, leases: Leases, name: str, holder: str, taken_at: float) -> None:
        self.leases = leases
        self.name = name
        self.holder = holder
        self.taken_at = taken_at
        self.last_heartbeat = taken_at

    def heartbeat(self) -> bool:
        """Refresh the lease; False if it is no longer ours (taken over, or removed)."""
        return self.leases.heartbeat(self)

    def release(self) -> bool:
        """Remove the lease if it is still ours; True if it was."""
        return self.leases.release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<Lease {self.name} held by {self.holder}>"


class Leases:
    """The leases under ``<root>/leases``; ``root`` is the (shared) store directory.

    ``node`` names this node in holder ids (default: the host name). ``clock`` is the time source
    for stamps and staleness, injectable for tests.
    """

    def __init__(
        self, root: str, clock: Callable[[], float] = time.time, node: str | None = None
    ) -> None:
        self.root = os.path.abspath(root)
        self.dir = os.path.join(self.root, "leases")
        self.clock = clock
        self.node = node or socket.gethostname()
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidLeaseName(f"invalid lease name: {name!r:.100}")
        return os.path.join(self.dir, name + _LEASE)

    def _new_holder(self) -> str:
        return f"{self.node}-{os.getpid()}-{secrets.token_hex(6)}"

    # -- taking ----------------------------------------------------------------------------------

    def try_take(self, name: str, stale_after: float | None = None) -> Lease | None:
        """Take the lease ``name``, or None if someone else holds it.

        With ``stale_after`` (seconds), a lease without a sign of life for that long is taken over;
        of several nodes trying at once exactly one succeeds. Without it, only a free lease is taken.
        """
        path = self.path(name)
        for _ in range(3):
            now = self.clock()
            holder = self._new_holder()
            if _create(path, holder, now):
                return Lease(self, name, holder, now)
            seen = _read(path, name)
            if seen is None:
                continue  # released between our two looks: race for it again
            if stale_after is None or not seen.stale(now, stale_after):
                return None
            return self._break(name, path, stale_after)
        return None

    def _break(self, name: str, path: str, stale_after: float) -> Lease | None:
        breaker = os.path.join(self.dir, name + _BREAK)
        token = self._new_holder()
        if not self._take_breaker(name, breaker, token, stale_after):
            return None
        try:
            current = _read(path, name)
            if current is not None:
                if not current.stale(self.clock(), stale_after):
                    return None  # refreshed or taken over meanwhile
                if not self._remove_if_unchanged(path, current):
                    return None
            now = self.clock()
            holder = self._new_holder()
            if _create(path, holder, now):
                return Lease(self, name, holder, now)
            return None
        finally:
            seen = _read(breaker, name)
            if seen is not None and seen.info.holder == token:
                self._remove_if_unchanged(breaker, seen)

    def _take_breaker(self, name: str, breaker: str, token: str, stale_after: float) -> bool:
        if _create(breaker, token, self.clock()):
            return True
        seen = _read(breaker, name)
        if seen is not None:
            if not seen.stale(self.clock(), stale_after):
                return False  # another node is breaking this lease right now
            # Its breaker died mid-takeover.
            if not self._remove_if_unchanged(breaker, seen):
                return False
        return _create(breaker, token, self.clock())

    def _remove_if_unchanged(self, path: str, seen: _Seen) -> bool:
        """Remove ``path`` only if it is still the file ``seen`` (see the module docstring).

        True if that file is gone (removed by us or already absent), False if a newer file is there.
        """
        base = os.path.basename(path).rsplit(".", 1)[0]
        tomb = os.path.join(self.dir, f"{base}.{secrets.token_hex(8)}{_TOMB}")
        try:
            os.rename(path, tomb)
        except OSError as error:
            if _gone(error):
                return True
            raise
        moved = _read(tomb, seen.info.name)
        if moved is not None and moved.identity == seen.identity:
            _unlink(tomb)
            return True
        # A newer file appeared between our look and the rename: put it back.
        try:
            os.link(tomb, path)
        except OSError:
            # EEXIST: a third node took the name in that instant (the moved lease is then lost, see
            # the module docstring), or a stale cached directory entry claims so. Other errors: no
            # hard links on this filesystem. Either way, rename it back if the name is really free.
            if _read(path, seen.info.name) is None:
                os.rename(tomb, path)
                return False
        _unlink(tomb)
        return False

    # -- holding ---------------------------------------------------------------------------------

    def heartbeat(self, lease: Lease) -> bool:
        """Stamp the lease's mtime if the file still names ``lease``'s holder; else False."""
        path = self.path(lease.name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as error:
            if _gone(error):
                return False
            raise
        try:
            st = os.fstat(fd)
            info = _parse(lease.name, os.pread(fd, _MAX_CONTENT, 0), st)
            if info.holder != lease.holder:
                return False
            now = self.clock()
            # On the file we just checked, so a successor's lease can never be refreshed by us.
            os.utime(fd, (now, now))
        except OSError as error:
            if _gone(error):
                return False
            raise
        finally:
            os.close(fd)
        lease.last_heartbeat = now
        return True

    def release(self, lease: Lease) -> bool:
        """Remove ``lease``'s file if it still names its holder; True if it did."""
        path = self.path(lease.name)
        seen = _read(path, lease.name)
        if seen is None or seen.info.holder != lease.holder:
            return False
        removed = self._remove_if_unchanged(path, seen)
        if removed:
            fsync_dir(self.dir)
        return removed

    # -- looking -----------------------------------------------------------------------------------

    def holder(self, name: str) -> LeaseInfo | None:
        """Who holds ``name`` (holder None: the file is being created or unreadable), or None."""
        seen = _read(self.path(name), name)
        return None if seen is None else seen.info

    def iter_leases(self) -> Iterator[LeaseInfo]:
        """Every lease file present, held or stale."""
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if entry.name.endswith(_LEASE):
                    name = entry.name[: -len(_LEASE)]
                    seen = _read(entry.path, name)
                    if seen is not None:
                        yield seen.info

    def clean(self, older_than: float) -> int:
        """Remove leases, break files and tombs without a sign of life for ``older_than`` seconds.

        For the leftovers of crashed nodes (a digest nobody asks for again keeps its dead lease
        forever otherwise). Choose ``older_than`` well above any ``stale_after`` in use. Returns how
        many files were removed.
        """
        now = self.clock()
        removed = 0
        with os.scandir(self.dir) as entries:
            names = [entry.name for entry in entries]
        for file_name in names:
            path = os.path.join(self.dir, file_name)
            if file_name.endswith(_TOMB):
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if now - st.st_mtime > older_than and _unlink(path):
                    removed += 1
            elif file_name.endswith((_LEASE, _BREAK)):
                seen = _read(path, file_name.rsplit(".", 1)[0])
                if seen is None or not seen.stale(now, older_than):
                    continue
                if self._remove_if_unchanged(path, seen):
                    removed += 1
        return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


__all__ = ["InvalidLeaseName", "Lease", "LeaseInfo", "Leases"]
