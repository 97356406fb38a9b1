"""Request header values as text, decoded explicitly.

Twisted's ``getHeader("name")`` (a ``str`` name) decodes the value as UTF-8 and raises
``UnicodeDecodeError`` on any other byte, which a client can send. Here values are read as bytes
and decoded as latin-1, which maps every byte to one character and never fails; each caller then
checks the value against its own (ASCII) grammar.
"""
from __future__ import annotations

import re

from twisted.web.iweb import IRequest

from metahub.oci import errors

#: On every answer, as the distribution spec asks.
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
#: ``Host`` is uri-host [":" port] (RFC 9110 7.2, RFC 3986 3.2.2): letters, digits and a few marks,
#: brackets for an IPv6 literal. No quote, space or backslash, so it is safe inside a challenge's
#: quoted realm. Empty is allowed (RFC 9112 3.2 asks for it when the target has no authority).
HOST = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]{0,255}")


def header_text(request: IRequest, name: bytes) -> str | None:
    """The last value of header ``name``, or None when the request has none."""
    values = request.requestHeaders.getRawHeaders(name)
    return values[-1].decode("latin-1") if values else None


def check_host(request: IRequest) -> None:
    """400 for a request with more than one ``Host`` or one that is no host (RFC 9112 3.2)."""
    values = request.requestHeaders.getRawHeaders(b"host") or []
    if len(values) > 1 or (values and not HOST.fullmatch(values[0].decode("latin-1"))):
        raise errors.RegistryError(400, "BAD_REQUEST", "the Host header is not a host name")
