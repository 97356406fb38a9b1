"""SIGKILL a process that is writing blobs and updating the index, at many points: nothing breaks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from storage import Leases, Storage
from tests.store_checks import assert_store_sound

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from storage import Storage, sha256_digest
    store = Storage(sys.argv[1], sys.argv[2])
    n = 0
    while True:
        data = os.urandom(1 << 18) * 4          # 1 MiB, written in several chunks
        digest = sha256_digest(data)
        with store.blobs.writer(digest, size=len(data)) as w:
            for i in range(0, len(data), 1 << 16):
                w.write(data[i:i + (1 << 16)])
                if n == 0 and i == 0:
                    print("writing", flush=True)
            w.commit()
        store.index.put_blob(digest, len(data), time.time(), repository="docker.io/x/y")
        store.index.set_tag("docker.io", "x/y", "latest", digest, checked=time.time())
        n += 1
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6])
def test_sigkill_while_writing_leaves_a_sound_store(tmp_path, delay: float) -> None:
    store_path, index_path = str(tmp_path / "store"), str(tmp_path / "index")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, store_path, index_path], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline() == b"writing\n"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    committed = assert_store_sound(store_path)
    # The index opens; every blob it knows is sound; temp files of the dead writer are removed.
    store = Storage(store_path, index_path, temp_grace=0)
    try:
        assert os.listdir(os.path.join(store_path, "tmp")) == []
        for record in store.index.iter_blobs():
            assert store.blobs.stat(record.digest).size == record.size
        assert store.reindex().total == committed
        tag = store.index.get_tag("docker.io", "x/y", "latest")
        assert tag is None or store.blobs.stat(tag.digest) is not None
    finally:
        store.close()


def test_a_running_node_sweeps_other_nodes_crash_leftovers(tmp_path) -> None:
    store = Storage(str(tmp_path / "store"), str(tmp_path / "index"))
    two_hours_ago = time.time() - 7200
    dead = Leases(str(tmp_path / "store"), clock=lambda: two_hours_ago, node="dead-node")
    dead.try_take("cd" * 32)  # a fetch lease its node never released
    dead_temp = os.path.join(store.blobs.tmp_dir, "ab" * 32 + ".dead-node-1234.part")
    open(dead_temp, "wb").close()
    os.utime(dead_temp, (two_hours_ago, two_hours_ago))
    live = store.blobs.writer("sha256:" + "ef" * 32)  # a download under way now
    leases = Leases(str(tmp_path / "store"), node="live")
    live_lease = leases.try_take("ef" * 32)
    assert store.clean_leftovers(leases, older_than=3600) == 2
    assert os.listdir(store.blobs.tmp_dir) == [os.path.basename(live.temp_path)]
    assert leases.holder("cd" * 32) is None and leases.holder("ef" * 32).holder == live_lease.holder
    live.abort()
