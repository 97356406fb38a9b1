"""The service's periodic store sweep, without a running reactor."""
from __future__ import annotations

import os
import time

from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from metahub.app.service import MetahubService
from metahub.config.file import parse_config
from storage import Leases, Storage

from .test_config import minimal


def test_the_hourly_sweep_removes_a_dead_nodes_half_written_blob(tmp_path) -> None:
    config = parse_config(minimal(tmp_path), str(tmp_path))
    service = MetahubService(config, "tcp:0", reactor=Clock())
    service.storage = Storage(config.storage.path, config.storage.index)
    service.leases = Leases(config.storage.path)
    service.in_thread = lambda function, *args: succeed(function(*args))
    leftover = os.path.join(service.storage.blobs.tmp_dir, "ab" * 32 + ".other-node-99.part")
    with open(leftover, "wb") as file:
        file.write(b"x" * 1000)
    hours_ago = time.time() - 3 * 3600
    os.utime(leftover, (hours_ago, hours_ago))
    ensureDeferred(service.tidy())
    assert not os.path.exists(leftover)
    service.storage.close()


class _InlineThreads(MemoryReactorClock):
    """A memory reactor whose thread pool runs each job at once, on the caller's thread."""

    def getThreadPool(self) -> _InlineThreads:  # noqa: N802
        return self

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs) -> None:  # noqa: N802
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def callFromThread(self, function, *args, **kwargs) -> None:  # noqa: N802
        function(*args, **kwargs)


def test_the_service_serves_on_a_unix_socket_and_stops(tmp_path) -> None:
    """A UNIX socket's address has no host or port, and a port may stop at once (returning None)."""
    config = parse_config(minimal(tmp_path), str(tmp_path))
    reactor = _InlineThreads()  # its ports return None from stopListening
    path = str(tmp_path / "metahub.sock")
    service = MetahubService(config, f"unix:{path}", reactor=reactor)
    service.startService()
    assert [server[0] for server in reactor.unixServers] == [path]
    stopped = service.stopService()
    reactor.advance(0)
    assert stopped.called and stopped.result is None
