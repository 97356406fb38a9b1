"""Scenario 6: a cold image of many layers, pulled by several clients at once (issue 14).

Like the nodes of a cluster starting one job: ``image_clients`` clients each fetch the image's
manifest by tag, then its config and layers with ``layer_parallel`` transfers at a time over
reused connections (one ``curl --parallel`` each, as a runtime does), all starting at one instant.
Every round and server gets an image of fresh random layers, so both proxies start cold.

Figures: wall time until the last client has the whole image; bytes the server's counting relay
sent it, as a multiple of the image (config and layers); the server's peak thread count (sampled,
``bench/threads.py``), bounded by a pool rather than by the number of layers if the target holds;
peak RSS over the scenario.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.peers.oci import CONFIG, LAYER, MANIFEST

from . import curl
from .blobs import PushedBlob, UploadError, push_random_blob
from .threads import INTERVAL, PeakThreads

if TYPE_CHECKING:
    from .run import Bench

IMAGE_REPO = "bench/image"
RSS_LIMIT_MB = 150.0


def thread_limit() -> int:
    """Issue 14's bound: two threads per core plus eight, whatever the number of layers."""
    return 2 * (os.cpu_count() or 1) + 8


@dataclass(frozen=True)
class PushedImage:
    repository: str
    tag: str
    blobs: list[PushedBlob]  # the config, then the layers

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs)

    def manifest_path(self) -> str:
        return f"/v2/{self.repository}/manifests/{self.tag}"


def _push_bytes(host: str, repository: str, body: bytes) -> PushedBlob:
    """A monolithic upload (POST, then PUT with the body and its digest)."""
    address, port = host.rsplit(":", 1)
    connection = http.client.HTTPConnection(address, int(port), timeout=60)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    try:
        connection.request("POST", f"/v2/{repository}/blobs/uploads/", headers={"Content-Length": "0"})
        response = connection.getresponse()
        response.read()
        location = urllib.parse.urlsplit(response.getheader("Location") or "")
        if response.status != 202 or not location.path:
            raise UploadError(f"starting an upload: {response.status}")
        query = (location.query + "&" if location.query else "") + "digest=" + urllib.parse.quote(digest)
        connection.request("PUT", f"{location.path}?{query}", body=body,
                           headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 201:
            raise UploadError(f"committing {digest}: {response.status}: {answer[:200]!r}")
    finally:
        connection.close()
    return PushedBlob(repository, digest, len(body))


def push_image(host: str, repository: str, tag: str, layers: int, layer_size: int) -> PushedImage:
    """``layers`` fresh random layers, a linux/amd64 config (what the bench's machine type
    resolves to) and a manifest tagged ``tag``, pushed to the registry at ``host``."""
    pushed = [push_random_blob(host, repository, layer_size) for _ in range(layers)]
    config = _push_bytes(host, repository, json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in pushed]}}).encode())
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": LAYER, "digest": blob.digest, "size": blob.size} for blob in pushed],
    }).encode()
    address, port = host.rsplit(":", 1)
    connection = http.client.HTTPConnection(address, int(port), timeout=60)
    try:
        connection.request("PUT", f"/v2/{repository}/manifests/{tag}", body=manifest,
                           headers={"Content-Type": MANIFEST})
        response = connection.getresponse()
        answer = response.read()
        if response.status != 201:
            raise UploadError(f"pushing the manifest {repository}:{tag}: {response.status}: {answer[:200]!r}")
    finally:
        connection.close()
    return PushedImage(repository, tag, [config, *pushed])


def pull(base_url: str, image: PushedImage, headers: dict[str, str], parallel: int, timeout: float,
         outputs: list[Path] | None = None) -> float:
    """One client's pull: the manifest by tag, then every blob, ``parallel`` at a time. Returns
    when it ended (monotonic clock); raises unless every answer is whole."""
    [answer], _ = curl.download_many([base_url + image.manifest_path()],
                                     {**headers, "Accept": MANIFEST}, timeout)
    if answer.status != 200:
        raise curl.CurlError(f"{image.manifest_path()}: status {answer.status}")
    transfers, _ = curl.download_many([base_url + blob.path() for blob in image.blobs], headers, timeout,
                                      parallel, outputs)
    for blob, transfer in zip(image.blobs, transfers):
        if transfer.status != 200 or transfer.bytes != blob.size:
            raise curl.CurlError(f"{blob.path()}: status {transfer.status}, {transfer.bytes} of {blob.size} bytes")
    return time.monotonic()


