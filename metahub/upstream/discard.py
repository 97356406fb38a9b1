"""An upstream body nobody will read, drained so its connection goes back to the pool."""
from __future__ import annotations

from twisted.internet.protocol import Protocol


class Discard(Protocol):
    """Drops an upstream body that will not be read."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()
