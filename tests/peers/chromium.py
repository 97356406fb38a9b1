"""Headless Chromium (Debian ``chromium``) as a real browser: a page's DOM after load, and a screenshot.

Every run gets its own HOME and profile directory (removed afterwards), and the switches keep the
browser off the network except for the page asked for: no background updates, sync or QUIC probes.
"""
import tempfile
from pathlib import Path

from .process import PeerError, run
from .require import require_binary

_QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(arguments: list[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="metahub-chromium-") as directory:
        env = {"PATH": "/usr/bin:/bin", "HOME": directory, "TMPDIR": directory}
        return run([require_binary("chromium"), *_QUIET, f"--user-data-dir={directory}/profile", *arguments],
                   env=env, timeout=90)


def dump_dom(url: str) -> str:
    """The serialized DOM of ``url`` once loaded ("" when the page failed to load, e.g. a 401)."""
    return _chromium(["--dump-dom", url]).decode()


def screenshot(url: str, path: Path, width: int = 1200, height: int = 1600) -> bytes:
    """A PNG of ``url`` rendered in a ``width`` x ``height`` window, saved at ``path``."""
    _chromium([f"--screenshot={path}", f"--window-size={width},{height}", url])
    if not path.exists():
        raise PeerError(f"chromium wrote no screenshot of {url}")
    return path.read_bytes()
