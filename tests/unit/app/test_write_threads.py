"""``storage.write_threads``: the one pool every download's lane runs on, sized by the config or by
the core count, counted in /metrics."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from metahub.app.root import Root
from metahub.config.file import parse_config
from metahub.runtime.lane import default_workers
from tests.unit.fakes import FakeReactor, config_error, minimal


def root(tmp_path: Path, **storage: object) -> Root:
    data = minimal(tmp_path)
    data["storage"] |= storage
    return Root(config=parse_config(data, str(tmp_path)), reactor=FakeReactor())


def test_write_threads_defaults_to_the_core_count_rule_and_can_be_set(tmp_path: Path) -> None:
    assert root(tmp_path).config.storage.write_threads is None
    assert root(tmp_path).lanes.threads == default_workers()
    assert root(tmp_path, write_threads=3).lanes.threads == 3


def test_write_threads_is_a_whole_number_of_at_least_one(tmp_path: Path) -> None:
    for bad in (0, 2.5, "many", True):
        data = minimal(tmp_path)
        data["storage"]["write_threads"] = bad
        assert "storage.write_threads" in config_error(data, tmp_path)


def test_every_download_gets_its_lane_from_the_one_pool_and_metrics_count_its_jobs(tmp_path: Path) -> None:
    hub = root(tmp_path, write_threads=1)
    try:
        assert hub.downloads.lanes == hub.lanes.lane
        gate = threading.Event()
        first, second = hub.lanes.lane("a"), hub.lanes.lane("b")
        first.run(gate.wait, 10)
        second.run(lambda: None)
        deadline = time.monotonic() + 10
        while hub.lanes.busy == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        text = hub.metrics.render().decode()
        assert "metahub_write_workers_busy 1.0" in text and "metahub_write_jobs_queued 1.0" in text
        gate.set()
        while hub.lanes.busy + hub.lanes.queued and time.monotonic() < deadline:
            time.sleep(0.005)
        text = hub.metrics.render().decode()
        assert "metahub_write_workers_busy 0.0" in text and "metahub_write_jobs_queued 0.0" in text
    finally:
        hub.close()
