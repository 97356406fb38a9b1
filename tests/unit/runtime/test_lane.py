"""Lanes on a shared pool: each lane's jobs in order and one at a time, lanes side by side on a
bounded number of threads, a stalled job holding only its own worker, results back on the reactor."""
from __future__ import annotations

import threading
import time

import pytest

from metahub.runtime.lane import MAX_DEFAULT_WORKERS, LanePool, default_workers

WAIT = 10.0  # seconds a test waits for a thread before it fails


class CollectingReactor:
    """Stands in for ``reactor.callFromThread``: the test runs the calls itself, on its own thread."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.arrived = threading.Semaphore(0)
        self.threads: set[str] = set()

    def callFromThread(self, function, *args) -> None:  # noqa: N802
        with self.lock:
            self.calls.append((function, args))
        self.arrived.release()

    def run(self, count: int) -> None:
        """Wait for ``count`` results, then fire them here, as the reactor would."""
        for _ in range(count):
            assert self.arrived.acquire(timeout=WAIT), "a job's result never reached the reactor"
        with self.lock:
            calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_lanes_jobs_run_in_order_one_at_a_time_off_the_callers_thread() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=4, name="test")
    lane = pool.lane("download abc")
    seen: list[tuple[int, str]] = []
    running = [0]
    overlapped = []

    def job(i: int) -> int:
        running[0] += 1
        overlapped.append(running[0] > 1)
        time.sleep(0.001)  # long enough that a second worker taking the next job would overlap
        seen.append((i, threading.current_thread().name))
        running[0] -= 1
        return i

    results = [lane.run(job, i) for i in range(50)]
    reactor.run(50)
    assert [i for i, _ in seen] == list(range(50))
    assert not any(overlapped)
    assert {name for _, name in seen} == {"download abc"}  # the worker takes the lane's name
    assert threading.current_thread().name not in {name for _, name in seen}
    assert [r.result for r in results] == list(range(50))
    pool.stop()


def test_lanes_run_side_by_side_on_the_pools_threads() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=3, name="test")
    together = threading.Barrier(3, timeout=WAIT)  # passes only if three jobs run at once
    done = [pool.lane(f"lane {n}").run(together.wait) for n in range(3)]
    reactor.run(3)
    assert all(d.called and not hasattr(d.result, "raiseException") for d in done)
    pool.stop()


def test_many_lanes_share_a_bounded_number_of_threads() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=4, name="test-bounded")
    gate = threading.Event()
    started = threading.Semaphore(0)
    peak = [0]

    def ours() -> int:  # a worker bears the pool's name when idle, its lane's while running a job
        return sum(t.name.startswith(("test-bounded-", "lane ")) for t in threading.enumerate())

    def job() -> None:
        peak[0] = max(peak[0], ours())
        started.release()
        assert gate.wait(WAIT)

    lanes = [pool.lane(f"lane {n}") for n in range(40)]
    for lane in lanes:
        lane.run(job)
        lane.run(job)
    for _ in range(4):
        assert started.acquire(timeout=WAIT)
    assert ours() == 4 == pool.workers
    assert pool.busy == 4 and pool.queued == 76
    gate.set()
    reactor.run(80)
    assert peak[0] == 4 and pool.workers == 4
    assert pool.busy == 0 and pool.queued == 0
    pool.stop()
    wait_until(lambda: pool.workers == 0 and ours() == 0, "the workers to end")


def test_a_stalled_job_holds_only_its_worker_and_queues_only_when_every_worker_is_stalled() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=2, name="test")
    stall_a, stall_b = threading.Event(), threading.Event()
    stalled = pool.lane("stalled a")
    stalled.run(stall_a.wait, WAIT)
    after_stall = stalled.run(lambda: "a's next piece")
    others = pool.lane("healthy")
    pieces = [others.run(lambda i=i: i) for i in range(10)]
    reactor.run(10)  # the healthy lane's pieces all ran on the other worker
    assert [p.result for p in pieces] == list(range(10))
    assert not after_stall.called  # behind its own lane's stalled job

    # Now every worker is stuck: a third lane's job waits for one, and nothing else is lost.
    pool.lane("stalled b").run(stall_b.wait, WAIT)
    wait_until(lambda: pool.busy == 2, "the second stall to take the other worker")
    late = pool.lane("late").run(lambda: "late")
    time.sleep(0.05)
    assert pool.queued == 2 and pool.workers == 2  # a's next piece and late's: no third thread
    stall_b.set()
    reactor.run(2)  # b's stall ended, then late ran on that worker
    assert late.result == "late" and not after_stall.called
    stall_a.set()
    reactor.run(2)
    assert after_stall.result == "a's next piece"
    pool.stop()


def test_lanes_with_work_take_turns_for_a_worker() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=1, name="test")
    gate = threading.Event()
    order: list[str] = []
    busy = pool.lane("busy")
    busy.run(lambda: gate.wait(WAIT) and order.append("busy 0"))
    wait_until(lambda: pool.busy == 1, "the first job to start")
    for n in range(1, 5):
        busy.run(lambda n=n: order.append(f"busy {n}"))
    pool.lane("other").run(lambda: order.append("other"))
    gate.set()
    reactor.run(6)
    assert order == ["busy 0", "other", "busy 1", "busy 2", "busy 3", "busy 4"]
    pool.stop()


def test_an_error_reaches_the_caller_and_later_jobs_still_run() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=2, name="test")
    lane = pool.lane("test lane")
    failed = lane.run(lambda: 1 / 0)
    after = lane.run(lambda: "still here")
    reactor.run(2)
    with pytest.raises(ZeroDivisionError):
        failed.result.raiseException()
    failed.addErrback(lambda _: None)
    assert after.result == "still here"
    pool.stop()


def test_a_closed_lane_runs_what_it_was_given_and_refuses_more() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=1, name="test")
    lane = pool.lane("test lane")
    last = lane.run(lambda: "last")
    lane.close()
    with pytest.raises(RuntimeError):
        lane.run(lambda: "too late")
    reactor.run(1)
    assert last.result == "last"
    pool.stop()


def test_stop_ends_idle_workers_without_waiting_for_a_stalled_one_and_a_later_job_still_runs() -> None:
    reactor = CollectingReactor()
    pool = LanePool(reactor=reactor, threads=2, name="test")
    stall = threading.Event()
    pool.lane("stalled").run(stall.wait, WAIT)
    reactor.run(0)
    pool.lane("quick").run(lambda: None)
    reactor.run(1)
    started = time.monotonic()
    pool.stop()
    assert time.monotonic() - started < 1.0  # did not wait for the stalled worker
    wait_until(lambda: pool.workers == 1, "the idle worker to end")
    again = pool.lane("after stop").run(lambda: "ran")
    reactor.run(1)
    assert again.result == "ran"
    stall.set()
    reactor.run(1)
    pool.stop()
    wait_until(lambda: pool.workers == 0, "every worker to end")


def test_the_default_is_one_worker_per_core_and_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for cores, expected in ((1, 1), (2, 2), (4, 4), (64, MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, cores=cores: set(range(cores)))
        assert default_workers() == expected
    assert MAX_DEFAULT_WORKERS == 4
    with pytest.raises(ValueError):
        LanePool(reactor=CollectingReactor(), threads=0, name="test")
