"""The operators' ``metahub`` command as a shell runs it: pipes that close, a running server."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .metahub_process import TWISTD, Metahub

METAHUB = Path(TWISTD).with_name("metahub")
NOWHERE = {"nowhere": {"url": "http://127.0.0.1:9"}}


def test_output_into_a_closed_pipe_is_no_error(tmp_path) -> None:
    """``metahub cache stats | head -1``: the reader may leave before metahub has written."""
    with Metahub(tmp_path / "hub", NOWHERE) as hub:
        hub.stop()
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run([METAHUB, "cache", "stats", "--config", hub.config_path], stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write_end)
    assert result.returncode == 0
    assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr


def test_reindex_is_refused_while_a_server_runs_on_the_index(tmp_path) -> None:
    reindex = lambda config: subprocess.run(  # noqa: E731
        [METAHUB, "cache", "reindex", "--config", config], capture_output=True, text=True, timeout=120)
    with Metahub(tmp_path / "hub", NOWHERE) as hub:
        refused = reindex(hub.config_path)
        assert refused.returncode == 1
        assert refused.stderr.strip() == (f"metahub: cache reindex: a metahub server is running on "
                                          f"{tmp_path / 'hub' / 'index'}; stop it first")
        hub.stop()
        done = reindex(hub.config_path)
        assert done.returncode == 0 and done.stdout.startswith("reindexed 0 blobs"), done.stderr
        hub.start()  # the lock went with the reindex


def test_a_restarted_node_keeps_one_record_in_the_shared_store(tmp_path) -> None:
    with Metahub(tmp_path / "hub", NOWHERE, node_id="gpu-07") as hub:
        for _ in range(2):
            hub.restart()
        hub.stop()  # a clean stop writes the record
    stats = subprocess.run([METAHUB, "cache", "stats", "--config", hub.config_path], capture_output=True,
                           text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert "nodes seen:  1" in stats.stdout and "gpu-07 " in stats.stdout
    assert sorted(p.name for p in (tmp_path / "hub" / "store" / "nodes").iterdir()) == ["gpu-07.json"]
