"""metahub itself as the tests run it: ``twistd -n metahub`` in a subprocess on a free port."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.peers.ports import LOOPBACK, LoopbackAddress, free_port
from tests.peers.process import Daemon
from tests.peers.registry import v2_status

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class Metahub(LoopbackAddress):
    """A running metahub; ``config`` is merged over a default with a store in ``workdir``."""

    def __init__(self, workdir: Path, upstreams: dict[str, dict[str, Any]], **config: Any) -> None:
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

    def start(self) -> None:
        """Start (again) on the same port, as an operator's restart would."""
        argv = [TWISTD, "--nodaemon", "--pidfile=", "metahub", "--config", self.config_path,
                "--listen", f"tcp:{self.port}:interface={LOOPBACK}"]
        self._daemon = Daemon(argv, self.workdir / "metahub.log")
        self._daemon.wait_ready(lambda: v2_status(self.port) is not None)

    def restart(self) -> None:
        self.stop()
        self.start()

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
