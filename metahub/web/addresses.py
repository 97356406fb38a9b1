"""Who is at the other end of a connection, for limits and allow-lists keyed by client address."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twisted.internet import address as twisted_address
from twisted.web.server import Request

from metahub.config.file import Network
from metahub.oci import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_ip(request: Request) -> IPAddress | None:
    """The client's IP address; None when it is not on IP (a UNIX socket: only local processes)."""
    peer = request.getClientAddress()
    if not isinstance(peer, (twisted_address.IPv4Address, twisted_address.IPv6Address)):
        return None
    address = ipaddress.ip_address(peer.host.split("%", 1)[0])  # numeric from Twisted; drop an IPv6 zone
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: they are the IPv4 client.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def limit_key(request: Request) -> str:
    """The key of a client for per-address limits. An IPv6 client is its /64: a single host
    commonly holds a whole /64, and keying by full address would hand it 2**64 buckets."""
    address = client_ip(request)
    if address is None:
        return "local"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def require_allowed(request: Request, networks: Iterable[Network], what: str) -> None:
    """403 DENIED unless the client's address is in one of ``networks`` (a UNIX socket is local)."""
    address = client_ip(request)
    if address is None:
        return
    if not any(address in network for network in networks):
        raise errors.denied(f"{what} is not served to {address}")
