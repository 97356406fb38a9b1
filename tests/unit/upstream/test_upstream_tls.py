"""The certificate check on upstream connections, called as OpenSSL calls it.

The integration tests (tests/integration/test_tls_upstream.py) prove the check with a real
registry; these pin down each verdict and that anything unexpected fails closed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity.hazmat import DNS_ID, IPAddress_ID
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from metahub.upstream.tls import CertificateRejected, _Check, handshake_failure
from tests.peers.tls import make_ca


class RecordingProtocol:
    """Stands in for TLSMemoryBIOProtocol: records why verification failed."""

    def __init__(self) -> None:
        self.reasons: list[Failure] = []

    def failVerification(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        self.reasons.append(reason)


class CheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        temporary = tempfile.TemporaryDirectory()
        self.addCleanup(temporary.cleanup)
        directory = Path(temporary.name)
        ca = make_ca(directory)
        cert_path, _ = ca.issue(directory, "leaf", hosts=["127.0.0.1", "registry.test"])
        self.leaf = X509.from_cryptography(x509.load_pem_x509_certificate(cert_path.read_bytes()))
        self.protocol = RecordingProtocol()

    def check(self, host: str, certificate: X509 | None, error: int, depth: int, ok: int) -> bool:
        identity = DNS_ID(host) if host[0].isalpha() else IPAddress_ID(host)
        return _Check(self.protocol, host, identity)(None, certificate, error, depth, ok)  # type: ignore[arg-type]

    def rejection(self) -> str:
        [reason] = self.protocol.reasons
        self.assertIsInstance(reason.value, CertificateRejected)
        return str(reason.value)

    def test_a_verified_chain_for_the_right_name_passes(self) -> None:
        for host in ("127.0.0.1", "registry.test"):
            self.assertTrue(self.check(host, self.leaf, 0, 1, 1))  # the CA
            self.assertTrue(self.check(host, self.leaf, 0, 0, 1))  # the leaf
        self.assertEqual(self.protocol.reasons, [])

    def test_openssl_verdict_is_kept_and_explained(self) -> None:
        expired = SSL.X509VerificationCodes.ERR_CERT_HAS_EXPIRED
        self.assertFalse(self.check("registry.test", self.leaf, expired, 0, 0))
        self.assertEqual(self.rejection(), "certificate verify failed (cert has expired)")

    def test_unknown_error_code_is_still_a_rejection(self) -> None:
        self.assertFalse(self.check("registry.test", self.leaf, 99999, 1, 0))
        self.assertEqual(self.rejection(), "certificate verify failed (X509 verify error 99999)")

    def test_host_name_is_checked_on_the_leaf(self) -> None:
        self.assertFalse(self.check("other.test", self.leaf, 0, 0, 1))
        self.assertEqual(self.rejection(), "certificate is not valid for other.test")
        self.protocol.reasons.clear()
        self.assertFalse(self.check("127.0.0.2", self.leaf, 0, 0, 1))
        self.assertEqual(self.rejection(), "certificate is not valid for 127.0.0.2")

    def test_anything_unexpected_fails_closed(self) -> None:
        self.assertFalse(self.check("registry.test", None, 0, 0, 1))
        [reason] = self.protocol.reasons
        self.assertNotIsInstance(reason.value, CertificateRejected)
        self.assertIsNone(handshake_failure(reason.value))  # not described as a TLS verdict
