"""An upstream body nobody will read: stopping it at once closes its connection."""
from __future__ import annotations

from metahub.upstream.body import BodyProtocol


class Discard(BodyProtocol):
    """Drops an upstream body that will not be read."""

    def connectionMade(self) -> None:
        self.producer.stopProducing()
