"""The benchmark harness (bench/) in its quick mode, so it cannot rot between real benchmark runs.

Only the harness is checked here: every scenario ran against both servers and produced a number.
Whether metahub meets the targets is what a real run on a quiet machine tells (docs/benchmarks.md);
asserting targets on a loaded CI machine with tiny sizes would only make CI flaky.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers.require import require_binary

ROOT = Path(__file__).resolve().parents[2]
#: The quick run takes 20-40 s; this leaves room for a loaded CI machine, not for a hang.
QUICK_RUN_LIMIT = 180

EXPECTED_ROWS = (
    "1 cached 16 MiB blob, 1 client",
    "1 cached 16 MiB blob, curl",
    "2 cold fan-in, 20 clients",
    "2 cold fan-in, upstream bytes",
    "3 manifest by tag, 16 conns",
    "3 manifest by tag, p99 latency",
    "5 cold single pull 8 MiB, TTFB",
    "5 cold single pull 8 MiB, total",
    "6 cold image 8x1 MiB, 8 clients x 4",
    "6 cold image, upstream bytes",
    "6 cold image, peak threads",
    "6 cold image, failed pulls",
    "6 cold image, peak RSS",
    "7 manifest by tag, 1000 conns",
    "7 manifest by tag, 1000 conns, p99",
    "7 manifest by tag, 1000 conns, errors",
    "7 manifest by tag, 1000 conns, unanswered",
    "8 one 32 MiB layer, cold pull",
    "8 one 32 MiB layer, cached, curl",
    "8 peak RSS, cold phase",
    "8 peak RSS, cached phase",
    "4 peak RSS during scenario 1",
    "4 peak RSS during scenario 2",
    "4 peak RSS during scenario 3",
    "4 peak RSS during scenario 5",
    "9 store fill, 2000 blobs via storage's API",
    "9 manifest by tag, store of 2000 blobs/200 tags",
    "9 manifest by tag on that store, p99 latency",
    "9 manifest by tag on that store, server CPU",
    "9 cache stats, CPU per 10^4 blobs 1k-2k",
    "9 cache gc, CPU per 10^4 blobs 1k-2k",
    "9 cache verify, CPU per 10^4 blobs 1k-2k",
    "9 LMDB index on disk, 2000 blobs",
    "10 cold pull vs machine limit 8 MiB, total",
    "10 cold pull vs machine limit 8 MiB, TTFB",
)
#: Rows with no distribution figure: scenario 9 compares metahub with its own empty store.
WITHOUT_DISTRIBUTION = ("9 ",)


def _table_rows(output: str) -> dict[str, list[str]]:
    """The printed table's rows by scenario name: [unit, metahub, distribution, ratio, ...]."""
    lines = output.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("scenario "))
    rows = {}
    for line in lines[start + 2:]:
        if " | " not in line:
            break
        cells = [cell.strip() for cell in line.split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def test_quick_benchmark_prints_every_figure(tmp_path: Path) -> None:
    for program in ("docker-registry", "skopeo", "wrk", "curl"):
        require_binary(program)
    figures = tmp_path / "figures.json"
    harness = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--quick", "--workdir", str(tmp_path / "work"),
         "--json", str(figures)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = harness.communicate(timeout=QUICK_RUN_LIMIT)
    except subprocess.TimeoutExpired:
        harness.terminate()  # SIGTERM: the harness stops the servers it started
        stdout, stderr = harness.communicate(timeout=60)
        pytest.fail(f"bench.run --quick took over {QUICK_RUN_LIMIT} s:\n{stderr}\n{stdout}")
    output = stdout + stderr
    assert harness.returncode == 0, output
    assert "PROBLEM" not in output

    rows = _table_rows(stdout)
    for expected in EXPECTED_ROWS:
        matching = [name for name in rows if name.startswith(expected)]
        assert matching, f"no table row {expected!r} in:\n{stdout}"
        unit, metahub, distribution = rows[matching[0]][:3]
        float(metahub)  # a number, not "error"
        if expected.startswith(WITHOUT_DISTRIBUTION):
            assert distribution == "-", rows[matching[0]]
        else:
            float(distribution)
    assert len(rows) == len(EXPECTED_ROWS), stdout
    assert "machine: cpu " in stdout

    data = json.loads(figures.read_text())
    assert len(data["rows"]) == len(EXPECTED_ROWS)
    for row in data["rows"]:
        assert isinstance(row["metahub"], float), row
        if row["scenario"].startswith(WITHOUT_DISTRIBUTION):
            assert row["distribution"] is None and not row["distribution_applies"], row
        else:
            assert isinstance(row["distribution"], float), row
    # The relay counted what reached the upstream: the fan-in row is a measured multiple of the blob.
    fan_in = next(row for row in data["rows"] if row["scenario"].startswith("2 cold fan-in, upstream"))
    assert fan_in["metahub"] >= 1.0 and fan_in["distribution"] >= 1.0
    image = next(row for row in data["rows"] if row["scenario"] == "6 cold image, upstream bytes")
    assert image["metahub"] >= 1.0 and image["distribution"] >= 1.0
    # Thread counts are sampled from /proc: every server runs at least its main thread.
    threads = next(row for row in data["rows"] if row["scenario"] == "6 cold image, peak threads")
    assert threads["metahub"] >= 1 and threads["distribution"] >= 1
    # With a thousand connections open, metahub still answered (wrk read its figures, not zeros).
    connections = next(row for row in data["rows"] if row["scenario"] == "7 manifest by tag, 1000 conns")
    assert connections["metahub"] > 0

    # Scenario 9's store was filled to its size and the cache commands timed on it half and full,
    # and on an empty store beside it each time (that the server on it answered a filled tag from
    # it, the harness checks: a PROBLEM if not).
    assert data["samples"]["9-fill"]["blobs"] == 2000
    assert set(data["samples"]["9-cli-seconds"]) == set(data["samples"]["9-cli-empty-seconds"]) == {"1000", "2000"}
    # Scenario 10 measured both halves of the limit next to both proxies' pulls of the same blob.
    limit = data["samples"]["10"]
    assert limit["write"][0]["bytes"] == limit["direct"][0]["bytes"] == 8 << 20
    assert limit["write"][0]["seconds"] > 0 and limit["direct"][0]["total"] > 0
    assert {"metahub", "distribution"} <= limit.keys()
