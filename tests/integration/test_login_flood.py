"""A flood of wrong passwords must not slow cached blobs down (issue 10, item 5).

A real metahub in front of a real docker-registry, ``anonymous: deny``. A cached blob and manifest
are timed alone, then while 16 threads send wrong passwords to ``/token``, each from its own
loopback address: half guess at the real account (its bucket runs dry: 429), half try ever new
usernames (each address's bucket, and the KDF pool's queue, are what stops them). Before the fix
the scrypt runs queued on the thread pool that blob reads use too, and a cached blob's median went
from milliseconds to seconds; now the KDF has a pool of its own, at a low CPU priority, and
failures are limited before it runs.

Each flooding thread sends at most one request per 50 ms, about what one scrypt run takes: the
point is the cost of the KDF reaching blob traffic, not how many bare requests a second the
reactor can parse (that is a flood of any request, the business of connection limits).
"""
from __future__ import annotations

import base64
import http.client
import json
import statistics
import threading
import time
from collections import Counter

import pytest

from metahub.web.auth import hash_password
from tests.peers import skopeo
from tests.peers.oci import make_image
from tests.peers.ports import LOOPBACK
from tests.peers.registry import Registry

from .metahub_process import Metahub

PASSWORD = "the-right-password"
FLOOD_THREADS = 16
FLOOD_SECONDS = 6.0
PACE = 0.05  # seconds between one flooding thread's requests, at least


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@pytest.fixture
def hub(tmp_path):
    with Registry(tmp_path / "upstream") as upstream:
        image = make_image(tmp_path / "image", "v1", layers=[512 * 1024])
        skopeo.push(tmp_path / "image", "v1", f"{upstream.host}/team/app:v1")
        accounts = {"qnib": {"password_hash": hash_password(PASSWORD)}}
        # One failure a second per address after 5: the 8 addresses trying new usernames still
        # ask for more KDF runs than 2 threads make on a small machine, so the pool stays busy.
        logins = {"failures_per_minute": 60, "burst": 5}
        with Metahub(tmp_path / "metahub", {"local": {"url": upstream.url}}, anonymous="deny",
                     accounts=accounts, logins=logins) as metahub:
            yield metahub, image


class Timer:
    """Times GETs of cached content on one keep-alive connection, as a pulling client would."""

    def __init__(self, port: int, token: str, paths: list[str]) -> None:
        self.connection = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.oci.image.manifest.v1+json"}
        self.paths = paths

    def once(self, path: str) -> float:
        started = time.perf_counter()
        self.connection.request("GET", path, headers=self.headers)
        response = self.connection.getresponse()
        response.read()
        assert response.status == 200, (path, response.status)
        return time.perf_counter() - started

    def medians(self, seconds: float) -> dict[str, float]:
        samples: dict[str, list[float]] = {path: [] for path in self.paths}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for path in self.paths:
                samples[path].append(self.once(path))
            time.sleep(0.02)
        return {path: statistics.median(values) for path, values in samples.items()}


def flood(port: int, stop: threading.Event, statuses: Counter, lock: threading.Lock) -> list[threading.Thread]:
    def guess(number: int) -> None:
        source = f"127.0.0.{10 + number}"
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60, source_address=(source, 0))
        attempt = 0
        while not stop.is_set():
            attempt += 1
            username = "qnib" if number % 2 else f"guess{number}x{attempt}"
            started = time.monotonic()
            try:
                connection.request("GET", "/token?service=metahub",
                                   headers={"Authorization": basic(username, f"wrong{attempt}")})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                status = "error"
            with lock:
                statuses[status] += 1
            stop.wait(max(0.0, PACE - (time.monotonic() - started)))
        connection.close()

    threads = [threading.Thread(target=guess, args=(n,), daemon=True) for n in range(FLOOD_THREADS)]
    for thread in threads:
        thread.start()
    return threads


def test_a_flood_of_wrong_passwords_leaves_cached_blobs_fast(hub) -> None:
    metahub, image = hub
    status, _, body = request_token(metahub.port)
    assert status == 200
    token = json.loads(body)["token"]  # a 5-minute token: enough for the whole test
    blob = f"/v2/team/app/blobs/{image.layers[0].digest}"
    manifest = f"/v2/team/app/manifests/{image.digest}"
    timer = Timer(metahub.port, token, [blob, manifest])
    for path in (blob, manifest):  # into the cache, through the upstream
        timer.once(path)
    time.sleep(0.5)  # the blob's commit to the store
    quiet = timer.medians(2.0)

    stop, statuses, lock = threading.Event(), Counter(), threading.Lock()
    threads = flood(metahub.port, stop, statuses, lock)
    try:
        time.sleep(1.0)  # the flood under way: the account's bucket dry, the KDF pool busy
        loaded = timer.medians(FLOOD_SECONDS - 1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    timer.connection.close()

    # The flood met the limits (429), still ran the KDF for what the limits allow (401), and got
    # no other answer than those and the KDF queue's 503.
    print(f"quiet medians {quiet}, under the flood {loaded}, flood answers {statuses}")
    assert statuses[429] > 0 and statuses[401] > 0, statuses
    assert set(statuses) <= {401, 429, 503}, statuses
    # The latency the issue measured rose from 2 ms to 731 ms. A busy 2-core machine shared with
    # other work makes any one number noisy, so the bound is loose: 50 ms or 10x the quiet median.
    for path in (blob, manifest):
        assert loaded[path] < max(0.05, 10 * quiet[path]), (path, quiet[path], loaded[path], statuses)
    # The right password still works from an address that did not flood (the account "qnib" is
    # over its limit: the login comes from the cache of recent ones, without a KDF run).
    assert request_token(metahub.port)[0] == 200


def request_token(port: int) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    try:
        connection.request("GET", "/token?service=metahub", headers={"Authorization": basic("qnib", PASSWORD)})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()
