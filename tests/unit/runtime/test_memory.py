"""glibc tuning and trimming: memory a burst or a login freed goes back to the kernel."""
from __future__ import annotations

import subprocess
import sys

from twisted.internet.task import Clock

from metahub.runtime.memory import QUIET, Releaser


def test_glibc_accepts_the_malloc_settings() -> None:
    # In a child: the cap is process-wide, and this test process keeps its defaults.
    code = "from metahub.runtime.memory import tune_malloc; print(tune_malloc())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "True\n"


def test_memory_is_trimmed_once_blob_traffic_has_been_quiet() -> None:
    clock = Clock()
    trims: list[float] = []
    releaser = Releaser(clock, lambda: trims.append(clock.seconds()))
    releaser.started()
    releaser.started()
    releaser.ended()
    clock.advance(QUIET * 5)
    assert trims == []  # one request still going
    releaser.ended()
    clock.advance(QUIET / 2)
    releaser.started()  # traffic again before the quiet period is over: no trim
    clock.advance(QUIET)
    assert trims == []
    releaser.ended()
    clock.advance(QUIET)
    assert trims == [clock.seconds()]
    releaser.started()
    releaser.ended()
    clock.advance(QUIET / 2)
    releaser.started()
    releaser.ended()  # the quiet period starts again from the last request's end
    clock.advance(QUIET * 0.9)
    assert len(trims) == 1
    clock.advance(QUIET * 0.2)
    assert len(trims) == 2
    clock.advance(QUIET * 5)
    assert len(trims) == 2


_FREED_BUT_KEPT = """
from metahub.runtime.memory import malloc_trim

def anon_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

base = anon_kib()
blocks = [bytes(64 << 10) for _ in range(1000)]  # 64 MiB in blocks glibc takes from its heap
pin = bytes(64 << 10)  # keeps the heap's top in use, so freeing the blocks cannot shrink it
del blocks
kept = anon_kib() - base
malloc_trim()
print(kept, anon_kib() - base)
"""


def test_trimming_hands_freed_heap_memory_back() -> None:
    result = subprocess.run([sys.executable, "-c", _FREED_BUT_KEPT], capture_output=True, text=True, check=True)
    kept, after = map(int, result.stdout.split())
    assert kept > 30_000  # glibc kept most of the freed 64 MiB resident
    assert after < 10_000  # and gave it back on the trim


_LOGINS = """
import sys, threading
from metahub.web.auth import check_password, hash_password
from metahub.runtime.memory import tune_malloc

if sys.argv[1] == "tuned":
    assert tune_malloc()

def anon_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

stored = hash_password("secret")
base = anon_kib()
for _ in range(4):  # each login on a thread of its own, as in the reactor's pool
    thread = threading.Thread(target=check_password, args=("secret", stored))
    thread.start()
    thread.join()
print(anon_kib() - base)
"""


def test_logins_do_not_leave_their_scrypt_memory_resident() -> None:
    def growth(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", _LOGINS, mode], capture_output=True, text=True, check=True)
        return int(result.stdout)

    assert growth("default") > 12_000  # glibc's own thresholds keep scrypt's 16 MiB work area
    assert growth("tuned") < 4_000
