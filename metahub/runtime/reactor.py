"""The reactor metahub runs on, as one type for annotations.

Python has no intersection of types, so :class:`IReactor` names the reactor interfaces the server,
``metahub prefetch`` and ``metahub inspect`` use together. No class declares it; Twisted's
reactors provide every interface it extends.
"""
from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IReactor(IReactorCore, IReactorTCP, IReactorThreads, IReactorTime):
    """A reactor with TCP, timed calls and a thread pool."""


def installed_reactor() -> IReactor:
    """The installed reactor, imported when first asked for: twistd installs the one it was told to."""
    from twisted.internet import reactor

    # Typed as the module twisted.internet.reactor, which installing a reactor replaces.
    return cast(IReactor, reactor)
