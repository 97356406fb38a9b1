"""A download's lane: jobs in order, off the calling thread, results and errors back on the reactor."""
from __future__ import annotations

import threading

import pytest

from metahub.runtime.lane import ThreadLane


class CollectingReactor:
    """Stands in for ``reactor.callFromThread``: the test runs the calls itself."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.arrived = threading.Semaphore(0)

    def callFromThread(self, function, *args) -> None:
        self.calls.append((function, args))
        self.arrived.release()

    def run(self, count: int) -> None:
        for _ in range(count):
            assert self.arrived.acquire(timeout=10)
        calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)


def test_jobs_run_in_order_in_the_lanes_own_thread() -> None:
    reactor = CollectingReactor()
    lane = ThreadLane(reactor, "test lane")
    seen: list[tuple[int, str]] = []
    results = [lane.run(lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(50)]
    lane.close()
    reactor.run(50)
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test lane"}
    assert [r.result for r in results] == list(range(50))


def test_an_error_reaches_the_caller_and_later_jobs_still_run() -> None:
    reactor = CollectingReactor()
    lane = ThreadLane(reactor, "test lane")
    failed = lane.run(lambda: 1 / 0)
    after = lane.run(lambda: "still here")
    reactor.run(2)
    with pytest.raises(ZeroDivisionError):
        failed.result.raiseException()
    failed.addErrback(lambda _: None)
    assert after.result == "still here"
    lane.close()