def pull_together(base_url: str, image: PushedImage, headers: dict[str, str], clients: int,
                  parallel: int, timeout: float, scratch: Path | None) -> tuple[float, list[str]]:
    """``clients`` pulls released at one instant: seconds until the last has ended, and why the
    pulls that failed did (a server's wrong answer is a figure of the scenario, not a harness
    failure; only when no pull succeeds is nothing measured). With ``scratch`` the first client
    keeps its blobs there and they are checked against their digests."""
    start = threading.Barrier(clients + 1)
    ends: list[float] = []
    errors: list[str] = []
    outputs = [scratch / f"blob-{number}" for number in range(len(image.blobs))] if scratch else None

    def client(number: int) -> None:
        start.wait()
        try:
            ends.append(pull(base_url, image, headers, parallel, timeout, outputs if number == 0 else None))
        except Exception as error:  # whatever stopped one client is that pull's failure
            ends.append(time.monotonic())
            errors.append(f"client {number}: {error}")

    workers = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.monotonic()
    for worker in workers:
        worker.join()
    if len(errors) == clients:
        raise RuntimeError(f"all {clients} pulls failed; {errors[0]}")
    if outputs and not any(error.startswith("client 0:") for error in errors):
        for blob, output in zip(image.blobs, outputs):
            if curl.sha256_of(output) != blob.digest:
                raise RuntimeError(f"{blob.path()}: the body does not match its digest")
    return max(ends) - began, errors


def _pull_once(bench: Bench, who: str, round_number: int,
               login: Callable[[str, str | None, str], dict[str, str]]) -> None:
    settings = bench.settings
    image = push_image(bench.upstream.host, IMAGE_REPO, f"{who}-{round_number}-{secrets.token_hex(4)}",
                       settings.image_layers, settings.layer_mib << 20)
    server = bench.servers[who]
    headers = login(server.url, bench.load_user, IMAGE_REPO)
    scratch = bench.workdir / "scenario-6" if settings.verify else None
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    try:
        with PeakThreads([server.pid]) as threads:
            wall, errors = pull_together(server.url, image, headers, settings.image_clients, settings.layer_parallel,
                                 settings.client_timeout, scratch)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    relay = bench.relays[who]
    time.sleep(0.2)  # let the relay's last write be counted
    upstream = sum(relay.bytes_by_path[blob.path()] for blob in image.blobs)
    gets = sum(relay.blob_gets(IMAGE_REPO, blob.digest) for blob in image.blobs)
    bench.sample("6", who, {"wall": wall, "upstream": upstream / image.size, "upstream_gets": gets,
                            "blobs": len(image.blobs), "threads": threads.peaks[server.pid],
                            "failed": len(errors), "failures": errors[:3]})


def scenario_image(bench: Bench) -> None:
    # run.py imports this module, so this one imports run.py only once it runs.
    from .run import Row, _fmt, _median, login_headers

    settings = bench.settings
    shape = f"{settings.image_layers}x{settings.layer_mib} MiB"
    bench.log(f"scenario 6: cold image of {shape}, {settings.image_clients} clients x "
              f"{settings.layer_parallel} parallel")
    with bench.server_use("6"):
        for number in range(settings.rounds):
            for who in bench.order(number):
                bench.attempt(f"scenario 6, {who}, round {number + 1}",
                              lambda: _pull_once(bench, who, number, login_headers))
    rows = bench.results.rows
    m = _median(bench.values("6", "metahub", "wall"))
    d = _median(bench.values("6", "distribution", "wall"))
    rows.append(Row(f"6 cold image {shape}, {settings.image_clients} clients x {settings.layer_parallel}",
                    "s wall", m, d, "", "<= 0.8x dist", None if m is None or d is None else m <= 0.8 * d))
    m = _median(bench.values("6", "metahub", "upstream"))
    d = _median(bench.values("6", "distribution", "upstream"))
    worst = max(bench.values("6", "metahub", "upstream"), default=None)
    rows.append(Row("6 cold image, upstream bytes", "x image", m, d, "", "= 1.0x image",
                    None if worst is None else round(worst, 3) == 1.0))
    m, d = (max((float(count) for count in bench.values("6", who, "threads")), default=None)
            for who in ("metahub", "distribution"))
    limit = thread_limit()
    rows.append(Row("6 cold image, peak threads", "threads", m, d, f"2 x {os.cpu_count()} cores + 8 = {limit}",
                    f"<= {limit}", None if m is None else m <= limit))
    m, d = (max((float(sample["failed"]) for sample in bench.values("6", who)), default=None)
            for who in ("metahub", "distribution"))
    rows.append(Row("6 cold image, failed pulls", f"of {settings.image_clients}, worst", m, d, "", "0",
                    None if m is None else m == 0))
    m = max(bench.values("rss6", "metahub"), default=None)
    d = max(bench.values("rss6", "distribution"), default=None)
    rows.append(Row("6 cold image, peak RSS", "MB", m, d, "", f"metahub < {RSS_LIMIT_MB:.0f} MB",
                    None if m is None else m < RSS_LIMIT_MB))
    gets = {who: [sample["upstream_gets"] / sample["blobs"] for sample in bench.values("6", who)]
            for who in ("metahub", "distribution")}
    bench.results.notes.append(
        "scenario 6: upstream GETs per blob, metahub vs distribution: "
        f"{_fmt(_median(gets['metahub']))} vs {_fmt(_median(gets['distribution']))}; "
        f"threads sampled every {1e3 * INTERVAL:.0f} ms from /proc/PID/status; a failed pull's end "
        "counts in the wall time")
    for who in ("metahub", "distribution"):
        failures = [failure for sample in bench.values("6", who) for failure in sample["failures"]]
        if failures:
            bench.results.notes.append(f"scenario 6: {who}: {len(failures)} pull(s) failed, first: {failures[0]}")

