"""A throwaway certificate authority for peers that speak TLS, made with ``cryptography``.

Production registries are HTTPS, often behind a site's own CA; tests need the same shape without
touching the system trust store. ``make_ca`` writes a self-signed CA certificate into a directory,
and ``CA.issue`` writes leaf certificates signed by it: for the loopback names a test connects to,
for another host name (to prove names are checked), or already expired (to prove dates are).

Names in ``hosts`` that parse as IP addresses become IP SANs, the rest DNS SANs: clients match
``127.0.0.1`` only against an IP SAN and ``localhost`` only against a DNS one.
"""
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_VALIDITY = datetime.timedelta(days=2)
# Backdated so that a peer whose clock is a little behind still accepts a fresh certificate.
_BACKDATE = datetime.timedelta(hours=1)


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: docker-registry, Twisted and OpenSSL tools all read it without a password.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


@dataclass
class CA:
    """A CA whose certificate is at ``cert_path``; ``issue`` signs leaf certificates with it."""

    cert_path: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def issue(self, directory: Path, name: str, hosts: Sequence[str] = LOOPBACK_HOSTS,
              expired: bool = False) -> tuple[Path, Path]:
        """Write ``NAME.crt`` and ``NAME.key`` for a server known as ``hosts``; return both paths.

        ``expired`` makes a certificate whose validity ended a day ago, otherwise valid now.
        """
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 3 * _VALIDITY, now - _VALIDITY / 2) if expired else \
            (now - _BACKDATE, now + _VALIDITY)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_subject_alternative_names(hosts), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_private_key_pem(key))
        key_path.chmod(0o600)
        return cert_path, key_path


def make_ca(directory: Path, name: str = "metahub-tests CA") -> CA:
    """Make a CA and write its certificate to ``DIRECTORY/ca.crt`` (the file clients trust)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE).not_valid_after(now + 5 * _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    cert_path = directory / "ca.crt"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return CA(cert_path=cert_path, certificate=certificate, key=key)
