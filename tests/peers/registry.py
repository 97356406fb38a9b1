"""docker-registry (distribution 2.8) as a real upstream, optionally with auth, TLS or as a proxy.

Our own config is always written: Debian's packaged one turns on htpasswd auth and listens on all
interfaces. Startup waits until ``/v2/`` answers (200, or 401 when auth is on) so a test never
races the listener.

With ``tls`` (a certificate and key, see tests/peers/tls.py) it serves HTTPS, as every production
registry does. With ``redirect_blobs_to`` it answers blob GETs and HEADs with a 307 to that base URL
plus the blob's storage path (distribution's ``redirect`` storage middleware), the way Docker Hub
and ghcr.io send downloads to a CDN; serve ``storage`` there (tests/peers/cdn.py).
"""
import http.client
import secrets
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import yaml

from .ports import LOOPBACK, LoopbackAddress, free_port
from .process import Daemon, PeerError
from .require import require_binary
from .token_auth import TokenServer, TokenSigner

Auth = Literal["htpasswd", "token"] | None

TOKEN_SERVICE = "registry.test"
TOKEN_ISSUER = "metahub-tests"
STARTUP_ATTEMPTS = 3


def bcrypt_htpasswd(username: str, password: str) -> str:
    """An htpasswd line; distribution 2.8 accepts only bcrypt hashes there."""
    import bcrypt  # imported late: only htpasswd registries need it

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    return f"{username}:{hashed}\n"


def v2_status(port: int, tls: bool = False) -> int | None:
    """Status of ``GET /v2/`` (over HTTPS with ``tls``), or None while nothing listens.

    The certificate is not checked: this only asks whether the server is up yet.
    """
    connection: http.client.HTTPConnection
    if tls:
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(LOOPBACK, port, timeout=2, context=unchecked)
    else:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        connection.request("GET", "/v2/")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


class Registry(LoopbackAddress):
    """A running docker-registry on 127.0.0.1; a context manager that stops it on exit.

    ``username``/``password`` (and ``creds`` as ``user:pass`` for CLIs) are set when ``auth`` is.
    ``tls`` is ``(certificate, key)`` paths; ``url`` is then ``https://``.
    """

    def __init__(self, workdir: Path, auth: Auth = None, proxy_of: str | None = None,
                 username: str = "tester", password: str | None = None,
                 tls: tuple[Path, Path] | None = None, redirect_blobs_to: str | None = None) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.auth = auth
        self.tls = tls
        password = password or secrets.token_urlsafe(12)
        self.username = username if auth else None
        self.password = password if auth else None
        self.token_server: TokenServer | None = None
        self._daemon: Daemon | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        binary = require_binary("docker-registry")
        try:
            config = self._config(auth, proxy_of, username, password)
            if tls is not None:
                config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
            if redirect_blobs_to is not None:
                config["middleware"] = {"storage": [{"name": "redirect",
                                                     "options": {"baseurl": redirect_blobs_to}}]}
            self._start(binary, config)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def creds(self) -> str | None:
        """``user:pass`` as skopeo, podman and ctr take it."""
        return f"{self.username}:{self.password}" if self.auth else None

    def _config(self, auth: Auth, proxy_of: str | None, username: str,
                password: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "delete": {"enabled": True}},
            "http": {"secret": secrets.token_hex(16)},
        }
        if auth == "htpasswd":
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(bcrypt_htpasswd(username, password))
            config["auth"] = {"htpasswd": {"realm": "metahub-tests", "path": str(htpasswd)}}
        elif auth == "token":
            signer = TokenSigner(TOKEN_ISSUER)
            self.token_server = TokenServer(signer, TOKEN_SERVICE, {username: password})
            bundle = signer.write_certificate(self.workdir / "token-signer.pem")
            config["auth"] = {"token": {"realm": self.token_server.realm,
                                        "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER,
                                        "rootcertbundle": str(bundle)}}
        if proxy_of is not None:
            config["proxy"] = {"remoteurl": proxy_of}
        return config

    def _start(self, binary: str, config: dict[str, Any]) -> None:
        """Start on a free port, retrying if another process took the port in the meantime."""
        for attempt in range(STARTUP_ATTEMPTS):
            self.port = free_port()
            config["http"]["addr"] = f"{LOOPBACK}:{self.port}"
            config_path = self.workdir / "config.yml"
            config_path.write_text(yaml.safe_dump(config))
            self._daemon = Daemon([binary, "serve", config_path], self.workdir / "registry.log")
            try:
                self._daemon.wait_ready(lambda: v2_status(self.port, self.tls is not None) in (200, 401))
                return
            except PeerError as error:
                if "address already in use" not in str(error) or attempt + 1 == STARTUP_ATTEMPTS:
                    raise

    def stop(self) -> None:
        """Kill the registry and its token server; safe to call twice."""
        if self._daemon is not None:
            self._daemon.stop()
        if self.token_server is not None:
            self.token_server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
