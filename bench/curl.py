"""curl as the download client: the client every operator has, so a figure anyone can reproduce.

``bench.fetch`` reads into an 8 MiB buffer and is what the in-process figures of scenario 1 use;
issue 14 asks for ``curl -o /dev/null`` against metahub, distribution and the sendfile reference
alike, so no server is judged by a client of our own making. ``download`` is one transfer,
``download_many`` one curl process fetching many URLs with ``--parallel-max`` at a time over
reused connections, the way a runtime pulls the layers of one image.

Timings come from curl's ``--write-out`` (``time_starttransfer``, ``time_total``), so the
process's own start-up is not on the clock. A server silent for ``timeout`` seconds fails the
transfer (``--speed-limit 1 --speed-time``), never the harness.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

#: One line per transfer: which URL, its status, bytes, time to first byte and total, in seconds.
WRITE_OUT = "%{url_effective} %{http_code} %{size_download} %{time_starttransfer} %{time_total}\\n"


class CurlError(RuntimeError):
    pass


@dataclass(frozen=True)
class Transfer:
    url: str
    status: int
    bytes: int
    ttfb: float
    total: float

    def as_dict(self) -> dict[str, object]:
        """The shape of ``bench.fetch``'s answer, so the harness's medians read either."""
        return {"status": self.status, "bytes": self.bytes, "ttfb": self.ttfb, "total": self.total}


def available() -> bool:
    return shutil.which("curl") is not None


def _base_argv(headers: dict[str, str], timeout: float) -> list[str]:
    argv = ["curl", "--silent", "--show-error", "--connect-timeout", str(timeout),
            "--speed-limit", "1", "--speed-time", str(max(1, round(timeout))), "--write-out", WRITE_OUT]
    for name, value in headers.items():
        argv += ["--header", f"{name}: {value}"]
    return argv


def _parse(stdout: str) -> list[Transfer]:
    transfers = []
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) != 5:
            continue
        url, status, size, ttfb, total = fields
        transfers.append(Transfer(url, int(status), int(size), float(ttfb), float(total)))
    return transfers


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as body:
        while chunk := body.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def download_many(urls: list[str], headers: dict[str, str], timeout: float, parallel: int = 1,
                  outputs: list[Path] | None = None) -> tuple[list[Transfer], float]:
    """Fetch every URL in one curl process, ``parallel`` at a time; bodies go to ``outputs`` (one
    path per URL) or to /dev/null. Returns the transfers in URL order and the process's wall time."""
    argv = _base_argv(headers, timeout)
    if parallel > 1:
        argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    for number, url in enumerate(urls):
        argv += ["--output", str(outputs[number]) if outputs else "/dev/null", url]
    started = time.monotonic()
    completed = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=timeout * max(4, len(urls)))
    wall = time.monotonic() - started
    by_url = {transfer.url: transfer for transfer in _parse(completed.stdout)}
    missing = [url for url in urls if url not in by_url]
    if completed.returncode != 0 or missing:
        raise CurlError(f"curl exited with {completed.returncode}, {len(missing)} of {len(urls)} "
                        f"transfers unfinished: {completed.stderr.strip()[-300:]}")
    return [by_url[url] for url in urls], wall


def download(url: str, headers: dict[str, str], timeout: float, size: int,
             sha256: str | None = None, scratch: Path | None = None) -> Transfer:
    """``curl -o /dev/null`` of one body that must be ``size`` bytes; with ``sha256`` the body goes
    to a file in ``scratch`` instead, is hashed and removed (smoke runs: correctness, not speed)."""
    output = None
    if sha256 is not None:
        assert scratch is not None, "verifying a body needs a scratch directory"
        scratch.mkdir(parents=True, exist_ok=True)
        output = scratch / "curl-body"
    try:
        [transfer], _ = download_many([url], headers, timeout, outputs=[output] if output else None)
        if transfer.status != 200 or transfer.bytes != size:
            raise CurlError(f"{url}: status {transfer.status}, {transfer.bytes} of {size} bytes")
        if output is not None and sha256_of(output) != sha256:
            raise CurlError(f"{url}: the body does not match {sha256}")
        return transfer
    finally:
        if output is not None:
            output.unlink(missing_ok=True)
