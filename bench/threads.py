"""Peak thread count of a server process while a scenario runs.

The kernel keeps a high-water mark for memory (VmHWM) but none for threads, so a sampler thread
reads ``Threads:`` from ``/proc/PID/status`` every few milliseconds. A thread that lives for less
than one interval can be missed; the pools this is meant to bound keep their threads for far longer.
"""
from __future__ import annotations

import threading
from types import TracebackType

INTERVAL = 0.005


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise RuntimeError(f"no thread count for process {pid}")


class PeakThreads:
    """``with PeakThreads(pids) as peak:`` ... then ``peak.peaks[pid]``: the most threads seen."""

    def __init__(self, pids: list[int], interval: float = INTERVAL) -> None:
        self.peaks = {pid: thread_count(pid) for pid in pids}
        self._interval = interval
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="peak-threads", daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self._interval):
            for pid in self.peaks:
                try:
                    self.peaks[pid] = max(self.peaks[pid], thread_count(pid))
                except OSError:
                    pass  # the process died; the scenario reports that itself

    def __enter__(self) -> PeakThreads:
        self._sampler.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._done.set()
        self._sampler.join()
        for pid in self.peaks:  # one last look: the scenario's end is part of it
            try:
                self.peaks[pid] = max(self.peaks[pid], thread_count(pid))
            except OSError:
                pass
