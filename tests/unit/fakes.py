"""Fakes and helpers the unit tests share; test modules import from here, never from each other.

Everything runs on the calling thread: thread-pool work, download lanes and logins' KDF run inline,
and time moves only when a test advances it. The in-memory registry built from these is in
:mod:`tests.unit.harness`.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from metahub.cache.blobs import BlobCache
from metahub.cache.capacity import StoreCapacity
from metahub.cache.downloads import Download, Downloads
from metahub.cache.routing import Route
from metahub.config.file import (
    Account,
    Config,
    ConfigError,
    MachineTypeEntry,
    Platform,
    StorageConfig,
    UpstreamConfig,
    parse_config,
)
from metahub.runtime.metrics import Metrics
from metahub.upstream.upstreams import Upstreams
from metahub.web.auth import hash_password
from metahub.web.blobs import Blobs
from storage import BlobStore, Storage, sha256_digest, stamp_access

# --- config --------------------------------------------------------------------------------------


def minimal(tmp_path: Path) -> dict[str, Any]:
    """The smallest valid config, as parsed YAML, for tests to break one key of."""
    return {
        "storage": {"path": str(tmp_path / "store"), "index": str(tmp_path / "index")},
        "upstreams": {"docker.io": {"url": "https://registry-1.docker.io"}},
    }


def config_error(data: object, base_dir: Path) -> str:
    """The one-line message ``parse_config`` refuses ``data`` with."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, str(base_dir))
    message = str(info.value)
    assert "\n" not in message
    return message


#: The password of both accounts of :func:`auth_config`.
AUTH_PASSWORD = "pw"
AUTH_HASH = hash_password(AUTH_PASSWORD)


def auth_config(anonymous: str = "deny") -> Config:
    """A config with machine types and two accounts, for the login and rate-limit tests."""
    return Config(
        storage=StorageConfig("/s", "/i"),
        upstreams={"hub": UpstreamConfig("hub", "https://registry-1.docker.io")},
        default_upstream="hub",
        anonymous=anonymous,
        machine_types={
            "type1": MachineTypeEntry(Platform("linux", "amd64"), features=("cpu:broadwell",)),
            "type2": MachineTypeEntry(Platform("linux", "amd64"), features=("cpu:skylake",)),
        },
        accounts={
            "qnib": Account("qnib", AUTH_HASH, ("type1", "type2")),
            "ci": Account("ci", AUTH_HASH, ("type1",), ("library/*", "myorg/**")),
        },
    )


# --- downloads -----------------------------------------------------------------------------------


def store_capacity(clock: Clock, metrics: Metrics) -> StoreCapacity:
    """A store that takes files until one fails, as the root builds it (minus making room)."""
    return StoreCapacity(clock=clock, metrics=metrics)


def join_now(downloads: Downloads, route: Route, digest: str) -> Download:
    """What ``downloads.join`` answers at once (the fakes' threads are inline): the download under
    way, else a new one; raises what join raises (``AlreadyStored`` once the blob is stored)."""
    joined = ensureDeferred(downloads.join(route, digest))
    outcome: list[Download | Failure] = []
    joined.addBoth(outcome.append)
    assert outcome, "the join is still waiting"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]  # type: ignore[return-value]  # not a Failure, checked above


def blob_cache(*, storage: Storage, upstreams: Upstreams, downloads: Downloads, clock: Clock,
               metrics: Metrics) -> BlobCache:
    """The cache's side of blob requests as the root builds it, on inline threads."""
    return BlobCache(storage=storage, upstreams=upstreams, downloads=downloads, clock=clock, in_thread=inline,
                     index_writes=inline,
                     read_in_thread=inline, metrics=metrics)


def blob_endpoint(*, storage: Storage, upstreams: Upstreams, downloads: Downloads, clock: Clock,
                  metrics: Metrics) -> Blobs:
    """The blob endpoint as the root builds it, minus the releaser and sendfile, on inline threads."""
    cache = blob_cache(storage=storage, upstreams=upstreams, downloads=downloads, clock=clock, metrics=metrics)
    return Blobs(cache=cache, clock=clock, metrics=metrics, read_in_thread=inline)


# --- the store -----------------------------------------------------------------------------------


def commit_blob(store: BlobStore, data: bytes, accessed: float | None = None) -> str:
    """Commit ``data`` to ``store``, last accessed at ``accessed`` if given (its mtime); its digest."""
    digest = sha256_digest(data)
    with store.writer(digest) as writer:
        writer.write(data)
        writer.commit()
    if accessed is not None:
        assert stamp_access(store, [digest], accessed) == []
    return digest


# --- time and threads ----------------------------------------------------------------------------


