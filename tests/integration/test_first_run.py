"""The first command on a fresh machine: no config file written, a Docker Hub cache serves."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.peers.ports import LOOPBACK, free_port
from tests.peers.process import Daemon
from tests.peers.registry import v2_status

from .common import request
from .metahub_process import TWISTD

ROOT = Path(__file__).resolve().parents[2]


def start_without_config(directory: Path, env: dict[str, str] | None = None) -> tuple[Daemon, int]:
    port = free_port()
    daemon = Daemon([TWISTD, "--nodaemon", "--pidfile=", "metahub", "--listen", f"tcp:{port}:interface={LOOPBACK}"],
                    directory.parent / f"{directory.name}.log", env=env, cwd=directory)
    daemon.wait_ready(lambda: v2_status(port) is not None)
    return daemon, port


@pytest.mark.parametrize("home", [None, "elsewhere"])
def test_no_config_file_serves_the_builtin_default(tmp_path, home: str | None) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = None
    store = empty / ".metahub" / "store"
    if home is not None:
        env = {**os.environ, "METAHUB_HOME": str(tmp_path / home)}
        store = tmp_path / home / "store"
    daemon, port = start_without_config(empty, env)
    try:
        host = f"{LOOPBACK}:{port}"
        assert request(host, "GET", "/v2/")[0] == 200  # anonymous pulls, no accounts: no challenge
        log = daemon.log_path.read_text()
        assert "serving the built-in default" in log and "metahub config-example > metahub.yaml" in log
        assert f"store and index under {store.parent}" in log
        assert f"point clients at http://{host}" in log
        assert store.is_dir() and (store.parent / "index").is_dir()
        # Docker Hub is out of reach here: an OCI error, promptly, not a hang or a 500.
        started = time.monotonic()
        status, _, body = request(host, "GET", "/v2/library/alpine/manifests/latest")
        assert time.monotonic() - started < 15
        assert status in (502, 504)
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "docker.io" in error["message"]
    finally:
        daemon.stop()


def test_a_metahub_yaml_where_it_starts_is_read(tmp_path) -> None:
    (tmp_path / "metahub.yaml").write_text(
        "storage: {path: s, index: i}\nupstreams: {hub: {url: 'http://127.0.0.1:9'}}\nanonymous: allow\n")
    daemon, port = start_without_config(tmp_path)
    try:
        assert f"config: {tmp_path / 'metahub.yaml'}" in daemon.log_path.read_text()
        assert (tmp_path / "s").is_dir() and not (tmp_path / ".metahub").exists()
    finally:
        daemon.stop()


def test_config_example_prints_the_commented_example() -> None:
    result = subprocess.run([Path(TWISTD).with_name("metahub"), "config-example"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert result.stdout == (ROOT / "examples" / "metahub.yaml").read_text()
