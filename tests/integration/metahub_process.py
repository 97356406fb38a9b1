"""metahub itself as the tests run it: ``twistd -n metahub`` in a subprocess on a free port.

By default it listens on plain TCP; given ``tls``, on a Twisted ``ssl:`` endpoint with that
certificate and key, as an operator serving HTTPS itself would run it.
"""
from __future__ import annotations

import http.client
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from twisted.internet.endpoints import quoteStringArgument

from tests.peers.ports import LOOPBACK, LoopbackAddress, free_port
from tests.peers.process import Daemon
from tests.peers.registry import v2_status

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


@dataclass(frozen=True)
class ServerTLS:
    """What metahub serves HTTPS with, and the CA that signed it (for the readiness check)."""

    cert_path: Path
    key_path: Path
    ca_path: Path


def v2_status_tls(port: int, ca_path: Path) -> int | None:
    """Status of ``GET /v2/`` over TLS, checked against ``ca_path`` for 127.0.0.1; None while
    nothing listens. A certificate that does not verify raises, so startup fails at once."""
    context = ssl.create_default_context(cafile=str(ca_path))
    connection = http.client.HTTPSConnection(LOOPBACK, port, timeout=2, context=context)
    try:
        connection.request("GET", "/v2/")
        return connection.getresponse().status
    except ssl.SSLCertVerificationError:
        raise
    except OSError:
        return None
    finally:
        connection.close()


class Metahub(LoopbackAddress):
    """A running metahub; ``config`` is merged over a default with a store in ``workdir``.

    With ``tls`` it serves HTTPS only, and ``url`` says so.
    """

    def __init__(self, workdir: Path, upstreams: dict[str, dict[str, Any]],
                 tls: ServerTLS | None = None, **config: Any) -> None:
        self.tls = tls
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config: dict[str, Any] = {
            "storage": {"path": str(workdir / "store"), "index": str(workdir / "index")},
            "upstreams": upstreams,
            "anonymous": "allow",
            **config,
        }
        self.config_path = workdir / "metahub.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self._daemon: Daemon | None = None
        self.port = free_port()
        self.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}" if self.tls else f"http://{self.host}"

    def listen(self) -> str:
        """The ``--listen`` endpoint string (paths quoted: ``:`` and ``\\`` are special there)."""
        if self.tls is None:
            return f"tcp:{self.port}:interface={LOOPBACK}"
        return (f"ssl:{self.port}:privateKey={quoteStringArgument(str(self.tls.key_path))}"
                f":certKey={quoteStringArgument(str(self.tls.cert_path))}:interface={LOOPBACK}")

    def start(self) -> None:
        """Start (again) on the same port, as an operator's restart would."""
        argv: list[str | Path] = [TWISTD, "--nodaemon", "--pidfile=", "metahub", "--config", self.config_path,
                "--listen", self.listen()]
        self._daemon = Daemon(argv, self.workdir / "metahub.log")
        tls = self.tls
        try:
            if tls is None:
                self._daemon.wait_ready(lambda: v2_status(self.port) is not None)
            else:
                self._daemon.wait_ready(lambda: v2_status_tls(self.port, tls.ca_path) is not None)
        except BaseException:
            self.stop()  # a certificate that does not verify raises out of the check
            raise

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        """The running twistd's process id (for /proc/PID: its threads, its limits)."""
        assert self._daemon is not None, "not running"
        return self._daemon.process.pid

    def log(self) -> str:
        return (self.workdir / "metahub.log").read_text(errors="replace")

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None

    def __enter__(self) -> "Metahub":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
