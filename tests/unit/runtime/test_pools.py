"""Store pools grow with what waits: a burst of quick calls stays on one thread, a stalled call
makes the pool add threads (after GROW_AFTER each) up to its limit, so other calls still run."""
from __future__ import annotations

import os
import threading
import time

import pytest
from twisted.internet.task import Clock

from metahub.runtime.lane import default_workers
from metahub.runtime.pools import GROW_AFTER, ThreadPoolRunner, default_io_threads

WAIT = 10.0


class Reactor(Clock):
    """A clock the test advances; results reach it from the pool's threads, and the test fires them."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.results: list[tuple] = []

    def callFromThread(self, function, *args) -> None:  # noqa: N802
        with self.lock:
            self.results.append((function, args))

    def fire(self) -> None:
        with self.lock:
            results, self.results = self.results, []
        for function, args in results:
            function(*args)


def settle(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_a_burst_of_quick_calls_stays_on_one_thread() -> None:
    reactor = Reactor()
    runner = ThreadPoolRunner(reactor, 8, "test-burst")
    try:
        for _ in range(5):
            done = [runner(lambda i=i: i) for i in range(24)]
            settle(lambda: len(reactor.results) == 24, "the calls to end")
            reactor.fire()
            assert [d.result for d in done] == list(range(24))
            reactor.advance(GROW_AFTER)  # every call had begun: nothing waited
        assert runner.threads == 1 and runner.pool.workers == 1
    finally:
        runner.stop()


def test_a_stalled_call_makes_the_pool_grow_up_to_its_limit_and_no_further() -> None:
    reactor = Reactor()
    runner = ThreadPoolRunner(reactor, 3, "test-stall")
    stall = threading.Event()
    try:
        runner(stall.wait, WAIT)
        quick = runner(lambda: "quick")
        time.sleep(0.05)
        assert not reactor.results  # behind the stalled call, on the one thread
        reactor.advance(GROW_AFTER)
        settle(lambda: len(reactor.results) == 1, "the waiting call to get a thread")
        reactor.fire()
        assert quick.result == "quick" and runner.threads == 2
        for _ in range(5):  # more stalls than the limit allows threads
            runner(stall.wait, WAIT)
        for _ in range(10):
            reactor.advance(GROW_AFTER)
        assert runner.threads == 3 and runner.pool.workers <= 3
        assert not reactor.getDelayedCalls()  # at the limit: no more looking
        stall.set()
        settle(lambda: len(reactor.results) == 6, "the stalled calls to end")
        reactor.fire()
    finally:
        stall.set()
        runner.stop()


@pytest.mark.parametrize(("cores", "expected"), [(1, 2), (2, 2), (4, 3), (8, 4), (64, 4)])
def test_the_default_store_pool_fits_the_process_within_two_threads_per_core_plus_eight(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
    assert default_io_threads() == expected
    # main, two store pools, the download lanes, two KDF and two resolver threads at most.
    assert 1 + 2 * default_io_threads() + default_workers() + 2 + 2 <= 2 * cores + 8
