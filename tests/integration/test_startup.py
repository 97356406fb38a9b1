"""Starting metahub: the plugin is found after a real install, and a bad config is one clear line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .metahub_process import TWISTD

ROOT = Path(__file__).resolve().parents[2]


def test_bad_config_stops_twistd_with_one_line(tmp_path) -> None:
    config = tmp_path / "metahub.yaml"
    config.write_text(
        "storage: {path: /tmp/s, index: /tmp/i}\n"
        "upstreams: {hub: {url: 'https://registry-1.docker.io'}}\n"
        "machine_types: {type1: {platform: {os: linux, architecture: amd64}, featurs: [cpu:x]}}\n"
    )
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "metahub", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "machine_types.type1.featurs: unknown key" in output
    assert "Traceback" not in output


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
        "import metahub.tap; print(metahub.tap.__file__)"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    found, module = result.stdout.splitlines()
    assert found == "['metahub']"
    assert module.startswith(str(target))
