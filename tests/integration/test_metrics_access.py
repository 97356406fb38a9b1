"""Who may read /metrics (issue 10, item 10): a real metahub, ``anonymous: deny``, clients bound to
chosen loopback addresses (127.0.0.2 is another client than 127.0.0.1 to the server)."""
from __future__ import annotations

import http.client
import json

from tests.peers.ports import LOOPBACK, free_port

from .metahub_process import Metahub

UPSTREAM = {"local": {"url": "http://127.0.0.1:9"}}  # never asked: /metrics needs no upstream


def get(port: int, path: str, source: str = LOOPBACK, method: str = "GET") -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=30, source_address=(source, 0))
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def test_metrics_are_for_this_host_by_default(tmp_path) -> None:
    with Metahub(tmp_path / "metahub", UPSTREAM, anonymous="deny") as hub:
        status, content_type, body = get(hub.port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain") and b"metahub_requests" in body


def test_metrics_allow_list_and_a_port_of_their_own(tmp_path) -> None:
    metrics_port = free_port()
    metrics = {"allow": ["127.0.0.2/32"], "listen": f"tcp:{metrics_port}:interface={LOOPBACK}"}
    with Metahub(tmp_path / "metahub", UPSTREAM, anonymous="deny", metrics=metrics) as hub:
        status, content_type, body = get(hub.port, "/metrics")  # from 127.0.0.1: not on the list
        assert (status, content_type, error_code(body)) == (403, "application/json", "DENIED")
        assert b"metahub_" not in body
        status, _, body = get(hub.port, "/metrics", source="127.0.0.2")
        assert status == 200 and b"metahub_requests" in body
        # The metrics port serves whoever reaches it (its interface is the operator's choice), and
        # only /metrics.
        status, _, body = get(metrics_port, "/metrics")
        assert status == 200 and b"metahub_requests" in body
        assert get(metrics_port, "/metrics", method="HEAD")[:2] == (200, "text/plain; version=0.0.4")
        for path, method, expected in [("/v2/", "GET", (404, "NOT_FOUND")), ("/token", "GET", (404, "NOT_FOUND")),
                                       ("/metrics", "POST", (405, "UNSUPPORTED"))]:
            status, content_type, body = get(metrics_port, path, method=method)
            assert (status, error_code(body)) == expected and content_type == "application/json"
    assert "metahub serving /metrics on 127.0.0.1" in hub.log()