class ManualClock:
    """A ``clock()`` callable (as storage and the authenticator take) that moves only when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def inline(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A ``ThreadRunner`` that runs the job at once, on the caller's thread."""
    try:
        return succeed(function(*args))
    except Exception:
        return fail()


class InlinePool:
    """A thread pool that runs each job at once, on the caller's thread."""

    started = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs) -> None:  # noqa: N802
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor(Clock):
    """A ``Clock`` whose thread pool and ``callFromThread`` run work inline."""

    def getThreadPool(self) -> InlinePool:  # noqa: N802
        return InlinePool()

    def callFromThread(self, function, *args, **kwargs) -> None:  # noqa: N802
        function(*args, **kwargs)


class InlineLane:
    """A download lane that runs each job at once: a disk as fast as the network."""

    def run(self, job, *args) -> Deferred:
        return inline(job, *args)

    def close(self) -> None:
        pass


class InlineLanes:
    """A :class:`metahub.runtime.lane.LanePool` whose lanes run each job at once."""

    def lane(self, name: str) -> InlineLane:
        return InlineLane()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


# --- requests ------------------------------------------------------------------------------------


class AbortRecorder:
    """A transport that only remembers being aborted."""

    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True


class FakeRequest:
    """Enough of twisted.web's Request for the handlers, in memory (Twisted's own DummyRequest is a
    helper of its test suite, not public API): request line, headers and body in; code, headers and
    body out. A producer is paused once ``limit`` bytes are unsent (:meth:`drain` sends them);
    :meth:`finish` fires ``notifyFinish`` as twisted.web does, and the transport records an abort.
    """

    def __init__(
        self, limit: int | None = None, *, method: bytes = b"GET", uri: bytes = b"/",
        headers: dict[bytes, bytes] | None = None, content: bytes = b"", client: IAddress | None = None,
    ) -> None:
        self.limit = limit
        self.method, self.uri, self.clientproto = method, uri, b"HTTP/1.1"
        self.path = uri.partition(b"?")[0]
        self.requestHeaders = Headers({name: [value] for name, value in (headers or {}).items()})
        self.content = io.BytesIO(content)
        #: Where the request came from; a UNIX socket (not on IP) unless a test says otherwise.
        self.client: IAddress = client if client is not None else UNIXAddress(None)
        self.code = 200
        self.responseHeaders = Headers()
        self.written: list[bytes] = []
        self.sentLength = 0
        self.unsent = 0
        self.producer: Any = None  # the IPushProducer send() registers
        self.finished = False
        self.transport = AbortRecorder()
        self._finish: Deferred[None] = Deferred()

    def getClientAddress(self) -> IAddress:  # noqa: N802
        return self.client

    def isSecure(self) -> bool:  # noqa: N802
        return False

    def getHeader(self, name: bytes | str) -> bytes | str | None:  # noqa: N802
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:  # noqa: N802
        self.code = code

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:  # noqa: N802
        self.responseHeaders.setRawHeaders(name, [value])

    def registerProducer(self, producer, streaming: bool) -> None:  # noqa: N802
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:  # noqa: N802
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802
        return self._finish

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.sentLength += len(data)
        self.unsent += len(data)
        if self.limit is not None and self.unsent >= self.limit:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.unsent = 0
        self.producer.resumeProducing()

    def finish(self) -> None:
        self.finished = True
        self._finish.callback(None)

    def hang_up(self) -> None:
        """The client goes away before the response ends: ``notifyFinish`` errbacks, as in twisted.web."""
        self._finish.errback(Failure(ConnectionDone()))

    def body(self) -> bytes:
        return b"".join(self.written)


class CountedKDF:
    """The logins' KDF pool, inline, remembering whose login each run checked (its first argument)."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.runs.append(args[0])
        return inline(function, *args)


def login_request(username: str, password: str, method: bytes = b"GET", client: IAddress | None = None) -> FakeRequest:
    """A ``/token`` request with a login: Basic (GET, as docker and podman send it) or a password
    grant (POST, containerd's form)."""
    if method == b"GET":
        basic = b"Basic " + base64.b64encode(f"{username}:{password}".encode())
        return FakeRequest(method=method, uri=b"/token", headers={b"authorization": basic}, client=client)
    form = f"grant_type=password&username={username}&password={password}".encode()
    return FakeRequest(method=method, uri=b"/token", content=form, client=client)


def inline_threads(root: Any) -> None:
    """Make a :class:`metahub.app.root.Root`'s own thread pools (logins, store I/O, index writes,
    store reads, download lanes) run their work inline, as a fake reactor's pool does. Call it before the root
    builds its downloads, which take their lanes from ``root.lanes``."""
    for runner in (root.kdf, root.in_thread, root.index_writes, root.store_reads):
        runner.pool = InlinePool()
    root.lanes = InlineLanes()
