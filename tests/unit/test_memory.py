"""The malloc arena cap is applied on the glibc systems metahub runs on."""
from __future__ import annotations

import subprocess
import sys


def test_glibc_accepts_the_arena_limit() -> None:
    # In a child: the cap is process-wide, and this test process keeps its defaults.
    code = "from metahub.memory import limit_malloc_arenas; print(limit_malloc_arenas())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "True\n"

