"""Many cold layers at once cost a bounded number of threads, and every byte still arrives right.

A real docker-registry holds an image of 24 layers; a counting relay in front of it sends each blob
slowly enough that all 24 downloads are under way together. 24 clients fetch the 24 layers through
metahub at once while the test counts the server's threads (``/proc/PID/task``). A thread per
download cost 24 threads on top of the server's own; on the shared lane pool the count stays within
what the server's pools may hold whatever the number of layers: the main thread, the reactor's pool
(capped at 2, for host name lookups), the two store pools (``storage.io_threads`` each,
1 here so the downloads' share stands out), the index's writer and ``storage.write_threads``. Each blob is fetched from
upstream once and arrives byte for byte.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metahub.app.service import RESOLVER_THREADS
from storage import sha256_digest
from tests.peers import skopeo
from tests.peers.oci import make_image
from tests.peers.registry import Registry
from tests.peers.relay import Relay

from .common import request
from .metahub_process import Metahub

LAYERS = 24
LAYER_BYTES = 2_000_000
#: Bytes per second per blob from the relay: each download takes about half a second, so all 24
#: overlap.
RATE = 4_000_000
IO_THREADS = 1
WRITE_THREADS = 3
REACTOR_POOL = RESOLVER_THREADS  # the reactor's pool, capped by the service tree
INDEX_WRITER = 1  # every index write, on one thread


class ThreadCounter:
    """Samples the thread count of process ``pid`` every few milliseconds until stopped."""

    def __init__(self, pid: int) -> None:
        self.tasks = f"/proc/{pid}/task"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="thread counter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, len(os.listdir(self.tasks)))
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_many_cold_layers_at_once_cost_a_bounded_number_of_threads_and_arrive_intact(tmp_path: Path) -> None:
    with Registry(tmp_path / "upstream") as registry, Relay(registry.url) as relay:
        image = make_image(tmp_path / "layout", "1", layers=[LAYER_BYTES] * LAYERS)
        skopeo.push(tmp_path / "layout", "1", f"{registry.host}/team/many:1")
        expected = {layer.digest: (tmp_path / "layout" / "blobs" / "sha256" / layer.digest[7:]).read_bytes()
                    for layer in image.layers}
        assert len(expected) == LAYERS
        relay.rate = RATE
        store = {"path": str(tmp_path / "store"), "index": str(tmp_path / "index"),
                 "io_threads": IO_THREADS, "write_threads": WRITE_THREADS}
        with Metahub(tmp_path / "metahub", {"local": {"url": relay.url}}, default_upstream="local",
                     storage=store) as hub:
            counter = ThreadCounter(hub.pid)
            started = time.monotonic()
            with ThreadPoolExecutor(LAYERS) as clients:
                answers = list(clients.map(
                    lambda digest: request(hub.host, "GET", f"/v2/team/many/blobs/{digest}"), expected))
            took = time.monotonic() - started
            peak = counter.stop()
            for digest, (status, _, body) in zip(expected, answers):
                assert status == 200
                assert body == expected[digest] and sha256_digest(body) == digest
                assert relay.blob_gets("team/many", digest) == 1
            # Had the downloads run one after another, they would have taken LAYERS times as long.
            assert took < LAYERS * LAYER_BYTES / RATE / 3, f"{LAYERS} downloads took {took:.1f} s"
            bound = 1 + REACTOR_POOL + 2 * IO_THREADS + INDEX_WRITER + WRITE_THREADS
            assert peak <= bound, f"{peak} threads at {LAYERS} cold layers (bound {bound})"
