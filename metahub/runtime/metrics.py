"""Prometheus metrics, in a registry per server so tests (and several servers in one process) don't mix."""
from __future__ import annotations

from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

#: Label values come only from fixed sets: each distinct value is a time series held forever, so a
#: client choosing them (a made-up method, say) could grow /metrics and memory without bound.
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
#: Why a blob response was cut short (metahub.web.streaming.ABORTED): a fixed set.
ABORT_REASONS = ("did_not_verify", "source_removed", "source_idle", "source_abandoned", "too_long")


def method_label(method: bytes) -> str:
    """The request method for a label: one of the standard ones a registry client uses, else other."""
    return method.decode("ascii") if method in _METHODS else "other"


#: The codes the standard library's table names, as labels: a dict lookup per request rather than
#: an enum lookup and a str().
_STATUS_LABELS = {status.value: str(status.value) for status in HTTPStatus}


def status_label(code: int) -> str:
    """The status code for a label: one the standard library's table names, else its class (5xx)."""
    label = _STATUS_LABELS.get(code)
    if label is not None:
        return label
    return f"{code // 100}xx" if 1 <= code // 100 <= 5 else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "metahub_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.cache = Counter(
            "metahub_cache_lookups", "Cache lookups by kind (blob, manifest, tag) and result (hit, miss)",
            ["kind", "result"], registry=self.registry,
        )
        self.bytes_served = Counter(
            "metahub_bytes_served", "Blob bytes sent to clients, by source (cache, upstream)", ["source"],
            registry=self.registry,
        )
        self.upstream_bytes = Counter(
            "metahub_upstream_bytes", "Blob bytes received from upstreams", ["upstream"], registry=self.registry,
        )
        self.upstream_fetches = Counter(
            "metahub_upstream_fetches", "Upstream requests by upstream and kind (blob, manifest, head, tags)",
            ["upstream", "kind"], registry=self.registry,
        )
        self.upstream_failures = Counter(
            "metahub_upstream_failures", "Upstream requests that failed, by upstream", ["upstream"],
            registry=self.registry,
        )
        self.digest_mismatches = Counter(
            "metahub_digest_mismatches", "Upstream blobs whose bytes did not match their digest", ["upstream"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "metahub_downloads_in_flight", "Upstream blob downloads under way on this node", registry=self.registry,
        )
        self.write_workers_busy = Gauge(
            "metahub_write_workers_busy", "Download lane workers hashing or writing a piece now (storage.write_threads)",
            registry=self.registry,
        )
        self.write_jobs_queued = Gauge(
            "metahub_write_jobs_queued", "Pieces of downloads waiting for a lane worker (each about 1 MiB)",
            registry=self.registry,
        )
        self.store_write_failures = Counter(
            "metahub_store_write_failures",
            "Files the store refused (reason: no_space, read_only, io); requests then bypass it for a while",
            ["reason"], registry=self.registry,
        )
        self.store_full = Gauge(
            "metahub_store_full", "1 while the store is out of space and requests are served without keeping them",
            registry=self.registry,
        )
        self.store_bypassed = Counter(
            "metahub_store_bypassed", "Blobs and manifests served from upstream without being kept, by kind",
            ["kind"], registry=self.registry,
        )

        self.responses_aborted = Counter(
            "metahub_responses_aborted",
            "Blob responses cut short, by reason (did_not_verify: a wrong byte; source_*: the file followed"
            " went away and no other source could carry the response on; too_long)",
            ["reason"], registry=self.registry,
        )
        for reason in ABORT_REASONS:  # every series present from the start, at 0
            self.responses_aborted.labels(reason)
        # The children of the per-request counters, by label values. labels() validates, joins and
        # looks up under a lock each time; the values come from fixed sets (above), so these
        # dicts stay small.
        self._requests: dict[tuple[str, str, str], Counter] = {}
        self._lookups: dict[tuple[str, str], Counter] = {}

    def count_request(self, route: str, method: str, status: str) -> None:
        key = (route, method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()

    def count_lookup(self, kind: str, result: str) -> None:
        """One cache lookup of ``kind`` (blob, manifest, tag) with ``result`` (hit, miss, revalidate)."""
        key = (kind, result)
        child = self._lookups.get(key)
        if child is None:
            child = self._lookups[key] = self.cache.labels(*key)
        child.inc()

    def hits_and_misses(self) -> tuple[int, int]:
        """Cache lookups that were answered from the store, and those that went upstream."""
        hits = misses = 0
        for metric in self.cache.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    if sample.labels["result"] == "hit":
                        hits += int(sample.value)
                    elif sample.labels["result"] == "miss":
                        misses += int(sample.value)
        return hits, misses

    def render(self) -> bytes:
        return generate_latest(self.registry)
