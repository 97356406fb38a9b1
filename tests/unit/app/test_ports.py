"""The registry's listen backlog: the kernel's cap by default, the user's own when given, and every
other endpoint string left as written."""
from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

from metahub.app import ports
from metahub.app.ports import DEFAULT_BACKLOG, PortService, listen_backlog, with_backlog
from tests.peers.tls import make_ca


def test_an_endpoint_without_a_backlog_gets_one() -> None:
    assert with_backlog("tcp:5000", 4096) == "tcp:5000:backlog=4096"
    assert with_backlog("tcp:5000:interface=127.0.0.1", 4096) == "tcp:5000:interface=127.0.0.1:backlog=4096"
    assert with_backlog("tcp6:port=5000", 8) == "tcp6:port=5000:backlog=8"
    assert with_backlog(r"unix:/run/meta\:hub.sock:mode=660", 8) == r"unix:/run/meta\:hub.sock:mode=660:backlog=8"
    # An escaped colon is inside a field: this socket's name does not give a backlog.
    assert with_backlog(r"unix:/tmp/x\:backlog\=1", 4096) == r"unix:/tmp/x\:backlog\=1:backlog=4096"


def test_an_ssl_endpoint_gets_one_too(tmp_path: Path) -> None:
    cert, key = make_ca(tmp_path / "pki").issue(tmp_path / "pki", "server")
    description = f"ssl:5443:privateKey={quoteStringArgument(str(key))}:certKey={quoteStringArgument(str(cert))}"
    added = with_backlog(description, 4096)
    assert added == f"{description}:backlog=4096"
    assert serverFromString(MemoryReactor(), added)._backlog == 4096  # what listenSSL is handed


def test_a_backlog_the_user_gave_is_kept() -> None:
    assert with_backlog("tcp:5000:backlog=10", 4096) == "tcp:5000:backlog=10"
    assert with_backlog("tcp:5000:127.0.0.1:10", 4096) == "tcp:5000:127.0.0.1:10"  # by position
    assert with_backlog("unix:/run/m.sock:backlog=3:mode=600", 4096) == "unix:/run/m.sock:backlog=3:mode=600"
    # Twisted reads an escaped letter as the letter: this is a backlog of 5, not an unknown key.
    assert with_backlog("tcp:5000:back\\log=5", 4096) == "tcp:5000:back\\log=5"
    # An escaped colon stays inside its field: a socket path with a colon still gets the default.
    assert with_backlog("unix:/run/a\\:b.sock", 4096) == "unix:/run/a\\:b.sock:backlog=4096"


def test_endpoint_types_without_a_backlog_are_left_alone() -> None:
    assert with_backlog("systemd:domain=INET:index=0", 4096) == "systemd:domain=INET:index=0"


def test_the_backlog_is_the_kernels_cap_or_a_thousand(tmp_path: Path, monkeypatch) -> None:
    cap = tmp_path / "somaxconn"
    cap.write_text("65535\n")
    monkeypatch.setattr(ports, "_SOMAXCONN", str(cap))
    assert listen_backlog() == 65535
    monkeypatch.setattr(ports, "_SOMAXCONN", str(tmp_path / "absent"))
    assert listen_backlog() == DEFAULT_BACKLOG == 1024


def test_the_port_listens_with_that_backlog_and_shows_the_users_description() -> None:
    reactor = MemoryReactor()
    port = PortService(description="tcp:0:interface=127.0.0.1", factory=lambda: None,  # type: ignore[arg-type,return-value]
                       what="test", reactor=reactor, backlog=2048)
    port.startService()
    (number, _, backlog, interface), = reactor.tcpServers
    assert (number, backlog, interface) == (0, 2048, "127.0.0.1")
    assert port.address().startswith("tcp:0:interface=127.0.0.1")
    mine = MemoryReactor()
    PortService(description="tcp:0:backlog=7", factory=lambda: None,  # type: ignore[arg-type,return-value]
                what="test", reactor=mine, backlog=2048).startService()
    assert mine.tcpServers[0][2] == 7


def test_an_ssl_key_that_cannot_be_read_at_start_is_said_in_one_line(tmp_path: Path) -> None:
    # check-config passed, but the key is unreadable by the time the port starts (twistd --uid
    # drops privileges first): one line, not a traceback from the backlog's trial parse.
    missing = quoteStringArgument(str(tmp_path / "key.pem"))
    port = PortService(description=f"ssl:0:privateKey={missing}:certKey={missing}", factory=Factory,
                       what="test", reactor=MemoryReactor(), backlog=2048)
    with pytest.raises(SystemExit, match="cannot read .*key.pem"):
        port.startService()
