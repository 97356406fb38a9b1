"""py-spy attached to metahub during a scenario, and a summary of where the samples fell.

py-spy is not a dependency of metahub: ``.venv/bin/pip install py-spy`` to profile. It samples
from outside the process (``--nonblocking``: the server is not paused per sample), and writes
collapsed stacks, which :func:`summarise` reduces to the hottest functions by own samples (the
leaf frame) and by inclusive samples (anywhere on the stack).
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return file.split("/", 1)[1] if file.startswith(".") else file


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{_short(match.group('file'))}:{match.group('function')}"


class Profiler:
    """``py-spy record`` on ``pid`` until :meth:`stop`; raw collapsed stacks land in ``output``."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.output = output
        self._log = open(output.with_suffix(".log"), "wb")
        self.process = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--nonblocking", "--rate", str(rate),
             "--format", "raw", "--output", str(output)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


#: Leaf frames that mean "waiting", not working: idle pool threads, the reactor in epoll_wait.
IDLE = frozenset({
    "threading.py:Condition.wait", "threading.py:Condition._acquire_restore", "queue.py:Queue.get",
    "twisted/internet/epollreactor.py:EPollReactor.doPoll",
    "twisted/internet/pollreactor.py:PollReactor.doPoll",
    "twisted/internet/selectreactor.py:SelectReactor.doSelect",
})
#: Leaf frames that say little on their own; shown with their caller ("send() <- writeSomeData").
GENERIC = frozenset({"twisted/python/util.py:untilConcludes", "threading.py:Condition.notify",
                     "twisted/python/log.py:callWithContext", "twisted/python/context.py:callWithContext"})


@dataclass
class ThreadSummary:
    """Samples of one kind of thread: all of them, the busy ones, and where the busy ones were."""

    samples: int = 0
    busy: int = 0
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Summary:
    reactor: ThreadSummary
    workers: ThreadSummary

    def lines(self, top: int = 12) -> list[str]:
        reactor, workers = self.reactor, self.workers
        if not reactor.samples:
            return ["  (no samples)"]
        total = reactor.samples  # the reactor thread is sampled the whole time: it is the clock
        out = [f"  reactor thread busy {100 * reactor.busy / total:.0f}% of {total} samples; "
               f"pool threads busy {100 * workers.busy / total:.0f}% of one core"]
        for title, kind in (("reactor thread", reactor), ("pool threads", workers)):
            if not kind.busy:
                continue
            out.append(f"  {title}, own time (% of the run):")
            out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in kind.own.most_common(top)]
            out.append(f"  {title}, inclusive (% of the run), metahub and storage frames:")
            ours = [(name, n) for name, n in kind.inclusive.most_common()
                    if name.startswith(("metahub/", "storage/"))]
            out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in ours[:top]]
        return out


def summarise(collapsed: Path) -> Summary:
    """Reduce py-spy's collapsed stacks (root first, leaf last) to busy time per thread kind."""
    reactor, workers = ThreadSummary(), ThreadSummary()
    if not collapsed.exists():
        return Summary(reactor, workers)
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";") if frame]
        frames = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        kind = reactor if any(frame.endswith("ReactorBase.mainLoop") for frame in frames) else workers
        kind.samples += count
        leaf = frames[-1]
        if leaf in IDLE:
            continue
        kind.busy += count
        if leaf in GENERIC and len(frames) > 1:
            leaf = f"{leaf.rsplit(':', 1)[1]} <- {frames[-2]}"
        kind.own[leaf] += count
        for name in set(frames):
            kind.inclusive[name] += count
    return Summary(reactor, workers)
