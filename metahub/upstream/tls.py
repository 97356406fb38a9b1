"""TLS on upstream connections: which certificates are trusted, and why a handshake failed.

An upstream's ``ca_file`` is the whole of its trust when set (a private registry behind a site CA);
otherwise the system's roots are. Host names are always checked with service-identity.

The policy is Twisted's ``optionsForClientTLS`` with one change: its certificate check is replaced
by one that does the same two things (OpenSSL's chain verdict, then service-identity on the leaf)
and, on failure, tells the connection *why*. Twisted keeps the chain error to itself (the handshake
fails with a bare "certificate verify failed"), and an operator facing a 502 needs to know whether
the CA is unknown or the certificate expired. The reason travels as the connection's loss reason
(``TLSMemoryBIOProtocol.failVerification``, the way Twisted reports a host name mismatch), so it
reaches the request that made the connection and nothing else. (Twisted releases that check the
host name from an info callback instead still run that check as well; it can only agree.)
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from functools import partial

from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.hazmat import (
    DNS_ID,
    IPAddress_ID,
    ServiceID,
    verify_service_identity,
)
from service_identity.pyopenssl import extract_patterns
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import HostnameCachingHTTPSPolicy
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

__all__ = ["CertificateRejected", "handshake_failure", "https_policy"]

# OpenSSL's verification error codes by number, named as OpenSSL names them (X509_V_ERR_...).
_VERIFY_ERRORS = {
    code: name.removeprefix("ERR_").lower().replace("_", " ")
    for name, code in vars(SSL.X509VerificationCodes).items()
    if name.startswith("ERR_")
}
# Creators are cached per host: each one holds an OpenSSL context with the trust store loaded.
_CACHED_HOSTS = 64


class CertificateRejected(Exception):
    """The upstream's certificate did not verify; the message is the reason, fit for a client."""


def https_policy(ca_certificates: Sequence[bytes]) -> IPolicyForHTTPS:
    """The TLS policy for one upstream: trust ``ca_certificates`` (PEM) alone, or the system's roots."""
    trust = trustRootFromCertificates([Certificate.loadPEM(pem) for pem in ca_certificates]) \
        if ca_certificates else None
    return HostnameCachingHTTPSPolicy(_Policy(partial(optionsForClientTLS, trustRoot=trust)), cacheSize=_CACHED_HOSTS)


def handshake_failure(reason: BaseException) -> str | None:
    """A short reason if ``reason`` is a failed TLS handshake, else None; it never holds a secret.

    OpenSSL's own errors are static strings ("wrong version number" for a plain-HTTP server on an
    https URL, say), and certificate problems are described by :class:`CertificateRejected`.
    """
    if isinstance(reason, CertificateRejected):
        return str(reason)
    if isinstance(reason, SSL.Error):
        queue = reason.args[0] if reason.args and isinstance(reason.args[0], list) else []
        texts = [entry[2] for entry in queue if isinstance(entry, tuple) and len(entry) == 3 and entry[2]]
        return "; ".join(texts) or "TLS error"
    return None


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, options: Callable[[str], IOpenSSLClientConnectionCreator]) -> None:
        # optionsForClientTLS with the trust bound in: an IOpenSSLTrustRoot, a type Twisted does not
        # export, so only this callable holds it (or None: the platform's roots).
        self._options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        return _ExplainingCreator(self._options(host), host)


@implementer(IOpenSSLClientConnectionCreator)
class _ExplainingCreator:
    """Twisted's connection creator, with a certificate check that says why it failed."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator, host: str) -> None:
        self._creator = creator
        self._host = host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self._identity: ServiceID = DNS_ID(host)
        else:
            self._identity = IPAddress_ID(host)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        check = _Check(tlsProtocol, self._host, self._identity)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, check)
        return connection


class _Check:
    """OpenSSL's verify callback for one connection: its chain verdict, then the leaf's host name.

    OpenSSL calls it once per certificate, from the root down to the leaf (depth 0), and again for
    each error it finds; answering False ends the handshake.
    """

    def __init__(self, protocol: TLSMemoryBIOProtocol, host: str, identity: ServiceID) -> None:
        self._protocol: TLSMemoryBIOProtocol | None = protocol
        self._host = host
        self._identity = identity

    def __call__(self, connection: SSL.Connection, certificate: X509, error: int, depth: int,
                 ok: int) -> bool:
        try:
            if not ok:
                what = _VERIFY_ERRORS.get(error, f"X509 verify error {error}")
                raise CertificateRejected(f"certificate verify failed ({what})")
            if depth != 0:
                return True
            try:
                verify_service_identity(extract_patterns(certificate), [self._identity], [])
            except VerificationError:
                raise CertificateRejected(f"certificate is not valid for {self._host}") from None
        except Exception:  # noqa: BLE001 - fail closed, whatever went wrong, and say so
            self._reject(Failure())
            return False
        self._protocol = None  # the leaf was the last certificate; no cycle left behind
        return True

    def _reject(self, reason: Failure) -> None:
        if self._protocol is not None:
            self._protocol.failVerification(reason)
            self._protocol = None
