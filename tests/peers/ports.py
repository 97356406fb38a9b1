"""Loopback ports for peers that must be told their port up front.

docker-registry and containerd take an address in their config rather than reporting the port they
bound, so the harness picks a free one first. The small race with another process taking it is
handled by the callers that care (they retry startup on a fresh port).
"""
import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class LoopbackAddress:
    """``host`` and ``url`` of a peer listening on 127.0.0.1:``port`` (the subclass sets ``port``)."""

    port: int

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, also the registry part of an image reference."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"
