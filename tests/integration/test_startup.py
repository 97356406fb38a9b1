"""Starting metahub: the plugin is found after a real install, and a bad config is one clear line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers.ports import LOOPBACK

from .metahub_process import TWISTD

METAHUB = Path(TWISTD).with_name("metahub")

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "metahub.yaml"
    config.write_text(
        f"storage: {{path: {tmp_path / 'store'}, index: {tmp_path / 'index'}}}\n"
        "upstreams: {hub: {url: 'http://127.0.0.1:9'}}\n" + extra
    )
    return config


def _twistd(*arguments: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TWISTD, "-n", "--pidfile=", "metahub", *map(str, arguments)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed start printed, which must be a single line (no usage text, no traceback)."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_config_stops_twistd_with_one_line(tmp_path) -> None:
    config = _config(tmp_path, "machine_types: {type1: {platform: {os: linux, architecture: amd64}, featurs: [cpu:x]}}\n")
    assert "machine_types.type1.featurs: unknown key" in _one_line(_twistd("--config", config))


@pytest.mark.parametrize("listen, problem", [
    ("tcpx:5000", "Unknown endpoint type: 'tcpx'"),
    ("ssl:5443:privateKey=missing-key.pem:certKey=missing-cert.pem", "cannot read"),
])
def test_a_bad_listen_endpoint_is_one_line_from_check_config_and_startup(tmp_path, listen: str, problem: str) -> None:
    config = _config(tmp_path, f"listen: '{listen}'\n")
    line = _one_line(_twistd("--config", config))
    assert line.startswith("metahub: listen: ") and problem in line
    checked = subprocess.run([METAHUB, "check-config", "--config", str(config)], capture_output=True, text=True,
                             timeout=60)
    assert _one_line(checked) == line
    # The same endpoint given on the command line.
    line = _one_line(_twistd("--config", _config(tmp_path), "--listen", listen))
    assert line.startswith("metahub: --listen ") and problem in line


def test_a_busy_port_ends_the_process_with_one_line_and_status_1(tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = _twistd("--config", _config(tmp_path), "--listen", f"tcp:{port}:interface={LOOPBACK}")
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"metahub: cannot listen on tcp:{port}:interface={LOOPBACK}" in output
    assert "Address already in use" in output
    assert "Traceback" not in output and "ReactorNotRunning" not in output


def test_missing_config_file_is_one_line(tmp_path) -> None:
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "metahub", "--config", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "nope.yaml" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_plugin_is_found_after_a_non_editable_install(tmp_path) -> None:
    """``pip install .`` must install twisted/plugins/metahub_plugin.py where twistd looks."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, timeout=300,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert (target / "twisted" / "plugins" / "metahub_plugin.py").is_file()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "import twisted.plugins;"
        "print([p.tapname for p in getPlugins(IServiceMaker) if p.tapname == 'metahub']);"
        "import metahub.app.tap; print(metahub.app.tap.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    found, module = result.stdout.splitlines()
    assert found == "['metahub']"
    assert module.startswith(str(target))


def test_scripts_run_reads_paths_from_where_the_caller_stands(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text(
        "storage: {path: s, index: i}\nupstreams: {hub: {url: 'http://127.0.0.1:9'}}\nlistne: tcp:1\n")
    result = subprocess.run([ROOT / "scripts" / "run", "--config", "./mine.yaml"], cwd=elsewhere,
                            capture_output=True, text=True, timeout=300)
    # The file was found and read (its own error, not "cannot read"), from the caller's directory.
    assert "listne: unknown key" in _one_line(result)
