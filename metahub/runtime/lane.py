"""Lanes: a download's blocking jobs run one after another, in order, on threads all downloads share.

A download's bytes are hashed and written to its temporary file in a lane, not on the reactor:
hashing 200 MiB costs a core for a while, and a write to a shared store can stall for as long as
the NFS server does. Order matters (the hash is of the bytes in sequence, and the commit comes
after the last write), which is why a lane is not simply the reactor's pool, whose threads take
jobs in any order.

Every lane runs on one :class:`LanePool`: a fixed number of worker threads, however many downloads
are under way, so 50 cold layers cost the same few threads as 2 (a thread per download cost 50).
Each lane is a serial queue on the pool: a worker takes the next job of a lane that has jobs waiting
and none running, runs it, and puts the lane back at the end of the line if it has more, so every
download with work gets a turn and none runs two jobs at once.

What a stall costs: a job stuck in ``write()`` on a stalled mount holds one worker, and its lane's
later jobs wait behind it; other lanes go on with the remaining workers. When as many lanes are
stuck as there are workers, every other lane's jobs queue (nothing runs until a worker comes back),
and the reactor still never waits: ``run`` only enqueues. Memory stays bounded because a download
pauses its upstream connection once more than :data:`metahub.cache.downloads.QUEUED_LIMIT` bytes
wait in its lane, and its idle timeout ends it if the store does not come back.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from metahub.runtime.pools import available_cores

#: The most workers the default gives, whatever the core count: one store's disk (or NFS mount)
#: feeds no more writers usefully, and the process's thread count should stay small.
MAX_DEFAULT_WORKERS = 4


class Lane(Protocol):
    def run(self, job: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``job(*args)`` after every job submitted before it; the result fires on the reactor."""

    def close(self) -> None:
        """No more jobs: those submitted still run; a later ``run`` is a bug and raises."""


#: Makes the lane of one download, given a name (its worker takes that name while it runs its jobs).
LaneFactory = Callable[[str], Lane]

_Job = tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]


def default_workers() -> int:
    """One worker per core, at most :data:`MAX_DEFAULT_WORKERS`.

    Hashing is CPU work (``hashlib`` lets go of the GIL), so one worker per core keeps every core
    busy; more only add threads to the process, which issue 14 bounds at 2 x cores + 8 (bench
    scenario 6 took the same wall time with 2 workers as with 4 on two cores).
    """
    return min(available_cores(), MAX_DEFAULT_WORKERS)


class _PoolLane:
    """One download's serial queue on a :class:`LanePool`; its state is guarded by the pool's lock."""

    def __init__(self, pool: LanePool, name: str) -> None:
        self.pool = pool
        self.name = name
        self.jobs: deque[_Job] = deque()
        self.running = False  # a worker is running one of its jobs
        self.closed = False

    def run(self, job: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.closed:
            raise RuntimeError(f"lane {self.name!r} is closed")
        done: Deferred[Any] = Deferred()
        self.pool._submit(self, (job, args, done))
        return done

    def close(self) -> None:
        self.closed = True


class LanePool:
    """``threads`` worker threads shared by every lane it makes (:meth:`lane` is a :data:`LaneFactory`).

    Workers start as jobs arrive, up to ``threads``, and stay until :meth:`stop`. They are daemon
    threads: one stuck in the kernel on a stalled mount does not hold the process at exit. Results
    reach the reactor through ``callFromThread``. ``busy`` and ``queued`` count the jobs running and
    waiting (for the metrics; read without the lock, as a gauge may).
    """

    def __init__(self, *, reactor: IReactorFromThreads, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"a lane pool needs at least one thread, not {threads}")
        self.reactor = reactor
        self.threads = threads
        self.name = name
        self.busy = 0
        self.queued = 0
        self._lock = threading.Condition()
        #: Lanes with a job waiting and none running, in the order they get a worker.
        self._ready: deque[_PoolLane] = deque()
        self._workers = 0  # threads alive
        self._idle = 0  # of those, waiting for a lane to be ready
        self._stopping = False
        self._started = 0  # threads ever started, for their names

    def lane(self, name: str) -> Lane:
        return _PoolLane(self, name)

    @property
    def workers(self) -> int:
        """Worker threads alive now."""
        return self._workers

    def start(self) -> None:
        """Take jobs (the pool also starts at its first job, for commands that run no service)."""
        with self._lock:
            self._stopping = False

    def stop(self) -> None:
        """Let the workers end once no job waits. Nothing waits for them: a worker stuck on a
        stalled mount must not hold up the reactor's shutdown (a stopped server's downloads are
        abandoned anyway). A job submitted later starts workers again."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    def _submit(self, lane: _PoolLane, job: _Job) -> None:
        with self._lock:
            self._stopping = False
            lane.jobs.append(job)
            self.queued += 1
            if lane.running or len(lane.jobs) > 1:
                return  # the lane is already ready, or its worker puts it back when its job ends
            self._ready.append(lane)
            # Idle workers take ready lanes in turn; only lanes beyond them need a new thread.
            if len(self._ready) > self._idle and self._workers < self.threads:
                self._workers += 1
                self._started += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._started}", daemon=True).start()
            else:
                self._lock.notify()

    def _work(self) -> None:
        me = threading.current_thread()
        own_name = me.name
        lane = self._next(None)
        while lane is not None:
            job, args, done = lane.jobs[0]
            me.name = lane.name  # a stack dump (py-spy) names the download a worker is stuck in
            try:
                result = job(*args)
            except BaseException:
                self.reactor.callFromThread(done.errback, Failure())
            else:
                self.reactor.callFromThread(done.callback, result)
            me.name = own_name
            lane = self._next(lane)

    def _next(self, finished: _PoolLane | None) -> _PoolLane | None:
        """Settle the lane whose job just ran, then wait for the next ready lane (None: the pool
        stops and nothing waits). The lane returned is marked running; its first job is the next."""
        with self._lock:
            if finished is not None:
                finished.jobs.popleft()
                finished.running = False
                self.busy -= 1
                if finished.jobs:
                    self._ready.append(finished)  # at the back: every lane with work gets a turn
            while not self._ready:
                if self._stopping:
                    self._workers -= 1
                    return None
                self._idle += 1
                self._lock.wait()
                self._idle -= 1
            lane = self._ready.popleft()
            lane.running = True
            self.queued -= 1
            self.busy += 1
            return lane
