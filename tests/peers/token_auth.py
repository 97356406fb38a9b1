"""A minimal token server for distribution's token authentication, run in a thread.

docker-registry (distribution 2.8) with ``auth: token`` sends clients to a realm for a bearer token
and accepts a JWT only if: ``iss`` is the configured issuer, ``aud`` (a string) is the service,
``exp``/``nbf`` hold within 60 s leeway, and the signing key is proven by an ``x5c`` header whose
certificate chains to ``rootcertbundle``. ES256 signatures are the raw 64-byte ``r || s``, not DER.
Clients ask differently: skopeo and podman GET the realm with HTTP Basic; containerd with
credentials POSTs an OAuth2 password grant (form fields), without them it GETs. Both are served.
"""
import base64
import datetime
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .loopback import LoopbackServer

TOKEN_LIFETIME = 300


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenSigner:
    """An EC P-256 key with a self-signed certificate that the registry is told to trust."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256()))

    def write_certificate(self, path: Path) -> Path:
        """Write the PEM bundle for the registry's ``rootcertbundle``."""
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, subject: str, audience: str, access: list[dict[str, object]]) -> str:
        """A compact JWS granting ``access`` to ``subject`` for the registry named ``audience``."""
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now,
                  "exp": now + TOKEN_LIFETIME, "jti": secrets.token_hex(8), "access": access}
        signing_input = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def parse_scopes(scopes: list[str]) -> list[dict[str, object]]:
    """Turn ``repository:NAME:pull,push`` scope strings into the token's ``access`` claim.

    Everything asked for is granted: the harness tests authentication, not authorisation.
    """
    access: list[dict[str, object]] = []
    for scope in scopes:
        for item in scope.split(" "):
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
    return access


class TokenServer(LoopbackServer):
    """Issues tokens at ``/token`` to the users it knows; 401 for anyone else."""

    def __init__(self, signer: TokenSigner, service: str, users: dict[str, str]) -> None:
        self.signer = signer
        self.service = service
        self.users = users
        self.issued = 0
        self._lock = threading.Lock()
        super().__init__(self._handler_class(), "token-server")
        self.realm = f"{self.url}/token"

    def _grant(self, username: str, password: str, scopes: list[str]) -> str | None:
        if self.users.get(username) != password or not username:
            return None
        with self._lock:
            self.issued += 1
        return self.signer.issue(username, self.service, parse_scopes(scopes))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                kind, _, encoded = self.headers.get("Authorization", "").partition(" ")
                username = password = ""
                if kind.lower() == "basic":
                    username, _, password = base64.b64decode(encoded).decode().partition(":")
                self._answer(server._grant(username, password, query.get("scope", [])))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type") != ["password"]:
                    self._answer(None)
                    return
                self._answer(server._grant(form.get("username", [""])[0],
                                           form.get("password", [""])[0], form.get("scope", [])))

            def _answer(self, token: str | None) -> None:
                if token is None:
                    body = b'{"details": "invalid username or password"}'
                    self.send_response(401)
                else:
                    body = json.dumps({"token": token, "access_token": token,
                                       "expires_in": TOKEN_LIFETIME}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output clean; the registry's own log tells the story."""

        return Handler
