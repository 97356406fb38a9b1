"""Cluster-wide leases as files: exclusive, heartbeated, taken over when stale, released only by us."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest

from storage import InvalidLeaseName, Lease, Leases
from storage.lease import _read
from tests.unit.fakes import ManualClock

NAME = "ab" * 32  # a digest's hex, as the fetch leases use


@pytest.fixture
def clock() -> ManualClock:
    """Starts at the real time (files are created with the real time) and moves only when told."""
    return ManualClock(time.time())


@pytest.fixture
def root(tmp_path) -> str:
    return str(tmp_path / "store")


def test_take_is_exclusive_and_holder_is_readable(root, clock) -> None:
    a, b = Leases(root, clock, node="node-a"), Leases(root, clock, node="node-b")
    lease = a.try_take(NAME, stale_after=30)
    assert lease is not None and lease.holder.startswith(f"node-a-{os.getpid()}-")
    assert b.try_take(NAME, stale_after=30) is None
    info = b.holder(NAME)
    assert info is not None
    assert (info.name, info.holder, info.taken_at) == (NAME, lease.holder, clock.now)
    with open(os.path.join(root, "leases", NAME + ".lease")) as f:
        assert json.load(f) == {"holder": lease.holder, "taken_at": clock.now}
    assert b.holder("gc") is None


def test_each_take_has_its_own_holder_id(root, clock) -> None:
    leases = Leases(root, clock)
    first = leases.try_take("gc")
    assert first is not None and first.release()
    second = leases.try_take("gc")
    assert second is not None and second.holder != first.holder


def test_release_frees_the_lease(root, clock) -> None:
    leases = Leases(root, clock)
    lease = leases.try_take("gc")
    assert lease.release() is True
    assert leases.holder("gc") is None
    assert lease.release() is False
    assert leases.try_take("gc") is not None
    assert sorted(os.listdir(os.path.join(root, "leases"))) == ["gc.lease"]  # no tombs left


def test_context_manager_releases(root, clock) -> None:
    leases = Leases(root, clock)
    with leases.try_take("gc") as lease:
        assert leases.holder("gc").holder == lease.holder
    assert leases.holder("gc") is None


def test_release_of_someone_elses_lease_does_nothing(root, clock) -> None:
    leases = Leases(root, clock)
    theirs = leases.try_take(NAME)
    forged = Lease(leases, NAME, "node-x-1-000000000000", clock.now)
    assert forged.release() is False
    assert forged.heartbeat() is False
    assert leases.holder(NAME).holder == theirs.holder


def test_no_takeover_without_stale_after(root, clock) -> None:
    leases = Leases(root, clock)
    assert leases.try_take("gc") is not None
    clock.advance(10_000)
    assert leases.try_take("gc") is None


def test_stale_lease_is_taken_over_and_old_holder_learns_it(root, clock) -> None:
    a, b = Leases(root, clock, node="a"), Leases(root, clock, node="b")
    old = a.try_take(NAME, stale_after=30)
    clock.advance(29)
    assert b.try_take(NAME, stale_after=30) is None
    clock.advance(2)
    new = b.try_take(NAME, stale_after=30)
    assert new is not None and new.holder.startswith("b-")
    # The old holder's heartbeat reports the loss and does not refresh the new lease.
    before = os.stat(a.path(NAME)).st_mtime
    clock.advance(5)
    assert old.heartbeat() is False
    assert os.stat(a.path(NAME)).st_mtime == before
    # Nor does its release remove the new holder's lease.
    assert old.release() is False
    assert a.holder(NAME).holder == new.holder
    assert sorted(os.listdir(a.dir)) == [NAME + ".lease"]  # no break file or tomb left


def test_heartbeat_keeps_the_lease_alive(root, clock) -> None:
    a, b = Leases(root, clock), Leases(root, clock)
    lease = a.try_take("gc", stale_after=30)
    for _ in range(10):
        clock.advance(20)
        assert lease.heartbeat() is True
        assert lease.last_heartbeat == clock.now
        assert b.try_take("gc", stale_after=30) is None
    assert a.holder("gc").heartbeat == clock.now
    clock.advance(31)
    assert b.try_take("gc", stale_after=30) is not None


def test_lease_without_content_is_alive_until_stale(root, clock) -> None:
    """A creator that died between create and write leaves an empty file; it ages like any other."""
    leases = Leases(root, clock)
    open(leases.path("gc"), "wb").close()
    info = leases.holder("gc")
    assert info is not None and info.holder is None and info.taken_at is None
    assert leases.try_take("gc", stale_after=30) is None
    clock.advance(31)
    assert leases.try_take("gc", stale_after=30) is not None


def test_the_mtime_is_the_heartbeat(root) -> None:
    """What another node sees: a lease whose mtime is old is stale, whatever its content says."""
    holder, other = Leases(root), Leases(root)
    assert holder.try_take("gc") is not None
    assert other.try_take("gc", stale_after=30) is None
    past = time.time() - 31
    os.utime(holder.path("gc"), (past, past))
    assert other.holder("gc").heartbeat == pytest.approx(past)
    assert other.try_take("gc", stale_after=30) is not None


def test_a_fresh_break_file_means_someone_else_is_taking_over(root, clock) -> None:
    leases = Leases(root, clock)
    leases.try_take(NAME)
    breaker = Leases(root, clock)
    with open(os.path.join(leases.dir, NAME + ".break"), "w") as f:
        json.dump({"holder": "other", "taken_at": clock.now}, f)
    clock.advance(31)
    os.utime(os.path.join(leases.dir, NAME + ".break"), (clock.now, clock.now))
    assert breaker.try_take(NAME, stale_after=30) is None


def test_a_dead_breakers_file_does_not_block_takeover_forever(root, clock) -> None:
    leases = Leases(root, clock)
    leases.try_take(NAME)
    with open(os.path.join(leases.dir, NAME + ".break"), "w") as f:
        json.dump({"holder": "dead", "taken_at": clock.now}, f)
    clock.advance(31)
    lease = leases.try_take(NAME, stale_after=30)
    assert lease is not None
    assert sorted(os.listdir(leases.dir)) == [NAME + ".lease"]


def test_remove_if_unchanged_puts_back_a_newer_lease(root, clock) -> None:
    """The rename-then-check step: a file replaced since our look is restored, not removed."""
    leases = Leases(root, clock)
    first = leases.try_take(NAME)
    seen = _read(leases.path(NAME), NAME)
    first.release()
    second = leases.try_take(NAME)
    assert leases._remove_if_unchanged(leases.path(NAME), seen) is False
    assert leases.holder(NAME).holder == second.holder
    assert second.heartbeat() is True
    assert sorted(os.listdir(leases.dir)) == [NAME + ".lease"]


@pytest.mark.parametrize("error", [FileExistsError, PermissionError])
def test_put_back_without_working_link(root, clock, monkeypatch, error) -> None:
    """A spurious EEXIST (a stale cached dentry) or no hard links: the newer lease is renamed back."""
    leases = Leases(root, clock)
    first = leases.try_take(NAME)
    seen = _read(leases.path(NAME), NAME)
    first.release()
    second = leases.try_take(NAME)

    def no_link(src, dst):
        raise error(dst)

    monkeypatch.setattr(os, "link", no_link)
    assert leases._remove_if_unchanged(leases.path(NAME), seen) is False
    assert leases.holder(NAME).holder == second.holder
    assert sorted(os.listdir(leases.dir)) == [NAME + ".lease"]


def test_clean_removes_only_long_dead_leftovers(root, clock) -> None:
    leases = Leases(root, clock)
    leases.try_take("dead")
    open(os.path.join(leases.dir, "x.0123456789abcdef.tomb"), "wb").close()
    clock.advance(1000)
    alive = leases.try_take("alive")
    assert leases.clean(older_than=600) == 2
    assert sorted(os.listdir(leases.dir)) == ["alive.lease"]
    assert leases.holder("alive").holder == alive.holder
    assert [info.name for info in leases.iter_leases()] == ["alive"]


@pytest.mark.parametrize(
    "name", ["", "..", ".x", "a/b", "/abs", "a\0b", "sha256:" + NAME, "x" * 129, "a.b"]
)
def test_invalid_names_are_refused(root, clock, name: str) -> None:
    with pytest.raises(InvalidLeaseName):
        Leases(root, clock).try_take(name)


# -- across processes ---------------------------------------------------------------------------

ROUNDS = 25


def _contend(
    root: str, barrier, results, stale_after: float | None, make_stale: bool, index: int
) -> None:
    taker = Leases(root, node=f"p{index}")
    for round_ in range(ROUNDS):
        if make_stale and index == 0:
            # A holder that died 100 s ago.
            assert Leases(root, node="dead").try_take(NAME) is not None
            os.utime(taker.path(NAME), (time.time() - 100, time.time() - 100))
        barrier.wait()
        lease = taker.try_take(NAME, stale_after)
        results.put((round_, None if lease is None else lease.holder))
        barrier.wait()  # everyone has tried before the winner lets go
        if lease is not None:
            assert lease.release()
        barrier.wait()


def _race(root: str, processes: int, stale_after: float | None, make_stale: bool) -> dict[int, list]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_contend, args=(root, barrier, results, stale_after, make_stale, i))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, list] = {}
    for _ in range(ROUNDS * processes):
        round_, holder = results.get(timeout=60)
        outcomes.setdefault(round_, []).append(holder)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return outcomes


def test_exactly_one_of_four_processes_takes_a_free_lease(root) -> None:
    Leases(root)  # create the directory before forking
    outcomes = _race(root, 4, stale_after=30, make_stale=False)
    assert len(outcomes) == ROUNDS
    for holders in outcomes.values():
        assert len(holders) == 4
        assert len([h for h in holders if h is not None]) == 1, holders


def test_exactly_one_of_several_processes_takes_over_a_stale_lease(root) -> None:
    Leases(root)
    outcomes = _race(root, 6, stale_after=10, make_stale=True)
    assert len(outcomes) == ROUNDS
    for holders in outcomes.values():
        winners = [h for h in holders if h is not None]
        assert len(winners) == 1, holders
        assert not winners[0].startswith("dead-")
    assert os.listdir(os.path.join(root, "leases")) == []


def _hold(root: str, ready, interval: float) -> None:
    lease = Leases(root, node="holder").try_take("gc")
    assert lease is not None
    ready.set()
    while lease.heartbeat():
        time.sleep(interval)


def test_a_heartbeating_process_keeps_its_lease_until_killed(root) -> None:
    stale_after = 1.0
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(root, ready, 0.05))
    holder.start()
    try:
        assert ready.wait(30)
        other = Leases(root, node="other")
        deadline = time.monotonic() + 3 * stale_after
        while time.monotonic() < deadline:
            assert other.try_take("gc", stale_after) is None
            time.sleep(0.05)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    killed = time.monotonic()
    while (lease := other.try_take("gc", stale_after)) is None:
        assert time.monotonic() - killed < 10 * stale_after, "a dead lease was never taken over"
        time.sleep(0.05)
    assert lease.holder.startswith("other-")


def test_an_exclusive_create_refused_with_eperm_counts_as_taken(tmp_path, monkeypatch) -> None:
    """sshfs answers a lost O_EXCL race with EPERM: the lease is someone else's, not an error."""
    from storage import Leases

    leases = Leases(str(tmp_path))
    assert leases.try_take("abc") is not None
    real_open = os.open

    def sshfs_like_open(path, flags, *args):
        if flags & os.O_EXCL and os.path.exists(path):
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", sshfs_like_open)
    assert Leases(str(tmp_path)).try_take("abc") is None
