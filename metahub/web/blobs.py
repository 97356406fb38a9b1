"""Blob requests, the HTTP face: status, headers, ``Range`` (HEAD answers what GET would), and the
body by sendfile or the copy loop. Where the bytes come from (the store, a download to follow, or
upstream when the store cannot take the blob) is :class:`metahub.cache.blobs.BlobCache`'s answer.
"""
from __future__ import annotations

from twisted.internet.interfaces import IReactorFDSet, IReactorTime
from twisted.web.server import Request

from metahub.cache.blobs import BlobCache, Bypass, Committed, Following
from metahub.cache.routing import Route
from metahub.oci import errors
from metahub.runtime.memory import Releaser
from metahub.runtime.metrics import Metrics
from metahub.runtime.threads import ThreadRunner
from metahub.upstream.discard import Discard
from metahub.web.headers import header_text
from metahub.web.passthrough import VerifyingRelay
from metahub.web.ranges import content_range, parse_range
from metahub.web.sendfile import send_file, send_following, zero_copy_socket
from metahub.web.streaming import send


class Blobs:
    def __init__(
        self,
        *,
        cache: BlobCache,
        clock: IReactorTime,
        metrics: Metrics,
        releaser: Releaser | None = None,
        read_in_thread: ThreadRunner,
        fds: IReactorFDSet | None = None,
    ) -> None:
        self.cache = cache
        self.releaser = releaser
        self.clock = clock
        #: Reads of files already open: a pool of their own, never queued behind opens that a
        #: stalled store holds up (docs/cluster.md).
        self.read_in_thread = read_in_thread
        #: The reactor's descriptor set, for the zero-copy path of cached blobs and this node's
        #: downloads on plain TCP (metahub.web.sendfile); without it every body goes through the
        #: copy loop.
        self.fds = fds
        self.metrics = metrics

    def _headers(self, request: Request, digest: str, status: int, length: int | None) -> None:
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Docker-Content-Digest", digest)
        request.setHeader("Accept-Ranges", "bytes")
        if length is not None:
            request.setHeader("Content-Length", str(length))

    async def serve(self, request: Request, route: Route, digest: str, head: bool) -> None:
        if self.releaser is None:
            return await self._serve(request, route, digest, head)
        self.releaser.started()
        try:
            await self._serve(request, route, digest, head)
        finally:
            self.releaser.ended()

    async def _serve(self, request: Request, route: Route, digest: str, head: bool) -> None:
        committed = await self.cache.cached(route, digest)
        if committed is not None:
            return await self._serve_cached(request, digest, committed, head)
        if head:
            size = await self.cache.upstream_size(route, digest)
            # Exactly what a GET would answer: the same range rules, on the size upstream gives.
            wanted = parse_range(_range_header(request), size) if size is not None else None
            self._range_headers(request, digest, wanted, size)
            request.finish()
            return

        def partial(size: int) -> bool:
            wanted = parse_range(_range_header(request), size)
            return wanted is not None and wanted != (0, size)

        answer = await self.cache.fetch(route, digest, partial)
        if isinstance(answer, Committed):
            await self._serve_cached(request, digest, answer, False)  # a HEAD was answered above
        elif isinstance(answer, Bypass):
            await self._pass_through(request, digest, answer)
        else:
            await self._follow(request, digest, answer)

    async def _follow(self, request: Request, digest: str, following: Following) -> None:
        """Send a download as it lands: the whole blob (a 206 of every byte for ``bytes=0-``, as when
        cached), since a partial range of a download is served only once committed."""
        size = following.size
        wanted = parse_range(_range_header(request), size) if size is not None else None
        self._range_headers(request, digest, wanted, size)

        def served(n: int) -> None:
            self.metrics.bytes_served.labels("upstream").inc(n)

        def aborted(reason: str) -> None:
            self.metrics.responses_aborted.labels(reason).inc()

        fds = self.fds
        connection = zero_copy_socket(request, following.follower) if fds is not None else None
        if connection is not None:
            assert fds is not None
            await send_following(request, following, connection, self.read_in_thread, fds, served, aborted)
        else:
            await send(
                request, following.follower, self.read_in_thread, served,
                following.wait_for_more, size, following.resume, aborted,
            )

    async def _pass_through(self, request: Request, digest: str, bypass: Bypass) -> None:
        """Relay upstream's response to this client alone, verified."""
        size = bypass.size
        try:
            wanted = parse_range(_range_header(request), size) if size is not None else None
        except errors.RegistryError:
            bypass.response.deliverBody(Discard())
            raise
        self._range_headers(request, digest, wanted, size)
        start, end = wanted if wanted is not None else (0, size)
        relay = VerifyingRelay(
            request, digest, size, start, end, self.clock, bypass.read_timeout,
            lambda n: self.metrics.bytes_served.labels("upstream").inc(n),
        )
        bypass.response.deliverBody(relay)
        await relay.done
        bypass.received(relay.received)

    async def _serve_cached(self, request: Request, digest: str, committed: Committed, head: bool) -> None:
        """Serve a stored blob, whole or the requested range."""
        reader = committed.reader
        try:  # the reader is closed on every path, whatever ends the response
            size = committed.size
            wanted = parse_range(_range_header(request), size)
            if wanted is not None:
                reader.narrow(*wanted)
            self._range_headers(request, digest, wanted, size)
            if head:
                request.finish()
                return

            def served(n: int) -> None:
                self.metrics.bytes_served.labels("cache").inc(n)

            fds = self.fds
            connection = zero_copy_socket(request, reader) if fds is not None else None
            if connection is not None:
                assert fds is not None
                await send_file(request, reader, connection, self.read_in_thread, fds, served)
            else:
                await send(request, reader, self.read_in_thread, served)
        finally:
            reader.close()

    def _range_headers(self, request: Request, digest: str, wanted: tuple[int, int] | None, size: int | None) -> None:
        """200 with the whole size, or 206 with ``Content-Range`` for ``wanted``."""
        if wanted is None:
            self._headers(request, digest, 200, size)
            return
        assert size is not None
        self._headers(request, digest, 206, wanted[1] - wanted[0])
        request.setHeader("Content-Range", content_range(wanted[0], wanted[1], size))


def _range_header(request: Request) -> str | None:
    return header_text(request, b"range")
